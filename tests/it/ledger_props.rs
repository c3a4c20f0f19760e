//! The ledger's invariants hold over random operation sequences: exposure equals the sum of
//! pending values per payer, one record per authorization key, transitions only along the
//! lifecycle, strictly increasing sequence numbers, and all of it survives a reopen. Holds
//! (verified payments reserved for their settlement) reserve their nonce and count in their
//! payer's cover until an acceptance claims them or they lapse, and record nothing. A
//! reopen loses them on RocksDB (they live in memory) and keeps them on PostgreSQL (rows a
//! fleet shares); otherwise the model is the same.
//!
//! The same cases, with the same assertions, run against both backends: RocksDB in a temp
//! dir, and PostgreSQL (a throw-away server this test starts; one schema per case).

use std::collections::HashMap;

use alloy::primitives::{Address, B256, U256};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use x402_batcher::ledger::{
    AcceptOutcome, AcceptRequest, Applied, AuthKey, Command, HoldOutcome, HoldRequest, LedgerStore,
    PgConnect, PgLedger, Refusal, Repeat, RocksLedger, Status, Submission, TransitionRequest,
};
use x402_batcher::tools::postgres::TestPostgres;
use x402_batcher::x402::{Authorization, RawSignature, Reason, SignedAuthorization};

#[derive(Debug, Clone)]
enum Op {
    /// payer, nonce, value, balance, window ok
    Accept {
        payer: u8,
        nonce: u8,
        value: u64,
        balance: u64,
        in_window: bool,
    },
    /// A verification's hold: payer, nonce, value, balance, window ok, with an idempotency key
    Hold {
        payer: u8,
        nonce: u8,
        value: u64,
        balance: u64,
        in_window: bool,
        keyed: bool,
    },
    /// index into the keys seen so far, target status
    Transition {
        pick: prop::sample::Index,
        to: usize,
    },
    /// Time passes (ms).
    Tick(u64),
    Reopen,
}

/// How long a hold lasts in these tests (ms).
const HOLD_MS: u64 = 100;

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..3, 0u8..5, 1u64..5, 0u64..15, prop::bool::weighted(0.9))
            .prop_map(|(payer, nonce, value, balance, in_window)| Op::Accept { payer, nonce, value, balance, in_window }),
        4 => (0u8..3, 0u8..5, 1u64..5, 0u64..15, prop::bool::weighted(0.9), any::<bool>())
            .prop_map(|(payer, nonce, value, balance, in_window, keyed)| Op::Hold { payer, nonce, value, balance, in_window, keyed }),
        4 => (any::<prop::sample::Index>(), 0usize..7).prop_map(|(pick, to)| Op::Transition { pick, to }),
        2 => (1u64..80).prop_map(Op::Tick),
        1 => Just(Op::Reopen),
    ]
}

fn signed(payer: u8, nonce: u8, value: u64) -> SignedAuthorization {
    SignedAuthorization {
        chain_id: 8453,
        token: Address::repeat_byte(0xcc),
        authorization: Authorization {
            from: Address::repeat_byte(payer + 1),
            to: Address::repeat_byte(0xee),
            value: U256::from(value),
            valid_after: U256::ZERO,
            valid_before: U256::from(u64::MAX),
            nonce: B256::with_last_byte(nonce),
        },
        signature: RawSignature::from([0; 65]),
    }
}

/// What `payer` has on hold.
fn held_by(holds: &HashMap<AuthKey, (Authorization, String, u64)>, payer: Address) -> U256 {
    holds.values().filter(|h| h.0.from == payer).map(|h| h.0.value).sum()
}

#[derive(Debug, Clone)]
struct Model {
    status: Status,
    value: U256,
    authorization: Authorization,
}

