//! One seeded world: payers paying at random, a chain that reorgs, drops, spikes its fees
//! and fails at the RPC edge, operators changing the policy, the daemon crashing and
//! restarting from its ledger; then the faults stop, and every invariant is checked.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::signers::local::PrivateKeySigner;
use futures::FutureExt as _;
use parking_lot::Mutex;
use tokio::sync::watch;
use x402_batcher::clock::ManualClock;
use x402_batcher::config::{Finality, FinalityTag, SettlementConfig};
use x402_batcher::ledger::{
    AcceptOutcome, AcceptRequest, BatchStatus, LedgerHandle, LedgerStore, LogEntry, PaymentRecord,
    RocksLedger, Status, Submission, books,
};
use x402_batcher::settle::Engine;
use x402_batcher::tools::testkit::PaymentBuilder;
use x402_batcher::x402::eip712::TokenDomain;

use super::chain::{Faults, SimChain, World};
use super::rng::Rng;

const CHAIN_ID: u64 = 8453;
const START: u64 = 1_800_000_000;
const STEPS: usize = 90;
/// Rounds after the faults stop within which everything pending must become final.
const LIVENESS_ROUNDS: usize = 400;

/// The kinds of fault a world injects (`SIM_FAULTS`, comma-separated; all by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultKinds(pub BTreeSet<&'static str>);

impl FaultKinds {
    pub const ALL: [&'static str; 9] =
        ["crash", "drain", "drop", "fee_spike", "lag", "nonce_lag", "reorg", "rpc_error", "spent_elsewhere"];

    pub fn all() -> FaultKinds {
        FaultKinds(Self::ALL.into_iter().collect())
    }

    /// The kinds the first simulator had (every one but `drain` and `nonce_lag`): with
    /// these, a seed's world is the one its bug was found in.
    pub fn first() -> FaultKinds {
        FaultKinds(Self::ALL.into_iter().filter(|k| !["drain", "nonce_lag"].contains(k)).collect())
    }

    /// `all`, `none`, or a list of kinds from [`FaultKinds::ALL`].
    pub fn parse(list: &str) -> Result<FaultKinds, String> {
        match list.trim() {
            "all" | "" => return Ok(Self::all()),
            "none" => return Ok(FaultKinds(BTreeSet::new())),
            _ => {}
        }
        let mut kinds = BTreeSet::new();
        for k in list.split(',').map(str::trim) {
            let known = Self::ALL.iter().find(|a| **a == k);
            kinds.insert(
                *known.ok_or_else(|| format!("unknown fault kind {k:?}; kinds: {}", Self::ALL.join(",")))?,
            );
        }
        Ok(FaultKinds(kinds))
    }

    fn on(&self, kind: &str) -> bool {
        self.0.contains(kind)
    }
}

/// What a seed's world did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub accepted: usize,
    pub settled: usize,
    pub failed: usize,
    pub expired: usize,
    pub injected: HashMap<&'static str, u64>,
}

