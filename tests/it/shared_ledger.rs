//! Several daemons' ledgers on one PostgreSQL database (a throw-away server): each its own
//! store and writer, as separate daemons would have. Concurrent acceptances for one payer
//! never overspend it together, a nonce is recorded once whichever daemon sees it first, an
//! idempotency key names one payment whichever payers' payments race for it,
//! and the change feed read from any of them is the same gap-free sequence, even while
//! they all write. A facilitator's hold placed through one daemon holds on all of them.
//! Settler accounts are divided by leases whose lost holder cannot write, and a batch
//! number is taken once. A group naming more payers than the server's lock table holds
//! fails whole.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use x402_batcher::ledger::{
    AcceptOutcome, AcceptRequest, ApplyRequest, BatchRecord, BatchStatus, Command, Fence, HoldOutcome,
    HoldRequest, LedgerError, LedgerHandle, LedgerStore, PgConnect, PgLedger, Repeat, Status, Submission,
    TransitionRequest,
};
use x402_batcher::tools::postgres::TestPostgres;
use x402_batcher::x402::{Authorization, RawSignature, Reason, SignedAuthorization};

const LIMIT: Duration = Duration::from_secs(120);

fn signed(payer: u64, nonce: u64, value: u64) -> SignedAuthorization {
    let mut from = [0u8; 20];
    from[12..].copy_from_slice(&(payer + 1).to_be_bytes());
    SignedAuthorization {
        chain_id: 8453,
        token: Address::repeat_byte(0xcc),
        authorization: Authorization {
            from: Address::from(from),
            to: Address::repeat_byte(0xee),
            value: U256::from(value),
            valid_after: U256::ZERO,
            valid_before: U256::from(u64::MAX),
            nonce: B256::from(U256::from(nonce)),
        },
        signature: RawSignature::from([0; 65]),
    }
}

fn accept(signed: SignedAuthorization, balance: u64) -> AcceptRequest {
    AcceptRequest {
        signed,
        submission: Submission { network: "eip155:8453".into(), ..Submission::default() },
        balance: U256::from(balance),
        window: Ok(()),
        now_ms: 1,
    }
}

/// `n` daemons' ledgers (store + writer) on one new schema of `pg`.
fn fleet(pg: &TestPostgres, n: usize) -> Vec<LedgerHandle> {
    fleet_on(&pg.new_schema_url().unwrap(), n)
}

/// `n` daemons' ledgers on the schema `url` names.
fn fleet_on(url: &str, n: usize) -> Vec<LedgerHandle> {
    (0..n)
        .map(|_| {
            let store: Arc<dyn LedgerStore> =
                Arc::new(PgLedger::open(PgConnect::new(url, None).unwrap()).unwrap());
            LedgerHandle::start(store, 4096).unwrap().0
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_payments_over_three_daemons_against_a_balance_of_ten_accept_exactly_ten() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        for round in 0..5u64 {
            let daemons = fleet(&pg, 3);
            let answers = futures::future::join_all((0..20u64).map(|i| {
                let d = daemons[i as usize % 3].clone();
                async move { d.accept(accept(signed(round, i, 1), 10)).await.unwrap() }
            }))
            .await;
            let accepted = answers.iter().filter(|a| matches!(a, AcceptOutcome::Accepted(_))).count();
            let refused = answers
                .iter()
                .filter(|a| matches!(a, AcceptOutcome::Refused { reason: Reason::InsufficientFunds, .. }))
                .count();
            assert_eq!((accepted, refused), (10, 10), "round {round}: {answers:?}");
            for d in &daemons {
                let ledger = d.ledger();
                assert_eq!(ledger.records().unwrap().len(), 10);
                let payer = x402_batcher::ledger::AuthKey::of(&signed(round, 0, 1)).payer();
                assert_eq!(ledger.exposure(&payer).unwrap(), U256::from(10));
            }
        }
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nonce_sent_to_every_daemon_at_once_is_recorded_once() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        let daemons = fleet(&pg, 3);
        for nonce in 0..20u64 {
            // The same authorization to all three, and a different one under the same nonce.
            let mut sends: Vec<_> = daemons
                .iter()
                .map(|d| {
                    let d = d.clone();
                    tokio::spawn(async move { d.accept(accept(signed(7, nonce, 5), 1_000)).await.unwrap() })
                })
                .collect();
            let other = daemons[(nonce % 3) as usize].clone();
            sends.push(tokio::spawn(async move {
                other.accept(accept(signed(7, nonce, 6), 1_000)).await.unwrap()
            }));
            let answers: Vec<_> =
                futures::future::join_all(sends).await.into_iter().map(Result::unwrap).collect();
            let new = answers.iter().filter(|a| matches!(a, AcceptOutcome::Accepted(_))).count();
            let replays = answers
                .iter()
                .filter(|a| matches!(a, AcceptOutcome::Duplicate(_, Repeat::Replay | Repeat::Retry)))
                .count();
            let double = answers
                .iter()
                .filter(|a| matches!(a, AcceptOutcome::Refused { reason: Reason::NonceAlreadyUsed, .. }))
                .count();
            assert_eq!(new, 1, "nonce {nonce}: {answers:?}");
            assert_eq!(new + replays + double, 4, "nonce {nonce}: {answers:?}");
        }
        let records = daemons[0].ledger().records().unwrap();
        assert_eq!(records.len(), 20, "one record per nonce");
    })
    .await
    .expect("bounded");
}