fn check_invariants(ledger: &dyn LedgerStore, model: &HashMap<AuthKey, Model>) {
    let records = ledger.records().unwrap();
    assert_eq!(records.len(), model.len(), "one record per key, and only accepted ones");
    let mut pending: HashMap<_, U256> = HashMap::new();
    for r in &records {
        let m = &model[&r.key()];
        assert_eq!(r.status, m.status, "status of {:?}", r.payment_id());
        assert_eq!(r.signed.authorization, m.authorization);
        if !r.status.is_final() {
            *pending.entry(r.key().payer()).or_default() += r.value();
        }
    }
    let mut exposures: HashMap<_, U256> = ledger.exposures().unwrap().into_iter().collect();
    exposures.retain(|_, v| !v.is_zero());
    pending.retain(|_, v| !v.is_zero());
    assert_eq!(exposures, pending, "exposure equals the sum of pending values");
    let open = records.iter().filter(|r| !r.status.is_final()).count() as u64;
    assert_eq!(ledger.pending(), open, "the pending count matches the records");
    let indexed: Vec<AuthKey> = ledger.pending_records().unwrap().iter().map(|r| r.key()).collect();
    let mut expected: Vec<AuthKey> =
        records.iter().filter(|r| !r.status.is_final()).map(|r| r.key()).collect();
    expected.sort();
    assert_eq!(indexed, expected, "the pending index holds exactly the non-final payments");

    let events = ledger.events_after(0, usize::MAX).unwrap();
    assert_eq!(events.len() as u64, ledger.last_seq(), "one event per change, numbered from 1");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "sequence numbers are dense and increasing");
    }
    for r in &records {
        assert_eq!(events[r.seq as usize - 1], *r, "a record's latest event is the record");
    }
    let log = ledger.settlement_log(0, usize::MAX).unwrap();
    assert_eq!(log.len() as u64, ledger.last_settlement(), "one settlement log entry per number");
    for (i, (n, r)) in log.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "settlement log numbers are dense and increasing");
        assert_eq!(events[r.seq as usize - 1], *r, "a log entry's record is the change it follows");
    }
}

/// Cases per backend.
const CASES: u32 = 48;

fn strategy() -> impl Strategy<Value = (Vec<Op>, Vec<usize>)> {
    (prop::collection::vec(arb_op(), 1..60), prop::collection::vec(1usize..5, 60))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_on_rocksdb((ops, group_sizes) in strategy()) {
        let dir = tempfile::tempdir().unwrap();
        let open = || -> Box<dyn LedgerStore> { Box::new(RocksLedger::open(dir.path()).unwrap()) };
        run_case(&open, ops, group_sizes, Holds::InMemory)?;
    }
}

#[test]
fn invariants_hold_on_postgres() {
    let pg = TestPostgres::start().unwrap();
    let case = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases: CASES,
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&strategy(), |(ops, group_sizes)| {
            let schema = format!("case{}", case.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
            let url = pg.schema_url(&schema).unwrap();
            let open = || -> Box<dyn LedgerStore> {
                Box::new(PgLedger::open(PgConnect::new(&url, None).unwrap()).unwrap())
            };
            run_case(&open, ops, group_sizes, Holds::Stored)
        })
        .unwrap();
}

/// Where a backend keeps its holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// In memory (RocksDB): a reopen loses them.
    InMemory,
    /// In the database (PostgreSQL, shared by a fleet): a reopen keeps them.
    Stored,
}