/// Runs the world of `seed`; `Err` names the invariant broken, with the trace.
pub async fn run(seed: u64, kinds: &FaultKinds) -> Result<Outcome, String> {
    let mut rng = Rng::new(seed);
    let token = Address::repeat_byte(0x70);
    let domain = TokenDomain::new("USD Coin", "2", CHAIN_ID, token);
    let world = Arc::new(Mutex::new(World::new(CHAIN_ID, token, START, seed)));
    let key = |tag: &str, i: u64| {
        PrivateKeySigner::from_bytes(&keccak256(
            [tag.as_bytes(), &seed.to_be_bytes(), &i.to_be_bytes()].concat(),
        ))
        .expect("a key")
    };
    let settlers: Vec<_> = (0..1 + rng.below(2)).map(|i| key("settler", i)).collect();
    let payers: Vec<_> = (0..2 + rng.below(6)).map(|i| key("payer", i)).collect();
    let payees: Vec<Address> =
        (0..1 + rng.below(3)).map(|i| Address::with_last_byte(0xe0 + i as u8)).collect();
    for p in &payers {
        world.lock().fund(p.address(), U256::from(1_000 + rng.below(20_000)));
    }

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store: Arc<dyn LedgerStore> = Arc::new(RocksLedger::open(dir.path()).map_err(|e| e.to_string())?);
    let (ledger, writer) = LedgerHandle::start(store, 1024).map_err(|e| e.to_string())?;
    let clock = ManualClock::new(START);
    let config = SettlementConfig {
        confirmations: 1 + rng.below(3),
        max_batch_size: 1 + rng.below(8) as usize,
        max_wait_ms: Some(rng.below(4) * 1_000),
        linger_ms: rng.below(2) * 500,
        deadline_margin_secs: 5,
        replace_after_blocks: 2 + rng.below(3),
        ..SettlementConfig::default()
    };
    let (policy_tx, policy_rx) = watch::channel(config.policy());
    let start_engine = || {
        Engine::new(
            SimChain(Arc::clone(&world)),
            ledger.clone(),
            Arc::new(clock.clone()),
            None,
            &settlers,
            config.clone(),
            policy_rx.clone(),
        )
        .map(|e| {
            // Settler balances for the status are read when an engine starts, not every
            // 10 s of simulated time: the worlds of the first seeds were recorded so.
            e.with_finality(Finality::Tag(FinalityTag::Finalized)).with_settler_reads_every_ms(u64::MAX)
        })
        .map_err(|e| format!("engine: {e}"))
    };
    let mut engine = start_engine()?;
    let mut trace: Vec<String> = Vec::new();
    let mut accepted: Vec<PaymentRecord> = Vec::new();
    let mut next_nonce = 0u64;
    let mut spike = 0u32;
    let mut log_cursor = 0u64;
    world.lock().faults = Faults {
        error_per_mille: if kinds.on("rpc_error") { 30 } else { 0 },
        lag_per_mille: if kinds.on("lag") { 30 } else { 0 },
        nonce_lag_per_mille: if kinds.on("nonce_lag") { 30 } else { 0 },
    };
    // The later kinds' own stream: worlds without them replay as before they existed.
    let mut later = Rng::new(seed ^ 0xd4a1);

    for step in 0..STEPS {
        let now = world.lock().head().timestamp;
        clock.set(now);
        // Payments arrive.
        for _ in 0..rng.below(3) {
            let payer = &payers[rng.below(payers.len() as u64) as usize];
            let to = payees[rng.below(payees.len() as u64) as usize];
            let life = if rng.chance(150) { 8 + rng.below(15) } else { 40 + rng.below(300) };
            next_nonce += 1;
            let signed = PaymentBuilder::new(payer, &domain, now)
                .to(to)
                .value(1 + rng.below(400))
                .nonce_index(next_nonce)
                .valid_after(now.saturating_sub(10))
                .valid_before(now + life)
                .build();
            let balance =
                world.lock().head().token.balances.get(&payer.address()).copied().unwrap_or_default();
            let req = AcceptRequest {
                signed,
                submission: Submission { network: "eip155:8453".into(), ..Submission::default() },
                balance,
                window: Ok(()),
                now_ms: now * 1000,
            };
            if let Ok(AcceptOutcome::Accepted(r)) = ledger.accept(req).await {
                trace.push(format!("step {step}: accepted {} ({} to {to})", r.payment_id(), r.value()));
                accepted.push(r);
            }
        }
        {
            let mut w = world.lock();
            if kinds.on("reorg") && rng.chance(40) && w.blocks.len() > 2 {
                let depth = 1 + rng.below(4);
                let requeue = rng.chance(500);
                w.reorg(depth, requeue);
                trace.push(format!("step {step}: reorg depth {depth} requeue {requeue}"));
            }
            if kinds.on("drop") && rng.chance(60) {
                w.drop_pending();
                trace.push(format!("step {step}: a pending transaction dropped"));
            }
            if kinds.on("spent_elsewhere") && rng.chance(20) && !accepted.is_empty() {
                let r = &accepted[rng.below(accepted.len() as u64) as usize];
                let (from, nonce) = (r.signed.authorization.from, r.signed.authorization.nonce);
                if !w.head().token.used.contains(&(from, nonce)) {
                    w.spend_elsewhere(from, nonce);
                    trace.push(format!("step {step}: {} spent elsewhere", r.payment_id()));
                }
            }
            if kinds.on("drain") && later.chance(20) {
                // A payer moves some or all of its balance away.
                let p = payers[later.below(payers.len() as u64) as usize].address();
                let balance = w.head().token.balances.get(&p).copied().unwrap_or_default();
                let value =
                    if later.chance(500) { balance } else { balance / U256::from(2 + later.below(4)) };
                w.drain(p, value);
                trace.push(format!("step {step}: {p} drained {value}"));
            }
            if kinds.on("fee_spike") && rng.chance(30) {
                spike = 1 + rng.below(6) as u32;
                *w.injected.entry("fee_spike").or_default() += 1;
                trace.push(format!("step {step}: fee spike for {spike} blocks"));
            }
            if kinds.on("crash") && rng.chance(40) {
                let at = w.calls + 1 + rng.below(25);
                w.crash_at = Some(at);
            }
        }
        if rng.chance(30) {
            // An operator changes the policy.
            let mut p = policy_tx.borrow().clone();
            p.max_batch_size = 1 + rng.below(8) as usize;
            p.linger_ms = rng.below(3) * 400;
            p.paused = rng.chance(200);
            policy_tx.send_replace(p.clone());
            trace.push(format!("step {step}: policy {p:?}"));
        }
        if rng.chance(650) {
            let mut w = world.lock();
            let base =
                if spike > 0 { 600_000_000_000 } else { 1_000_000_000 + rng.below(1_000_000_000) as u128 };
            spike = spike.saturating_sub(1);
            w.mine(1 + rng.below(3), base);
        }
        clock.set(world.lock().head().timestamp + rng.below(2));
        engine = round(engine, &start_engine, &mut trace, step).await?;
        check_batches(ledger.ledger().as_ref()).map_err(|e| report(seed, &e, &trace))?;
        check_exposure(ledger.ledger().as_ref()).map_err(|e| report(seed, &e, &trace))?;
        check_settled_deep(&world.lock(), ledger.ledger().as_ref(), &mut log_cursor, config.confirmations)
            .map_err(|e| report(seed, &e, &trace))?;
    }

    // The faults stop; the operators resume; everything pending becomes final.
    {
        let mut w = world.lock();
        w.faults = Faults::default();
        w.crash_at = None;
    }
    let mut p = policy_tx.borrow().clone();
    p.paused = false;
    policy_tx.send_replace(p);
    let mut quiet = 0;
    for i in 0..LIVENESS_ROUNDS {
        world.lock().mine(2, 1_000_000_000);
        clock.set(world.lock().head().timestamp);
        engine = round(engine, &start_engine, &mut trace, STEPS + i).await?;
        let l = ledger.ledger();
        if l.pending() == 0 && l.watched().map_err(|e| e.to_string())?.is_empty() {
            quiet += 1;
            if quiet > 3 {
                break;
            }
        }
    }
    drop(engine);
    let l = Arc::clone(ledger.ledger());
    let ours: HashSet<Address> = settlers.iter().map(|s| s.address()).collect();
    let outcome =
        check_end(&world.lock(), l.as_ref(), &accepted, &ours).map_err(|e| report(seed, &e, &trace));
    drop(ledger);
    let _ = writer.join();
    let mut outcome = outcome?;
    outcome.injected = world.lock().injected.clone().into_iter().collect();
    Ok(outcome)
}