/// One idempotency key on payments of different payers (locked apart), sent to every
/// daemon at once: exactly one is recorded under it, the others are refused for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_on_payments_of_different_payers_names_exactly_one() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        let daemons = fleet(&pg, 3);
        for round in 0..20u64 {
            let sends: Vec<_> = (0..6u64)
                .map(|i| {
                    let d = daemons[(i % 3) as usize].clone();
                    let mut req = accept(signed(100 + round * 10 + i, round, 1), 10);
                    req.submission.idempotency_key = format!("order-{round}");
                    tokio::spawn(async move { d.accept(req).await.unwrap() })
                })
                .collect();
            let answers: Vec<_> =
                futures::future::join_all(sends).await.into_iter().map(Result::unwrap).collect();
            let accepted = answers.iter().filter(|a| matches!(a, AcceptOutcome::Accepted(_))).count();
            let refused = answers
                .iter()
                .filter(|a| {
                    matches!(a, AcceptOutcome::Refused { reason: Reason::InvalidPayload, message }
                        if message.contains("already names"))
                })
                .count();
            assert_eq!((accepted, refused), (1, 5), "round {round}: {answers:?}");
        }
        assert_eq!(daemons[0].ledger().records().unwrap().len(), 20);
    })
    .await
    .expect("bounded");
}

/// A fleet-wide periodic task (the nonce audit) is taken by one daemon per interval: of
/// three asking at once, exactly one gets the turn; none gets another before the interval
/// has passed; then one does again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_task_is_taken_by_one_daemon_per_interval() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        let daemons = fleet(&pg, 3);
        let ask = |every_ms: u64| {
            let asks = daemons.iter().map(move |d| {
                let ledger = Arc::clone(d.ledger());
                tokio::task::spawn_blocking(move || {
                    ledger.fleet().unwrap().claim_turn("audit", every_ms).unwrap()
                })
            });
            async move {
                futures::future::join_all(asks).await.into_iter().filter(|t| *t.as_ref().unwrap()).count()
            }
        };
        assert_eq!(ask(60_000).await, 1, "one turn among three");
        assert_eq!(ask(60_000).await, 0, "none again within the interval");
        let started = std::time::Instant::now();
        let mut turns = 0;
        while turns == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "a turn once the interval passed");
            tokio::time::sleep(Duration::from_millis(20)).await;
            turns = ask(100).await;
        }
        assert_eq!(turns, 1);
        let rocks = tempfile::tempdir().unwrap();
        let alone = x402_batcher::ledger::RocksLedger::open(rocks.path()).unwrap();
        assert!(alone.fleet().is_none(), "one daemon's ledger: no turns to share (the audit always runs)");
    })
    .await
    .expect("bounded");
}