/// Applies `ops` in groups (sizes from `group_sizes`) to a ledger from `open` and to a
/// model, and checks every answer and the invariants after each group.
fn run_case(
    open: &dyn Fn() -> Box<dyn LedgerStore>,
    ops: Vec<Op>,
    group_sizes: Vec<usize>,
    kept: Holds,
) -> Result<(), TestCaseError> {
    let mut ledger = open();
    let mut model: HashMap<AuthKey, Model> = HashMap::new();
    let mut keys: Vec<AuthKey> = Vec::new();
    // Live holds: key -> (authorization, idempotency key, expiry). Lost on a reopen when
    // the backend keeps them in memory, like the ledger's.
    let mut holds: HashMap<AuthKey, (Authorization, String, u64)> = HashMap::new();
    let mut now = 1u64;

    let mut ops = ops.into_iter().peekable();
    let mut sizes = group_sizes.into_iter().cycle();
    while ops.peek().is_some() {
        if let Some(Op::Reopen) = ops.peek() {
            ops.next();
            drop(ledger);
            ledger = open();
            if kept == Holds::InMemory {
                holds.clear();
            }
            check_invariants(&*ledger, &model);
            prop_assert_eq!(ledger.holds(), holds.len(), "the holds after the reopen are the model's");
            continue;
        }
        if let Some(Op::Tick(ms)) = ops.peek() {
            now += ms;
            ops.next();
            continue;
        }
        // A group of commands, applied against the model in the same order.
        let mut commands = Vec::new();
        let mut expect = Vec::new();
        let mut overlay = model.clone();
        let mut held = holds.clone();
        let mut exposure: HashMap<_, U256> = HashMap::new();
        for m in overlay.values() {
            if !m.status.is_final() {
                *exposure.entry(m.authorization.from).or_default() += m.value;
            }
        }
        for _ in 0..sizes.next().unwrap() {
            let Some(op) = ops.next_if(|o| !matches!(o, Op::Reopen | Op::Tick(_))) else { break };
            match op {
                Op::Accept { payer, nonce, value, balance, in_window } => {
                    let s = signed(payer, nonce, value);
                    let key = AuthKey::of(&s);
                    let window = if in_window {
                        Ok(())
                    } else {
                        Err(Refusal::new(Reason::InvalidPaymentRequirements, "outside the window"))
                    };
                    held.retain(|_, h| h.2 > now);
                    let outcome = match (overlay.get(&key), held.get(&key)) {
                        (Some(m), _) if m.authorization == s.authorization => "duplicate",
                        (Some(_), _) => "nonce_used",
                        (None, Some(h)) if h.0 != s.authorization => "nonce_used",
                        (None, live) => {
                            // Claimed, whatever follows.
                            if live.is_some() {
                                held.remove(&key);
                            }
                            let on_hold = held_by(&held, s.authorization.from);
                            let e = exposure.entry(s.authorization.from).or_default();
                            if !in_window {
                                "window"
                            } else if *e + on_hold + U256::from(value) > U256::from(balance) {
                                "insufficient"
                            } else {
                                *e += U256::from(value);
                                overlay.insert(
                                    key,
                                    Model {
                                        status: Status::Accepted,
                                        value: U256::from(value),
                                        authorization: s.authorization.clone(),
                                    },
                                );
                                keys.push(key);
                                "accepted"
                            }
                        }
                    };
                    expect.push(outcome);
                    commands.push(
                        Command::accept(AcceptRequest {
                            signed: s,
                            submission: Submission { network: "eip155:8453".into(), ..Submission::default() },
                            balance: U256::from(balance),
                            window,
                            now_ms: now,
                        })
                        .0,
                    );
                }
                Op::Hold { payer, nonce, value, balance, in_window, keyed } => {
                    let s = signed(payer, nonce, value);
                    let key = AuthKey::of(&s);
                    let idem = if keyed { format!("pay-{payer}-{nonce}-{value}") } else { String::new() };
                    let window = if in_window {
                        Ok(())
                    } else {
                        Err(Refusal::new(Reason::InvalidPaymentRequirements, "outside the window"))
                    };
                    held.retain(|_, h| h.2 > now);
                    let outcome = match (overlay.get(&key), held.get(&key)) {
                        // Accepted without a key: a verification of it is a replay.
                        (Some(m), _) if m.authorization == s.authorization => "recorded_replay",
                        (Some(_), _) => "nonce_used",
                        (None, Some(h)) if h.0 == s.authorization && keyed && h.1 == idem => "held",
                        (None, Some(_)) => "nonce_used",
                        (None, None) => {
                            let on_hold = held_by(&held, s.authorization.from);
                            let e = exposure.get(&s.authorization.from).copied().unwrap_or_default();
                            if !in_window {
                                "window"
                            } else if e + on_hold + U256::from(value) > U256::from(balance) {
                                "insufficient"
                            } else {
                                held.insert(key, (s.authorization.clone(), idem.clone(), now + HOLD_MS));
                                "held"
                            }
                        }
                    };
                    expect.push(outcome);
                    let accept = AcceptRequest {
                        signed: s,
                        submission: Submission {
                            network: "eip155:8453".into(),
                            idempotency_key: idem,
                            ..Submission::default()
                        },
                        balance: U256::from(balance),
                        window,
                        now_ms: now,
                    };
                    commands.push(Command::hold(HoldRequest { accept, hold_ms: HOLD_MS }).0);
                }
                Op::Transition { pick, to } => {
                    let key = if keys.is_empty() { AuthKey::of(&signed(9, 9, 1)) } else { *pick.get(&keys) };
                    let to = Status::ALL[to];
                    let outcome = match overlay.get_mut(&key) {
                        None => "not_found",
                        Some(m) if !m.status.can_move_to(to) => "illegal",
                        Some(m) => {
                            if to.is_final() {
                                *exposure.get_mut(&m.authorization.from).unwrap() -= m.value;
                            }
                            m.status = to;
                            "moved"
                        }
                    };
                    expect.push(outcome);
                    commands.push(Command::transition(TransitionRequest::new(key, to, 2)).0);
                }
                Op::Reopen | Op::Tick(_) => unreachable!(),
            }
        }
        let results = ledger.apply_group(&commands).results;
        for (result, expected) in results.iter().zip(&expect) {
            let got = match result {
                Ok(Applied::Accept(AcceptOutcome::Accepted(_))) => "accepted",
                Ok(Applied::Accept(AcceptOutcome::Duplicate(..))) => "duplicate",
                Ok(Applied::Accept(AcceptOutcome::Refused { reason: Reason::NonceAlreadyUsed, .. })) => {
                    "nonce_used"
                }
                Ok(Applied::Accept(AcceptOutcome::Refused { reason: Reason::InsufficientFunds, .. })) => {
                    "insufficient"
                }
                Ok(Applied::Accept(AcceptOutcome::Refused {
                    reason: Reason::InvalidPaymentRequirements,
                    ..
                })) => "window",
                Ok(Applied::Hold(HoldOutcome::Held { .. })) => "held",
                Ok(Applied::Hold(HoldOutcome::Recorded(_, Repeat::Replay))) => "recorded_replay",
                Ok(Applied::Hold(HoldOutcome::Refused { reason: Reason::NonceAlreadyUsed, .. })) => {
                    "nonce_used"
                }
                Ok(Applied::Hold(HoldOutcome::Refused { reason: Reason::InsufficientFunds, .. })) => {
                    "insufficient"
                }
                Ok(Applied::Hold(HoldOutcome::Refused {
                    reason: Reason::InvalidPaymentRequirements,
                    ..
                })) => "window",
                Ok(Applied::Transition(_)) => "moved",
                Err(x402_batcher::ledger::LedgerError::NotFound(_)) => "not_found",
                Err(x402_batcher::ledger::LedgerError::IllegalTransition { .. }) => "illegal",
                other => panic!("unexpected result {other:?}"),
            };
            prop_assert_eq!(got, *expected);
        }
        model = overlay;
        holds = held;
        check_invariants(&*ledger, &model);
        prop_assert_eq!(ledger.holds(), holds.len(), "the live holds are the model's");
    }
    Ok(())
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    drop(RocksLedger::open(dir.path()).unwrap());
    {
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&opts, dir.path(), cfs).unwrap();
        db.put_cf(db.cf_handle("meta").unwrap(), b"schema_version", 99u32.to_be_bytes()).unwrap();
    }
    let err = RocksLedger::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("schema version 99") && err.contains("newer"), "{err}");
}