/// One engine round; a simulated crash restarts the engine from the ledger.
async fn round<F>(
    mut engine: Engine<SimChain>,
    start: &F,
    trace: &mut Vec<String>,
    step: usize,
) -> Result<Engine<SimChain>, String>
where
    F: Fn() -> Result<Engine<SimChain>, String>,
{
    // The engine as its loop runs it: a round only when an arrival calls for one or one is
    // due on the engine's clock (the world's time).
    match std::panic::AssertUnwindSafe(engine.tick()).catch_unwind().await {
        Ok(Ok(None)) => Ok(engine),
        Ok(Ok(Some(r))) => {
            if r != Default::default() {
                trace.push(format!("step {step}: round {r:?}"));
            }
            Ok(engine)
        }
        Ok(Err(e)) => {
            trace.push(format!("step {step}: round failed: {e}"));
            Ok(engine)
        }
        Err(_) => {
            trace.push(format!("step {step}: crash; restart from the ledger"));
            drop(engine);
            start()
        }
    }
}

fn report(seed: u64, violation: &str, trace: &[String]) -> String {
    // SIM_TRACE=1 with SIM_SEED=S: the whole trace.
    let keep = if std::env::var_os("SIM_TRACE").is_some() { usize::MAX } else { 40 };
    let tail: Vec<_> = trace.iter().rev().take(keep).rev().cloned().collect();
    format!("seed {seed}: {violation}\nlast events:\n  {}", tail.join("\n  "))
}

/// No payment in two live batches.
fn check_batches(ledger: &dyn LedgerStore) -> Result<(), String> {
    let mut seen = HashSet::new();
    for b in ledger.batches(CHAIN_ID).map_err(|e| e.to_string())? {
        if matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted | BatchStatus::Included) {
            for k in &b.items {
                let r = ledger.get(k).map_err(|e| e.to_string())?;
                // Only items still carried by this batch count (one that went back and into
                // another batch is the other's).
                if r.is_some_and(|r| r.batch_id == b.id() && !r.status.is_final()) && !seen.insert(*k) {
                    return Err(format!("payment {} in two live batches", k.payment_id()));
                }
            }
        }
    }
    Ok(())
}

