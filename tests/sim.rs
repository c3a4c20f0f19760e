//! Deterministic simulation of the settlement engine (issue #17, first part): the real
//! engine and the real RocksDB ledger against a simulated chain (`sim/chain.rs`), one seed
//! per world (`sim/world.rs`): random payments, reorgs, dropped transactions, fee spikes,
//! payers spending elsewhere, RPC errors and lagging reads, policy changes and crashes;
//! then the faults stop and every invariant is checked. A failing seed prints its last
//! events and replays exactly.
//!
//! `SIM_SEEDS=N` runs N seeds (default 300) from `SIM_FROM` (1); `SIM_SEED=S` runs only
//! seed S (`SIM_TRACE=1` prints its whole trace when it fails); `SIM_ALL=1` runs on past a
//! failing seed and lists every one; `SIM_FAULTS=reorg,drop,...` injects only those kinds
//! (`sim::world::FaultKinds::ALL`; all by default). `ops/simulate.sh` runs long ranges
//! over several processes and adds up their `sim-totals` lines.
//!
//! Bugs it found, each fixed with its seed kept as a regression test below: seed 6 (a
//! dropped transaction whose fee was already at the cap was never sent again), seed 19 (a
//! receipt not served yet made our own use of an authorization look like someone else's:
//! the payment failed although our transaction paid it), seed 38 (a payment back in the
//! queue after a reorg expired although its earlier transaction, back in the pool, had paid
//! it), seeds 62 and 143 (a payment failed `nonce_already_used` on someone else's use in a
//! block not yet final; a reorg removed it and our own transaction paid: a use by others
//! now fails a payment only once final), seed 149 (the log search for who used a nonce
//! stopped at a lagging head and missed our own use in the newest block: it now runs to the
//! latest block), seeds 352 and 522 (a receipt not served yet after a reorg made a settled
//! payment's transaction look gone: the settlement was reversed and the payment expired
//! although the transaction had paid it; a transaction the node still knows is now not
//! taken for gone), seeds 233, 404 and 721 (a batch was abandoned when its settler's nonce
//! was used and no receipt of ours was served within a block, a node lagging on receipts;
//! its payments past their window expired, but the transaction had been mined and paid
//! them: a payment about to expire after its transaction was taken for gone is now looked
//! for on chain first). With balance drains and lagging nonce reads added: seeds 280, 428,
//! 487, 498, 2138 (a payment failed `insufficient_funds` on a payer's balance moved away in
//! a block not yet final; a reorg undid the move and our transaction, mined again, paid
//! it: a refusal is now final only once its block is, and the token refuses it on the
//! final block's state too), seed 2328 (a payment expired on a simulation although a
//! transaction of ours had paid it: a once-batched payment's expiry now looks for our use
//! first). From the first long run: seeds 25353, 58095, 77774, 79035, 88502 (a settled
//! payment whose transaction a reorg dropped stayed watched for ever: the node kept the
//! transaction queued above a nonce gap nothing of ours would fill, and a known transaction
//! was taken for one that may still be mined).

// A failed unwrap fails the test that made it.
#![allow(clippy::unwrap_used)]

mod sim {
    pub mod chain;
    pub mod rng;
    pub mod world;
}

use std::time::Instant;

/// Seeds that break an invariant because of a known, open engine gap; each must still
/// fail, and no other may (so the list stays true). None today: the first 100,000 seeds
/// pass (SIMULATION.md).
const KNOWN_OPEN: &[u64] = &[];

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// `SIM_SEED` alone, or `SIM_SEEDS` seeds from `SIM_FROM` (1).
fn seeds() -> Vec<u64> {
    if let Some(s) = env("SIM_SEED") {
        return vec![s];
    }
    let from = env("SIM_FROM").unwrap_or(1u64);
    (from..from + env("SIM_SEEDS").unwrap_or(300u64)).collect()
}

/// A simulated crash is a panic inside a round: keep it off the test's output.
fn silence_simulated_crashes() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
        if !message.is_some_and(|m| m.contains(sim::chain::CRASH)) {
            default_hook(info);
        }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invariant_holds_in_every_seeded_world() {
    silence_simulated_crashes();
    let kinds = match std::env::var("SIM_FAULTS") {
        Ok(list) => sim::world::FaultKinds::parse(&list).unwrap_or_else(|e| panic!("SIM_FAULTS: {e}")),
        Err(_) => sim::world::FaultKinds::all(),
    };
    let one = std::env::var_os("SIM_SEED").is_some();
    let all = std::env::var_os("SIM_ALL").is_some();
    let started = Instant::now();
    let mut totals = sim::world::Outcome::default();
    let seeds = seeds();
    let mut failing = Vec::new();
    for &seed in &seeds {
        let outcome = match sim::world::run(seed, &kinds).await {
            Ok(o) => o,
            Err(violation) => {
                if !all && (one || !KNOWN_OPEN.contains(&seed)) {
                    panic!("{violation}");
                }
                let first = violation.lines().next().unwrap_or_default().to_owned();
                // One line per failing seed, as it happens (a long run is watched by it).
                println!("sim-failing seed={seed} after={:.1}s {first}", started.elapsed().as_secs_f64());
                failing.push(seed);
                continue;
            }
        };
        totals.accepted += outcome.accepted;
        totals.settled += outcome.settled;
        totals.failed += outcome.failed;
        totals.expired += outcome.expired;
        for (k, v) in outcome.injected {
            *totals.injected.entry(k).or_default() += v;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut faults: Vec<_> = totals.injected.iter().map(|(k, v)| format!("fault.{k}={v}")).collect();
    faults.sort();
    // One machine-readable line (ops/simulate.sh adds up its jobs' lines).
    println!(
        "sim-totals seeds={} from={} secs={secs:.1} failing={} accepted={} settled={} failed={} expired={} {}",
        seeds.len(),
        seeds.first().copied().unwrap_or_default(),
        failing.len(),
        totals.accepted,
        totals.settled,
        totals.failed,
        totals.expired,
        faults.join(" ")
    );
    println!("simulated {} seeds in {secs:.1} s ({:.1} seeds/s)", seeds.len(), seeds.len() as f64 / secs);
    let unknown: Vec<u64> = failing.iter().copied().filter(|s| !KNOWN_OPEN.contains(s)).collect();
    assert!(unknown.is_empty(), "seeds breaking an invariant: {unknown:?}");
    if !one && kinds == sim::world::FaultKinds::all() {
        let expected: Vec<u64> = KNOWN_OPEN.iter().copied().filter(|s| seeds.contains(s)).collect();
        assert_eq!(failing, expected, "a known-open seed now passes: take it off KNOWN_OPEN");
    }
}

/// The seeds of the bugs the simulator found, each fixed: they must keep passing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_of_fixed_bugs_pass() {
    silence_simulated_crashes();
    // With the kinds of fault there were when each was found: the same worlds.
    let first = sim::world::FaultKinds::first();
    let all = sim::world::FaultKinds::all();
    let seeds = [6, 19, 38, 62, 143, 149, 233, 352, 404, 522, 721].map(|s| (s, &first));
    for (seed, kinds) in seeds
        .into_iter()
        .chain([280, 428, 487, 498, 2138, 2328, 25353, 58095, 77774, 79035, 88502].map(|s| (s, &all)))
    {
        if let Err(violation) = sim::world::run(seed, kinds).await {
            panic!("{violation}");
        }
    }
}