#[test]
fn a_newer_postgres_schema_is_refused_with_a_clear_message_and_nothing_changes() {
    let pg = TestPostgres::start().unwrap();
    let connect = PgConnect::new(&pg.url(), None).unwrap();
    drop(PgLedger::open(connect.clone()).unwrap());
    pg.sql("UPDATE ledger_meta SET value = 99 WHERE name = 'schema_version'").unwrap();
    let err = PgLedger::open(connect.clone()).unwrap_err().to_string();
    assert!(err.contains("schema version 99") && err.contains("newer"), "{err}");
    assert!(!err.contains("password"), "{err}");
    let err = PgLedger::open_read_only(connect).unwrap_err().to_string();
    assert!(err.contains("schema version 99"), "{err}");
    assert_eq!(pg.sql("SELECT value FROM ledger_meta WHERE name = 'schema_version'").unwrap(), "99");
}

/// Schema 1 (before the holds were shared, and records numbered inside) is upgraded by the
/// first daemon opening it; a reader (export, reconcile) does not upgrade, and says so; a
/// daemon of schema 1 still running cannot write beside the upgraded ones.
#[test]
fn a_postgres_schema_1_ledger_is_upgraded_in_place() {
    let pg = TestPostgres::start().unwrap();
    let connect = PgConnect::new(&pg.url(), None).unwrap();
    drop(PgLedger::open(connect.clone()).unwrap());
    pg.sql(
        "DROP TABLE ledger_holds; ALTER TABLE ledger_settlement DROP COLUMN change; \
         ALTER TABLE ledger_feed DROP COLUMN written_by; \
         UPDATE ledger_meta SET value = 1 WHERE name = 'schema_version'",
    )
    .unwrap();
    // A change written by a schema-1 daemon (its statement), before the upgrade.
    let v1_insert =
        "INSERT INTO ledger_feed (seq, record) SELECT * FROM unnest(ARRAY[7]::bigint[], ARRAY['\\x'::bytea])";
    pg.sql(v1_insert).unwrap();
    let err = PgLedger::open_read_only(connect.clone()).unwrap_err().to_string();
    assert!(err.contains("schema version 1"), "{err}");
    let ledger = PgLedger::open(connect).unwrap();
    assert_eq!(ledger.holds(), 0);
    assert_eq!(pg.sql("SELECT value FROM ledger_meta WHERE name = 'schema_version'").unwrap(), "3");
    assert_eq!(pg.sql("SELECT count(*) FROM ledger_holds").unwrap(), "0");
    assert_eq!(pg.sql("SELECT count(change) FROM ledger_settlement").unwrap(), "0");
    // A schema-1 daemon still running cannot write a change any more (it takes no payer
    // locks): its statement fails, nothing is written.
    let err = pg.sql(&v1_insert.replace("[7]", "[8]")).unwrap_err().to_string();
    assert!(err.contains("written_by"), "{err}");
    assert_eq!(pg.sql("SELECT string_agg(seq || ':' || written_by, ',') FROM ledger_feed").unwrap(), "7:1");
}