/// Every settlement (a first outcome; a correction may move it to a newer block) written
/// since `cursor` is of a block `confirmations` deep on the chain as it is now (nothing moves the chain during a round; a lagging read only makes
/// the engine see less).
fn check_settled_deep(
    world: &World,
    ledger: &dyn LedgerStore,
    cursor: &mut u64,
    confirmations: u64,
) -> Result<(), String> {
    let head = world.head().number;
    for (seq, r) in ledger.settlement_log(*cursor, usize::MAX).map_err(|e| e.to_string())? {
        *cursor = seq;
        if r.status == Status::Settled
            && r.log_entry == LogEntry::Outcome
            && r.block_number + confirmations > head + 1
        {
            return Err(format!(
                "payment {} settled in block {} at head {head}, not {confirmations} deep",
                r.payment_id(),
                r.block_number
            ));
        }
    }
    Ok(())
}

/// Each payer's exposure is the sum of its pending payments' values.
fn check_exposure(ledger: &dyn LedgerStore) -> Result<(), String> {
    let mut sums: HashMap<_, U256> = HashMap::new();
    for r in ledger.pending_records().map_err(|e| e.to_string())? {
        *sums.entry(r.key().payer()).or_default() += r.value();
    }
    for (payer, exposure) in ledger.exposures().map_err(|e| e.to_string())? {
        let sum = sums.remove(&payer).unwrap_or_default();
        if sum != exposure {
            return Err(format!("exposure {exposure} of a payer whose pending payments sum to {sum}"));
        }
    }
    if let Some((_, sum)) = sums.into_iter().find(|(_, s)| !s.is_zero()) {
        return Err(format!("pending payments of {sum} with no exposure"));
    }
    Ok(())
}

