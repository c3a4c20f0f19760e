//! Several daemons' ledgers on one PostgreSQL database (a throw-away server): each its own
//! store and writer, as separate daemons would have. Concurrent acceptances for one payer
//! never overspend it together, a nonce is recorded once whichever daemon sees it first,
//! and the change feed read from any of them is the same gap-free sequence, even while
//! they all write.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use x402_batcher::ledger::{
    AcceptOutcome, AcceptRequest, LedgerHandle, LedgerStore, PgConnect, PgLedger, Repeat, Submission,
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
    let url = pg.new_schema_url().unwrap();
    (0..n)
        .map(|_| {
            let store: Arc<dyn LedgerStore> =
                Arc::new(PgLedger::open(PgConnect::new(&url, None).unwrap()).unwrap());
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