#[test]
fn a_schema_1_ledger_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let v1 = ["auth", "seq", "id", "idem", "exposure", "meta", "pending"];
        let db = rocksdb::DB::open_cf(&opts, dir.path(), v1).unwrap();
        db.put_cf(db.cf_handle("meta").unwrap(), b"schema_version", 1u32.to_be_bytes()).unwrap();
    }
    let ledger = RocksLedger::open(dir.path()).unwrap();
    assert_eq!(ledger.last_settlement(), 0);
    assert!(ledger.batches(1).unwrap().is_empty());
    drop(ledger);
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap();
    assert!(cfs.iter().any(|c| c == "batch") && cfs.iter().any(|c| c == "settlement"), "{cfs:?}");
}

/// A settled payment past the confirmation depth: watched until final; a correction and a
/// reversal are new settlement log entries (the reversal carries the settlement it undoes),
/// a reversed payment is pending again (exposure, pending count), settles anew, and once
/// finalized nothing moves it. The books fold the log to one settlement.
#[test]
fn a_settled_payment_is_corrected_reversed_settled_again_and_finalized_every_step_logged() {
    let dir = tempfile::tempdir().unwrap();
    corrected_reversed_settled_again_and_finalized(&|| Box::new(RocksLedger::open(dir.path()).unwrap()));
    let pg = TestPostgres::start().unwrap();
    let url = pg.url();
    corrected_reversed_settled_again_and_finalized(&|| {
        Box::new(PgLedger::open(PgConnect::new(&url, None).unwrap()).unwrap())
    });
}