/// A verification's hold (`/verify`) placed through one daemon holds on every other: the
/// same header verified elsewhere is refused (its nonce is held), the payer's cover counts
/// it everywhere, any daemon's acceptance (`/settle`) claims it, and once lapsed it is gone
/// for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_placed_through_one_daemon_holds_on_every_daemon() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        let url = pg.new_schema_url().unwrap();
        let d = fleet_on(&url, 3);
        let at = |signed, now_ms| AcceptRequest { now_ms, ..accept(signed, 10) };
        let hold = |signed, now_ms| HoldRequest { accept: at(signed, now_ms), hold_ms: 1_000 };
        let held = |o: &HoldOutcome| matches!(o, HoldOutcome::Held { .. });

        let first = d[0].hold(hold(signed(1, 1, 6), 10)).await.unwrap();
        assert!(held(&first), "{first:?}");
        for other in &d[1..] {
            match other.hold(hold(signed(1, 1, 6), 20)).await.unwrap() {
                HoldOutcome::Refused { reason: Reason::NonceAlreadyUsed, message } => {
                    assert!(message.contains("held by a verification"), "{message}")
                }
                other => panic!("the same header verified on another daemon: {other:?}"),
            }
        }
        // The payer's cover (balance 10) counts the 6 held on daemon 0.
        match d[2].hold(hold(signed(1, 2, 5), 30)).await.unwrap() {
            HoldOutcome::Refused { reason: Reason::InsufficientFunds, message } => {
                assert!(message.contains("6 held"), "{message}")
            }
            other => panic!("5 more on top of 6 held: {other:?}"),
        }
        let second = d[2].hold(hold(signed(1, 2, 4), 40)).await.unwrap();
        assert!(held(&second), "4 fits: {second:?}");
        assert_eq!(d[2].ledger().holds(), 2, "both daemons' holds");

        // Settled through daemon 1: claims daemon 0's hold; the other stays held.
        let accepted = d[1].accept(at(signed(1, 1, 6), 50)).await.unwrap();
        assert!(matches!(accepted, AcceptOutcome::Accepted(_)), "{accepted:?}");
        assert_eq!(d[1].ledger().holds(), 1, "claimed");
        match d[0].accept(at(signed(1, 3, 1), 60)).await.unwrap() {
            AcceptOutcome::Refused { reason: Reason::InsufficientFunds, .. } => {}
            other => panic!("6 pending + 4 held + 1 > 10: {other:?}"),
        }

        // Lapsed (held until 1040): gone for every daemon; its nonce is free again.
        let again = d[0].hold(hold(signed(1, 2, 3), 2_000)).await.unwrap();
        assert!(held(&again), "another authorization under the lapsed hold's nonce: {again:?}");
        assert_eq!(d[0].ledger().holds(), 1, "the lapsed one deleted, the new one held");
        for daemon in &d {
            daemon.stop();
        }
        // Rows in the database: a daemon starting now sees the live one.
        let fresh = PgLedger::open(PgConnect::new(&url, None).unwrap()).unwrap();
        assert_eq!(fresh.holds(), 1);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_is_gap_free_and_the_same_from_every_daemon_while_they_all_write() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        let daemons = fleet(&pg, 3);
        let (per_daemon, readers) = (400u64, 3);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Readers follow the feed from cursor 0 on each daemon while the writes go on: a
        // later number seen before an earlier one would show as a gap.
        let followers: Vec<_> = (0..readers)
            .map(|r| {
                let ledger = Arc::clone(daemons[r].ledger());
                let done = Arc::clone(&done);
                tokio::task::spawn_blocking(move || {
                    let mut seen: Vec<u64> = Vec::new();
                    loop {
                        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                        let after = seen.last().copied().unwrap_or(0);
                        let batch = ledger.events_after(after, 97).unwrap();
                        for e in &batch {
                            assert_eq!(e.seq, seen.len() as u64 + 1, "reader {r}: a gap after {after}");
                            seen.push(e.seq);
                        }
                        if finished && batch.is_empty() {
                            return seen;
                        }
                    }
                })
            })
            .collect();
        let writers = daemons.iter().enumerate().map(|(i, d)| {
            let d = d.clone();
            async move {
                let sends = (0..per_daemon).map(|n| {
                    let d = d.clone();
                    async move { d.accept(accept(signed(100 + i as u64, n, 1), u64::MAX)).await.unwrap() }
                });
                let answers = futures::future::join_all(sends).await;
                assert!(answers.iter().all(|a| matches!(a, AcceptOutcome::Accepted(_))));
            }
        });
        futures::future::join_all(writers).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let total = 3 * per_daemon;
        let feeds: Vec<Vec<_>> =
            daemons.iter().map(|d| d.ledger().events_after(0, usize::MAX).unwrap()).collect();
        for f in &feeds {
            assert_eq!(f.len() as u64, total);
            assert!(f.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1), "dense from 1");
            assert_eq!(f, &feeds[0], "the same sequence from every daemon");
        }
        for follower in followers {
            assert_eq!(follower.await.unwrap().len() as u64, total, "a follower saw every change, in order");
        }
    })
    .await
    .expect("bounded");
}