/// The end: every payment final exactly once, settled ⇔ its log in a canonical block of
/// ours, payees paid what the books say, fee shares summing to each fee.
fn check_end(
    world: &World,
    ledger: &dyn LedgerStore,
    accepted: &[PaymentRecord],
    ours: &HashSet<Address>,
) -> Result<Outcome, String> {
    let err = |e: x402_batcher::ledger::LedgerError| e.to_string();
    if ledger.pending() > 0 {
        let pending: Vec<_> = ledger
            .pending_records()
            .map_err(err)?
            .iter()
            .map(|r| {
                format!(
                    "{} {:?} batch {} valid_before {}",
                    r.payment_id(),
                    r.status,
                    r.batch_id,
                    r.signed.authorization.valid_before
                )
            })
            .collect();
        let open: Vec<_> = ledger
            .batches(CHAIN_ID)
            .map_err(err)?
            .iter()
            .filter(|b| !b.status.is_final())
            .map(|b| {
                format!(
                    "{} {:?} nonce {:?} attempts {} items {}",
                    b.id(),
                    b.status,
                    b.tx_nonce(),
                    b.attempts.len(),
                    b.items.len()
                )
            })
            .collect();
        return Err(format!(
            "liveness: {} payments still pending after the faults stopped: {pending:?}; open batches {open:?}; chain nonces {:?}; pool {}",
            ledger.pending(),
            head_nonces(world),
            world.pool_len()
        ));
    }
    let watched = ledger.watched().map_err(err)?;
    if !watched.is_empty() {
        let mined = world.mined();
        let what: Vec<_> = watched
            .iter()
            .map(|r| {
                let on_chain = r.tx_hash.and_then(|h| mined.get(&h)).map(|(n, hash, _)| (*n, *hash));
                format!(
                    "{} {:?} tx {:?} block {} {:?}; on chain {on_chain:?}",
                    r.payment_id(),
                    r.status,
                    r.tx_hash,
                    r.block_number,
                    r.block_hash
                )
            })
            .collect();
        return Err(format!(
            "liveness: settled payments never became final: {what:?}; head {}",
            world.head().number
        ));
    }
    let log: Vec<_> =
        ledger.settlement_log(0, usize::MAX).map_err(err)?.into_iter().map(|(_, r)| r).collect();
    // A payment reported failed or expired is final: nothing follows in its log (it never
    // settles after).
    let mut ended: HashMap<_, Status> = HashMap::new();
    for r in &log {
        if let Some(was) = ended.get(&r.payment_id()) {
            return Err(format!(
                "payment {} was {} and then {:?} ({:?})",
                r.payment_id(),
                was.as_str(),
                r.status,
                r.log_entry
            ));
        }
        if matches!(r.status, Status::Failed | Status::Expired) {
            ended.insert(r.payment_id(), r.status);
        }
    }
    let held = books(log);
    let mut once = HashSet::new();
    for r in &held {
        if !once.insert(r.payment_id()) {
            return Err(format!("payment {} has two standing outcomes", r.payment_id()));
        }
    }
    let mut out = Outcome { accepted: accepted.len(), ..Outcome::default() };
    let mined = world.mined();
    let head = world.head();
    // Every transfer our transactions made, canonical.
    let mut paid: HashMap<(Address, B256), (B256, B256)> = HashMap::new();
    let mut uses = HashSet::new();
    for (tx, (_, block_hash, m)) in &mined {
        for u in &m.used {
            if !uses.insert((u.0, u.1)) {
                return Err(format!("authorization {} of {} used twice on chain", u.1, u.0));
            }
            if ours.contains(&m.from) {
                paid.insert((u.0, u.1), (*tx, *block_hash));
            }
        }
    }
    for a in accepted {
        let Some(r) = held.iter().find(|r| r.key() == a.key()) else {
            return Err(format!("payment {} has no outcome", a.payment_id()));
        };
        let auth = (a.signed.authorization.from, a.signed.authorization.nonce);
        match r.status {
            Status::Settled => {
                out.settled += 1;
                let Some((tx, block_hash)) = paid.get(&auth) else {
                    return Err(format!(
                        "payment {} settled in the books (tx {:?} block {} finalized at {}, head {}) but not on chain",
                        r.payment_id(),
                        r.tx_hash,
                        r.block_number,
                        r.finalized_at_ms,
                        head.number
                    ));
                };
                if r.tx_hash != Some(*tx) || r.block_hash != Some(*block_hash) {
                    return Err(format!(
                        "payment {} settled with evidence the chain does not show",
                        r.payment_id()
                    ));
                }
                if r.finalized_at_ms == 0 {
                    return Err(format!("payment {} settled but never final", r.payment_id()));
                }
            }
            Status::Failed | Status::Expired => {
                if r.status == Status::Failed {
                    out.failed += 1
                } else {
                    out.expired += 1
                }
                if let Some((tx, _)) = paid.get(&auth) {
                    let batch = ledger
                        .batches(CHAIN_ID)
                        .map_err(err)?
                        .into_iter()
                        .find(|b| b.attempts.iter().any(|a| a.tx_hash == *tx))
                        .map(|b| format!("{} {:?} items {}", b.id(), b.status, b.items.len()));
                    return Err(format!(
                        "payment {} is {} ({}: {}) in the books but our transaction {tx} (batch {batch:?}, mined in block {}) paid it",
                        r.payment_id(),
                        r.status.as_str(),
                        r.failure_reason,
                        r.failure_message,
                        mined[tx].0
                    ));
                }
            }
            other => return Err(format!("payment {} ended {other:?}", r.payment_id())),
        }
    }
    // Payees: what our transactions moved equals what the books settled.
    let mut moved: HashMap<Address, U256> = HashMap::new();
    for (_, _, m) in mined.values().filter(|(_, _, m)| ours.contains(&m.from)) {
        for u in &m.used {
            *moved.entry(u.3).or_default() += u.4;
        }
    }
    let mut booked: HashMap<Address, U256> = HashMap::new();
    for r in held.iter().filter(|r| r.status == Status::Settled) {
        *booked.entry(r.signed.authorization.to).or_default() += r.value();
    }
    if moved != booked {
        return Err(format!("payees were paid {moved:?} but the books say {booked:?}"));
    }
    // Fee shares of one transaction sum to its fee.
    let mut shares: HashMap<B256, U256> = HashMap::new();
    for r in held.iter().filter(|r| r.status == Status::Settled) {
        *shares.entry(r.tx_hash.unwrap_or_default()).or_default() += r.fee_share_wei;
    }
    for (tx, sum) in shares {
        let (_, _, m) = mined[&tx];
        let fee = U256::from(m.gas_used) * U256::from(m.price);
        if sum != fee {
            return Err(format!("the fee shares of {tx} sum to {sum}, its fee is {fee}"));
        }
    }
    Ok(out)
}

fn head_nonces(world: &World) -> Vec<(Address, u64)> {
    world.head().nonces.iter().map(|(a, n)| (*a, *n)).collect()
}