fn corrected_reversed_settled_again_and_finalized(open: &dyn Fn() -> Box<dyn LedgerStore>) {
    use x402_batcher::ledger::{Evidence, LogEntry, books};
    let mut ledger = open();
    let s = signed(1, 1, 500);
    let key = AuthKey::of(&s);
    let accept = AcceptRequest {
        signed: s,
        submission: Submission { network: "eip155:8453".into(), ..Submission::default() },
        balance: U256::from(1_000u64),
        window: Ok(()),
        now_ms: 1,
    };
    let run = |ledger: &mut Box<dyn LedgerStore>, t: TransitionRequest| match &ledger
        .apply_group(&[Command::transition(t).0])
        .results[0]
    {
        Ok(Applied::Transition(r)) => Ok(r.clone()),
        Err(e) => Err(e.to_string()),
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        ledger.apply_group(&[Command::accept(accept).0]).results[0],
        Ok(Applied::Accept(AcceptOutcome::Accepted(_)))
    ));
    let step = |to: Status, only_from: Status| {
        let mut t = TransitionRequest::new(key, to, 10);
        t.only_from = Some(only_from);
        t
    };
    let evidence = |block: u64| Evidence {
        tx_hash: B256::repeat_byte(7),
        block_number: block,
        block_hash: B256::repeat_byte(block as u8),
        block_time: 1_000 + block,
        log_index: 3,
        gas_share: 45_000,
        fee_share_wei: U256::from(9),
    };
    let mut included = step(Status::Included, Status::Accepted);
    included.evidence = Some(evidence(10));
    run(&mut ledger, included).unwrap();
    run(&mut ledger, step(Status::Settled, Status::Included)).unwrap();
    assert_eq!(ledger.watched().unwrap().len(), 1, "settled, not yet final: watched");
    assert_eq!((ledger.pending(), ledger.exposure(&key.payer()).unwrap()), (0, U256::ZERO));
    assert!(
        run(&mut ledger, TransitionRequest::new(key, Status::Accepted, 10)).is_err(),
        "only as decided on a settled read"
    );
    assert!(
        run(&mut ledger, step(Status::Settled, Status::Settled)).is_err(),
        "a correction brings its evidence"
    );

    // A reorg mined it again in block 12: corrected.
    let mut correction = step(Status::Settled, Status::Settled);
    correction.evidence = Some(evidence(12));
    let r = run(&mut ledger, correction).unwrap();
    assert_eq!((r.block_number, r.log_entry, r.status), (12, LogEntry::Corrected, Status::Settled));
    assert_eq!(ledger.watched().unwrap().len(), 1, "still watched");

    // A deeper one removed it: reversed, pending again, owed again.
    let r = run(&mut ledger, step(Status::Accepted, Status::Settled)).unwrap();
    assert_eq!((r.status, r.tx_hash, r.log_entry), (Status::Accepted, None, LogEntry::Reversed));
    assert!(ledger.watched().unwrap().is_empty());
    assert_eq!((ledger.pending(), ledger.exposure(&key.payer()).unwrap()), (1, U256::from(500u64)));

    // Settled again by another transaction, then final.
    let mut again = step(Status::Included, Status::Accepted);
    again.evidence = Some(evidence(20));
    run(&mut ledger, again).unwrap();
    run(&mut ledger, step(Status::Settled, Status::Included)).unwrap();
    let mut finalize = step(Status::Settled, Status::Settled);
    finalize.finalize = true;
    finalize.now_ms = 99;
    let r = run(&mut ledger, finalize.clone()).unwrap();
    assert_eq!((r.finalized_at_ms, r.log_entry), (99, LogEntry::Finalized));
    assert!(ledger.watched().unwrap().is_empty(), "final: watched no more");
    assert!(run(&mut ledger, finalize).is_err(), "final once");
    assert!(
        run(&mut ledger, step(Status::Accepted, Status::Settled)).is_err(),
        "a final settlement never moves"
    );

    // The log, append-only: settled, corrected, reversed (the settlement undone), settled,
    // finalized; the books hold one settlement, the final one.
    drop(ledger);
    let ledger = open();
    let log: Vec<_> = ledger.settlement_log(0, usize::MAX).unwrap().into_iter().map(|(_, r)| r).collect();
    let entries: Vec<_> = log.iter().map(|r| (r.log_entry, r.status, r.block_number)).collect();
    assert_eq!(
        entries,
        [
            (LogEntry::Outcome, Status::Settled, 10),
            (LogEntry::Corrected, Status::Settled, 12),
            (LogEntry::Reversed, Status::Settled, 12),
            (LogEntry::Outcome, Status::Settled, 20),
            (LogEntry::Finalized, Status::Settled, 20),
        ]
    );
    let held = books(log);
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].block_number, held[0].finalized_at_ms), (20, 99));
    assert_eq!(ledger.pending(), 0);

    // The change feed says which entry each change wrote (none for the steps between), so
    // a consumer crediting outcomes and taking back reversals credits the payment once.
    let feed: Vec<_> =
        ledger.events_after(0, usize::MAX).unwrap().into_iter().map(|r| (r.change_entry, r.status)).collect();
    assert_eq!(
        feed,
        [
            (None, Status::Accepted),
            (None, Status::Included),
            (Some(LogEntry::Outcome), Status::Settled),
            (Some(LogEntry::Corrected), Status::Settled),
            (Some(LogEntry::Reversed), Status::Accepted),
            (None, Status::Included),
            (Some(LogEntry::Outcome), Status::Settled),
            (Some(LogEntry::Finalized), Status::Settled),
        ]
    );
}