fn batch(counter: u64, settler: Address, items: Vec<x402_batcher::ledger::AuthKey>) -> BatchRecord {
    BatchRecord {
        chain_id: 8453,
        counter,
        token: Address::repeat_byte(0xcc),
        settler,
        items,
        cut_reason: "size".into(),
        status: BatchStatus::Signed,
        attempts: Vec::new(),
        created_at_ms: 1,
        updated_at_ms: 1,
        gas_limit: 100_000,
        inclusion: None,
    }
}

fn fenced(batch: BatchRecord, owner: &str, epoch: u64) -> ApplyRequest {
    let fence = Fence { chain_id: batch.chain_id, settler: batch.settler, owner: owner.into(), epoch };
    ApplyRequest { transitions: Vec::new(), batch: Some(batch), atomic: true, fence: Some(fence) }
}

/// Two daemons: one holds the settler accounts; when its lease lapses the other takes them
/// over under a new epoch, and the first one's writes for them are refused from then on
/// (fenced in the same transaction), nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_divides_the_accounts_and_a_daemon_that_lost_one_cannot_write_for_it() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        let daemons = fleet(&pg, 2);
        let (a, b) = (daemons[0].clone(), daemons[1].clone());
        let settlers = [Address::repeat_byte(1), Address::repeat_byte(2)];
        let held = |d: &LedgerHandle, owner: &str, ttl: u64| {
            d.ledger().fleet().unwrap().acquire_leases(owner, 8453, &settlers, ttl).unwrap()
        };
        assert_eq!(held(&a, "a", 60_000), vec![(settlers[0], 1), (settlers[1], 1)], "alone: a takes all");
        assert_eq!(held(&b, "b", 60_000), vec![], "held by a: b gets none yet");
        assert_eq!(held(&a, "a", 60_000), vec![(settlers[0], 1)], "two members: a keeps its share");
        assert_eq!(held(&b, "b", 60_000), vec![(settlers[1], 2)], "b takes the other, a new epoch");
        a.apply(fenced(batch(1, settlers[0], Vec::new()), "a", 1)).await.unwrap();

        // a's lease (and membership) lapses: a 1 ms lease, then a poll with a deadline until
        // b, alone now, has both accounts.
        held(&a, "a", 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let taken = loop {
            let taken = held(&b, "b", 60_000);
            if taken.len() == 2 {
                break taken;
            }
            assert!(tokio::time::Instant::now() < deadline, "b never took the accounts over");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(taken, vec![(settlers[0], 2), (settlers[1], 2)], "a new holder, a new epoch");

        let mut late = batch(1, settlers[0], Vec::new());
        late.status = BatchStatus::Submitted;
        let refused = a.apply(fenced(late.clone(), "a", 1)).await.unwrap_err();
        assert!(matches!(refused, LedgerError::LeaseLost { .. }), "{refused}");
        assert_eq!(
            a.ledger().batch(8453, 1).unwrap().unwrap().status,
            BatchStatus::Signed,
            "nothing written"
        );
        b.apply(fenced(late, "b", 2)).await.unwrap();
        assert_eq!(b.ledger().batch(8453, 1).unwrap().unwrap().status, BatchStatus::Submitted);

        // A clean stop gives the accounts back at once.
        b.ledger().fleet().unwrap().release_leases("b").unwrap();
        assert_eq!(held(&a, "a", 60_000), vec![(settlers[0], 3), (settlers[1], 3)]);
    })
    .await
    .expect("bounded");
}

