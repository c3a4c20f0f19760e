//! Deterministic simulation of the settlement engine (issue #17, first part): the real
//! engine and the real RocksDB ledger against a simulated chain (`sim/chain.rs`), one seed
//! per world (`sim/world.rs`): random payments, reorgs, dropped transactions, fee spikes,
//! payers spending elsewhere, RPC errors and lagging reads, policy changes and crashes;
//! then the faults stop and every invariant is checked. A failing seed prints its last
//! events and replays exactly.
//!
//! `SIM_SEEDS=N` runs N seeds (default 300); `SIM_SEED=S` runs only seed S (`SIM_TRACE=1`
//! prints its whole trace when it fails); `SIM_ALL=1` lists every failing seed instead of
//! stopping at the first unknown one.
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
//! taken for gone).

mod sim {
    pub mod chain;
    pub mod rng;
    pub mod world;
}

use std::time::Instant;

/// Seeds that break an invariant because of a known, open engine gap; each must still
/// fail, and no other may (so the list stays true). Of the first 1,000 seeds, three, all
/// one gap: a batch is abandoned when its settler's nonce was used and no receipt of ours
/// was served within a block (a node lagging on receipts), its payments go back or expire,
/// and the transaction that had in fact been mined paid them: the books say expired, the
/// payee was paid. Abandoned batches' transactions are not watched until final. Open in
/// issue #17.
const KNOWN_OPEN: &[u64] = &[233, 404, 721];

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300u64);
    (1..=n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invariant_holds_in_every_seeded_world() {
    // A simulated crash is a panic inside a round: keep it off the test's output.
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
    let started = Instant::now();
    let mut totals = sim::world::Outcome::default();
    let seeds = seeds();
    let mut failing = Vec::new();
    for &seed in &seeds {
        let outcome = match sim::world::run(seed, true).await {
            Ok(o) => o,
            Err(violation) => {
                let one = std::env::var_os("SIM_SEED").is_some();
                if std::env::var_os("SIM_ALL").is_none() && (one || !KNOWN_OPEN.contains(&seed)) {
                    panic!("{violation}");
                }
                failing.push((seed, violation.lines().next().unwrap_or_default().to_owned()));
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
    for (_, v) in &failing {
        println!("known open: {v}");
    }
    if std::env::var_os("SIM_SEED").is_none() && std::env::var_os("SIM_ALL").is_none() {
        let failed: Vec<u64> = failing.iter().map(|(s, _)| *s).collect();
        let expected: Vec<u64> = KNOWN_OPEN.iter().copied().filter(|s| seeds.contains(s)).collect();
        assert_eq!(failed, expected, "a known-open seed now passes: take it off KNOWN_OPEN");
    }
    let secs = started.elapsed().as_secs_f64();
    let mut faults: Vec<_> = totals.injected.iter().collect();
    faults.sort();
    println!(
        "simulated {} seeds in {secs:.1} s ({:.1} seeds/s): {} payments accepted, {} settled, {} failed, {} expired; faults {faults:?}",
        seeds.len(),
        seeds.len() as f64 / secs,
        totals.accepted,
        totals.settled,
        totals.failed,
        totals.expired
    );
}

/// The seeds of the bugs the simulator found, each fixed: they must keep passing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_of_fixed_bugs_pass() {
    for seed in [6, 19, 38, 62, 143, 149, 352, 522] {
        if let Err(violation) = sim::world::run(seed, true).await {
            panic!("{violation}");
        }
    }
}