/// The same history read back over gRPC: `WatchPayments` from 0 on a daemon serving that
/// ledger. A consumer that credits on every `SETTLED` event would credit the payment four
/// times; one following the documented rule (credit an OUTCOME with status SETTLED, take
/// back a REVERSED) credits it once, on a full replay and on one resumed midway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_payments_consumer_following_the_entries_credits_a_reorged_payment_once() {
    use x402_batcher::api::v1::{self, SettlementEntry};
    tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let ledger_dir = dir.path().join("ledger");
        corrected_reversed_settled_again_and_finalized(&|| Box::new(RocksLedger::open(&ledger_dir).unwrap()));
        let net = x402_batcher::tools::devnet::Devnet::start().await.unwrap();
        let mut config = x402_batcher::config::Config::parse("").unwrap();
        config.tokens.push(net.token_config());
        config.chains.push(net.chain_config());
        config.ledger.path = Some(ledger_dir.clone());
        let listeners = x402_batcher::daemon::Listeners::loopback().await.unwrap();
        let url = format!("http://{}", listeners.api.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let clock = std::sync::Arc::new(x402_batcher::clock::SystemClock);
        let serving = tokio::spawn(x402_batcher::daemon::serve(config, listeners, clock, async {
            let _ = stopped.await;
        }));

        let events = |after_seq: u64| {
            let url = url.clone();
            async move {
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
                let mut client = loop {
                    match x402_batcher::client::Client::connect(url.clone()).await {
                        Ok(c) => break c,
                        Err(_) if tokio::time::Instant::now() < deadline => {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                };
                let request = v1::WatchPaymentsRequest { after_seq, statuses: Vec::new() };
                let mut stream = client.payments.watch_payments(request).await.unwrap().into_inner();
                let mut out = Vec::new();
                // The history has 8 changes; the stream then waits for more.
                while out.last().is_none_or(|e: &v1::PaymentEvent| e.seq < 8) {
                    out.push(stream.message().await.unwrap().expect("the stream stays open"));
                }
                out
            }
        };
        let credit = |events: &[v1::PaymentEvent], credited: &mut HashMap<String, i64>| {
            for e in events {
                let p = e.payment.as_ref().unwrap();
                let settled = p.status == v1::PaymentStatus::Settled as i32;
                let delta = match e.entry() {
                    SettlementEntry::Outcome if settled => 1,
                    SettlementEntry::Reversed => -1,
                    _ => 0,
                };
                *credited.entry(p.payment_id.clone()).or_default() += delta;
            }
        };

        let all = events(0).await;
        let entries: Vec<_> = all.iter().map(|e| e.entry()).collect();
        assert_eq!(
            entries,
            [
                SettlementEntry::None,
                SettlementEntry::None,
                SettlementEntry::Outcome,
                SettlementEntry::Corrected,
                SettlementEntry::Reversed,
                SettlementEntry::None,
                SettlementEntry::Outcome,
                SettlementEntry::Finalized,
            ]
        );
        let settled_events = all
            .iter()
            .filter(|e| e.payment.as_ref().unwrap().status == v1::PaymentStatus::Settled as i32)
            .count();
        assert_eq!(settled_events, 4, "a consumer crediting every SETTLED event would credit four times");
        let mut credited = HashMap::new();
        credit(&all, &mut credited);
        assert_eq!(credited.values().copied().collect::<Vec<_>>(), [1], "a full replay credits once");
        // Stopped after the first settlement, resumed after the last seq it applied.
        let mut resumed = HashMap::new();
        credit(&all[..3], &mut resumed);
        credit(&events(all[2].seq).await, &mut resumed);
        assert_eq!(resumed, credited, "a resumed consumer credits once");

        let _ = stop.send(());
        serving.await.unwrap().unwrap();
    })
    .await
    .expect("bounded");
}