/// Two daemons cutting a batch at once may pick the same next number: the second one's
/// batch (other items) is refused, nothing of it written, and the first stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_number_is_taken_once() {
    tokio::time::timeout(LIMIT, async {
        let pg = TestPostgres::shared().unwrap();
        let daemons = fleet(&pg, 2);
        let (a, b) = (daemons[0].clone(), daemons[1].clone());
        let keys: Vec<_> = (0..4).map(|n| x402_batcher::ledger::AuthKey::of(&signed(3, n, 1))).collect();
        for (n, d) in [&a, &a, &b, &b].into_iter().enumerate() {
            d.accept(accept(signed(3, n as u64, 1), 100)).await.unwrap();
        }
        let cut = |items: &[x402_batcher::ledger::AuthKey], settler| {
            let b = batch(7, settler, items.to_vec());
            let transitions = items
                .iter()
                .map(|k| {
                    let mut t = TransitionRequest::new(*k, Status::Batched, 2);
                    t.only_from = Some(Status::Accepted);
                    t.batch_id = Some(b.id());
                    t
                })
                .collect();
            ApplyRequest { transitions, batch: Some(b), atomic: true, fence: None }
        };
        a.apply(cut(&keys[..2], Address::repeat_byte(1))).await.unwrap();
        let refused = b.apply(cut(&keys[2..], Address::repeat_byte(2))).await.unwrap_err();
        assert!(matches!(refused, LedgerError::BatchTaken { counter: 7, .. }), "{refused}");
        let stored = a.ledger().batch(8453, 7).unwrap().unwrap();
        assert_eq!(stored.items, keys[..2].to_vec());
        for k in &keys[2..] {
            assert_eq!(b.ledger().get(k).unwrap().unwrap().status, Status::Accepted, "not batched");
        }
        // The batch's own steps go on.
        let mut step = stored.clone();
        step.status = BatchStatus::Submitted;
        a.apply(ApplyRequest { transitions: Vec::new(), batch: Some(step), atomic: false, fence: None })
            .await
            .unwrap();
    })
    .await
    .expect("bounded");
}

/// Without a CA to check the server by (`ledger.ca_file`), a connection string that asks for
/// TLS is refused at connect rather than sent in plaintext (tests/it/ledger_tls.rs: with one).
#[test]
fn a_connection_asking_for_tls_is_refused_not_downgraded() {
    let pg = TestPostgres::shared().unwrap();
    let url = format!("{} sslmode=require", pg.url());
    let err = PgLedger::open(PgConnect::new(&url, None).unwrap()).unwrap_err();
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(matches!(err, LedgerError::Unreachable { op: "connect", .. }), "{text}");
}

/// A group locks every payer it names; PostgreSQL's lock table holds about
/// `max_locks_per_transaction` x (`max_connections` + background processes) locks in all.
/// A group naming more payers than fit fails whole: every command answered with the
/// server's reason ("out of shared memory", its hint naming `max_locks_per_transaction`: the
/// RUNBOOK's advice), nothing of it written; the next group that fits commits.
#[test]
fn a_group_naming_more_payers_than_the_lock_table_holds_fails_whole_and_the_next_commits() {
    // About 10 x 11 slots here (and some spare memory: 200 locks fit, 400 do not).
    let pg = TestPostgres::start_with(&[
        "max_locks_per_transaction = 10",
        "max_connections = 10",
        "autovacuum_max_workers = 1",
        "max_worker_processes = 0",
        "max_wal_senders = 0",
        "max_replication_slots = 0",
    ])
    .unwrap();
    let store = PgLedger::open(PgConnect::new(&pg.url(), None).unwrap()).unwrap();
    let group = |payers: std::ops::Range<u64>| -> Vec<Command> {
        payers.map(|p| Command::accept(accept(signed(p, 1, 1), 10)).0).collect()
    };
    let outcome = store.apply_group(&group(0..512));
    assert_eq!(outcome.results.len(), 512);
    for result in &outcome.results {
        match result {
            Err(e @ LedgerError::Storage { op: "lock payers", source, .. }) => {
                let source = source.downcast_ref::<tokio_postgres::Error>().expect("the client's error");
                assert_eq!(
                    source.code(),
                    Some(&tokio_postgres::error::SqlState::OUT_OF_MEMORY),
                    "{source:?}"
                );
                // What the daemon logs.
                let logged = e.with_causes();
                assert!(
                    logged.contains("out of shared memory") && logged.contains("max_locks_per_transaction"),
                    "{logged}"
                );
            }
            other => panic!("a group over the lock table was answered {other:?}"),
        }
    }
    assert!(outcome.changed.is_empty() && outcome.seqs.is_none());
    assert_eq!(
        store.fleet().unwrap().committed_seq().unwrap(),
        0,
        "nothing of the failed group is in the ledger"
    );
    assert!(store.get(&x402_batcher::ledger::AuthKey::of(&signed(0, 1, 1))).unwrap().is_none());
    assert_eq!(
        store.exposure(&x402_batcher::ledger::AuthKey::of(&signed(0, 1, 1)).payer()).unwrap(),
        U256::ZERO
    );

    let outcome = store.apply_group(&group(512..517));
    assert!(outcome.results.iter().all(Result::is_ok), "{:?}", outcome.results);
    assert_eq!(store.fleet().unwrap().committed_seq().unwrap(), 5);
}
