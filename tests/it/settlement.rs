//! The settlement engine on a real anvil: payments go from accepted to settled at depth in
//! aggregate3 batches, with exactly one outcome each, through failures, reorgs, dropped
//! transactions and fee spikes; on each ledger backend in turn (same assertions).

use crate::both_backends;
use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use common::daemon::TestDaemon;
use common::settle::{Miner, is_final, payments, settle_with, status, submit, wait_for};
use common::store::{Backend, TestLedger};
use x402_batcher::api::v1;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::config::Config;
use x402_batcher::ledger::BatchStatus;
use x402_batcher::tools::devnet::{self, Devnet, ITestUSDC};
use x402_batcher::tools::testkit::PaymentBuilder;
use x402_batcher::x402::SignedAuthorization;

const LIMIT: Duration = Duration::from_secs(120);
/// How long one wait for payment states may take: below LIMIT, so a stuck wait reports the
/// states it saw.
const WAIT: Duration = Duration::from_secs(60);
const PAYEE: Address = Address::repeat_byte(0xbe);

struct Setup {
    devnet: Arc<Devnet>,
    ledger: Arc<TestLedger>,
    settlers: Vec<PrivateKeySigner>,
}

async fn setup(backend: Backend, settlers: usize) -> Setup {
    let devnet = Arc::new(Devnet::start().await.unwrap());
    let settlers = devnet.new_settlers("t", settlers).await.unwrap();
    Setup { devnet, ledger: TestLedger::new(backend), settlers }
}

async fn daemon(s: &Setup, tune: impl FnOnce(&mut Config)) -> TestDaemon {
    let (dir, settlers) = (s.ledger.dir.path().to_owned(), s.settlers.clone());
    TestDaemon::start_on_ledger(Arc::clone(&s.devnet), Arc::clone(&s.ledger), move |c| {
        settle_with(c, &dir, &settlers);
        tune(c);
    })
    .await
}

/// Submits `items` while settlement is paused, then resumes it: the next round sees them
/// all, so they go out in one batch. (Submitted one by one while the engine runs, a round
/// can fall between two of them and cut the first ones alone; with automine off the rest
/// then wait for the settler's next nonce.)
async fn submit_as_one_wave(d: &TestDaemon, items: &[SignedAuthorization]) -> Vec<String> {
    let mut admin = v1::admin_client::AdminClient::connect(d.admin_url()).await.unwrap();
    let pause = |on| v1::UpdatePolicyRequest { paused: Some(on), ..Default::default() };
    admin.update_policy(pause(true)).await.unwrap();
    let ids = submit_all(d, items).await;
    admin.update_policy(pause(false)).await.unwrap();
    ids
}

async fn submit_all(d: &TestDaemon, items: &[SignedAuthorization]) -> Vec<String> {
    let mut ids = Vec::new();
    for s in items {
        ids.push(submit(d, s).await);
    }
    ids
}

fn settled(p: &v1::Payment) -> bool {
    status(p) == v1::PaymentStatus::Settled
}

/// Every payment settled once: one settlement log entry each, an `AuthorizationUsed` on
/// chain for each, and the payee richer by exactly their sum.
async fn assert_settled_once(s: &Setup, items: &[SignedAuthorization], payee_before: U256) {
    let (log, batches) = s.ledger.books(s.devnet.chain_id());
    let ids: HashSet<_> = log.iter().map(|r| r.payment_id()).collect();
    assert_eq!(log.len(), items.len(), "one settlement log entry per payment");
    assert_eq!(ids.len(), items.len(), "no payment twice in the log");
    assert!(log.iter().all(|r| r.status == x402_batcher::ledger::Status::Settled));
    let token = x402_batcher::chain::IEip3009::new(s.devnet.token(), s.devnet.provider());
    for i in items {
        assert!(token.authorizationState(i.authorization.from, i.authorization.nonce).call().await.unwrap());
    }
    let sum: U256 = items.iter().map(|i| i.authorization.value).sum();
    assert_eq!(s.devnet.balance_of(PAYEE).await.unwrap() - payee_before, sum, "payee got each payment once");
    assert!(batches.iter().all(|b| b.status.is_final()), "no batch left open");
    for r in &log {
        assert!(r.tx_hash.is_some() && r.block_hash.is_some() && r.gas_share > 0, "evidence recorded: {r:?}");
    }
}

async fn happy_path_settles_every_payment_at_depth_in_batches(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 2).await;
        let d = daemon(&s, |c| c.settlement.max_batch_size = 25).await;
        let payers = d.payers("happy", 10, 10_000_000).await;
        let _miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(100), None);
        let items = payments(&d, &payers, 60, 1, PAYEE);
        let before = s.devnet.balance_of(PAYEE).await.unwrap();
        let ids = submit_all(&d, &items).await;
        let done = wait_for(&d, &ids, WAIT, settled).await;
        for p in &done {
            assert!(!p.tx_hash.is_empty() && p.block_number > 0 && !p.batch_id.is_empty(), "{p:?}");
        }
        d.stop().await;
        assert_settled_once(&s, &items, before).await;
        let (_, batches) = s.ledger.books(s.devnet.chain_id());
        assert!(batches.len() >= 3, "60 payments at most 25 per batch: {} batches", batches.len());
        assert!(batches.iter().all(|b| b.items.len() <= 25));
        let settlers: HashSet<_> = batches.iter().map(|b| b.settler).collect();
        assert_eq!(settlers.len(), 2, "both settler accounts sent batches");
    })
    .await
    .expect("within the time limit");
}

async fn a_batch_of_one_really_settles(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 1).await;
        let d = daemon(&s, |_| {}).await;
        let payers = d.payers("one", 1, 1_000_000).await;
        let _miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(100), None);
        let items = payments(&d, &payers, 1, 2, PAYEE);
        let before = s.devnet.balance_of(PAYEE).await.unwrap();
        let ids = submit_all(&d, &items).await;
        let done = wait_for(&d, &ids, WAIT, settled).await;
        d.stop().await;
        assert_settled_once(&s, &items, before).await;
        let (_, batches) = s.ledger.books(s.devnet.chain_id());
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].items.len(), 1);
        let inc = batches[0].inclusion.unwrap();
        assert_eq!(format!("{}", inc.tx_hash), done[0].tx_hash);
        // The batch's limit covered the item: the payment settled (its own log is the proof)
        // and the limit is far above what the batch used.
        assert!(batches[0].gas_limit > inc.gas_used, "{} > {}", batches[0].gas_limit, inc.gas_used);
    })
    .await
    .expect("within the time limit");
}

async fn mixed_batch_fails_exactly_the_bad_items_with_their_reasons(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 1).await;
        // Wait long enough for the test to spoil three payments before any batch is cut.
        let d = daemon(&s, |c| {
            c.settlement.max_wait_ms = Some(4_000);
            c.settlement.target_cost_per_payment_wei = 0;
            c.admission.min_validity_remaining_secs = 1;
        })
        .await;
        let payers = d.payers("mixed", 4, 1_000_000).await;
        let now = SystemClock.now_unix();
        let domain = d.domain();
        let good = PaymentBuilder::new(&payers[0], &domain, now).to(PAYEE).nonce_index(1).build();
        let used = PaymentBuilder::new(&payers[1], &domain, now).to(PAYEE).nonce_index(2).build();
        let drained = PaymentBuilder::new(&payers[2], &domain, now).to(PAYEE).nonce_index(3).build();
        let expiring = PaymentBuilder::new(&payers[3], &domain, now)
            .to(PAYEE)
            .nonce_index(4)
            .valid_before(now + 3)
            .build();
        let ids = submit_all(&d, &[good.clone(), used.clone(), drained.clone(), expiring.clone()]).await;

        // Outside the daemon: the nonce is spent by someone else's transaction ...
        let receipt = s.devnet.send_batch(std::slice::from_ref(&used)).await.unwrap();
        assert!(receipt.status());
        // ... and the payer moves its whole balance away.
        let drainer = s.devnet.provider_for(&payers[2]).await.unwrap();
        ITestUSDC::new(s.devnet.token(), &drainer)
            .transfer(Address::repeat_byte(0x99), U256::from(1_000_000u64))
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
        let _miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(200), None);

        let done = wait_for(&d, &ids, WAIT, is_final).await;
        let outcome = |p: &v1::Payment| (status(p), p.failure_reason.clone());
        assert_eq!(outcome(&done[0]), (v1::PaymentStatus::Settled, String::new()));
        assert_eq!(
            outcome(&done[1]),
            (v1::PaymentStatus::Failed, "invalid_exact_evm_nonce_already_used".to_owned())
        );
        assert_eq!(outcome(&done[2]), (v1::PaymentStatus::Failed, "insufficient_funds".to_owned()));
        assert_eq!(
            outcome(&done[3]),
            (v1::PaymentStatus::Expired, "invalid_exact_evm_payload_authorization_valid_before".to_owned())
        );
        d.stop().await;
        let (log, _) = s.ledger.books(s.devnet.chain_id());
        assert_eq!(log.len(), 4, "one outcome each");
        let token = x402_batcher::chain::IEip3009::new(s.devnet.token(), s.devnet.provider());
        for a in [&drained, &expiring] {
            let used =
                token.authorizationState(a.authorization.from, a.authorization.nonce).call().await.unwrap();
            assert!(!used, "never spent");
        }
    })
    .await
    .expect("within the time limit");
}

async fn a_reorg_after_inclusion_resettles_everything_once(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 1).await;
        // Deep enough that no batch settles before the test reorganises the chain.
        let d = daemon(&s, |c| c.settlement.confirmations = 30).await;
        let payers = d.payers("reorg", 5, 1_000_000).await;
        let items = payments(&d, &payers, 20, 3, PAYEE);
        let before = s.devnet.balance_of(PAYEE).await.unwrap();
        let ids = submit_all(&d, &items).await;
        // Automine: each batch is mined at once; nothing else makes blocks yet.
        let included = |p: &v1::Payment| status(p) == v1::PaymentStatus::Included;
        let first = wait_for(&d, &ids, WAIT, included).await;
        let first_txs: HashSet<String> = first.iter().map(|p| p.tx_hash.clone()).collect();
        let lowest = first.iter().map(|p| p.block_number).min().unwrap();
        let head = s.devnet.block_number().await.unwrap();
        s.devnet.reorg(head - lowest + 1).await.unwrap();
        let token = x402_batcher::chain::IEip3009::new(s.devnet.token(), s.devnet.provider());
        let a = &items[0].authorization;
        assert!(!token.authorizationState(a.from, a.nonce).call().await.unwrap(), "the reorg undid it");

        let _miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(100), None);
        let done = wait_for(&d, &ids, WAIT, settled).await;
        for p in &done {
            assert!(!first_txs.contains(&p.tx_hash), "settled by a new transaction, not the vanished one");
        }
        d.stop().await;
        assert_settled_once(&s, &items, before).await;
        let (_, batches) = s.ledger.books(s.devnet.chain_id());
        assert!(
            batches.iter().any(|b| b.status == BatchStatus::Abandoned),
            "the reorged batch was abandoned"
        );
    })
    .await
    .expect("within the time limit");
}

async fn a_dropped_transaction_is_resubmitted(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 1).await;
        let d = daemon(&s, |_| {}).await;
        let payers = d.payers("drop", 3, 1_000_000).await;
        s.devnet.set_automine(false).await.unwrap();
        let items = payments(&d, &payers, 6, 4, PAYEE);
        let before = s.devnet.balance_of(PAYEE).await.unwrap();
        let ids = submit_as_one_wave(&d, &items).await;
        let submitted = |p: &v1::Payment| status(p) == v1::PaymentStatus::Submitted;
        wait_for(&d, &ids, WAIT, submitted).await;
        let pool = poll(|| s.devnet.pool_hashes(), |h: &Vec<B256>| h.len() == 1).await;
        // Told by the node itself: a look at the pool afterwards races the engine, which may
        // have sent it again already.
        assert!(s.devnet.drop_transaction(pool[0]).await.unwrap(), "dropped");
        // The engine notices the node no longer knows it and sends it again.
        let again = poll(|| s.devnet.pool_hashes(), |h: &Vec<B256>| !h.is_empty()).await;
        assert_eq!(again, pool, "the same signed transaction is back in the pool");
        let _miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(100), None);
        let done = wait_for(&d, &ids, WAIT, settled).await;
        assert!(done.iter().all(|p| p.tx_hash == pool[0].to_string()));
        d.stop().await;
        assert_settled_once(&s, &items, before).await;
    })
    .await
    .expect("within the time limit");
}

async fn a_fee_spike_grows_batches_and_replaces_the_stuck_transaction(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 1).await;
        let d = daemon(&s, |c| {
            c.settlement.max_wait_ms = Some(3_000);
            c.settlement.max_fee_per_gas_wei = 1_000_000_000_000;
        })
        .await;
        let payers = d.payers("spike", 6, 1_000_000).await;
        s.devnet.set_automine(false).await.unwrap();
        let before = s.devnet.balance_of(PAYEE).await.unwrap();

        // Cheap gas: the first payments go out at once, priced for ~1 gwei.
        let wave1 = payments(&d, &payers, 4, 5, PAYEE);
        let ids1 = submit_as_one_wave(&d, &wave1).await;
        let submitted = |p: &v1::Payment| status(p) == v1::PaymentStatus::Submitted;
        wait_for(&d, &ids1, WAIT, submitted).await;
        let stuck = poll(|| s.devnet.pool_hashes(), |h: &Vec<B256>| h.len() == 1).await[0];

        // The base fee jumps to 100 gwei and stays there: the transaction cannot be mined.
        let spike = 100_000_000_000u128;
        let _miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(150), Some(spike));
        let done1 = wait_for(&d, &ids1, WAIT, settled).await;
        let replaced = done1[0].tx_hash.clone();
        assert_ne!(replaced, stuck.to_string(), "settled by a replacement");
        let receipt =
            s.devnet.provider().get_transaction_receipt(replaced.parse().unwrap()).await.unwrap().unwrap();
        assert!(receipt.effective_gas_price >= spike, "the replacement pays the new base fee");

        // Expensive gas: payments arriving over a second wait for one bigger batch.
        let wave2 = payments(&d, &payers, 12, 6, PAYEE);
        let mut ids2 = Vec::new();
        for chunk in wave2.chunks(4) {
            ids2.extend(submit_all(&d, chunk).await);
            tokio::time::sleep(Duration::from_millis(400)).await; // arrivals spread over time
        }
        let done2 = wait_for(&d, &ids2, WAIT, settled).await;
        d.stop().await;
        let all: Vec<_> = wave1.iter().chain(&wave2).cloned().collect();
        assert_settled_once(&s, &all, before).await;
        let (_, batches) = s.ledger.books(s.devnet.chain_id());
        let first = batches.iter().find(|b| b.items.len() == 4 && b.attempts.len() >= 2);
        assert!(first.is_some(), "the first batch was re-signed with a higher fee: {batches:#?}");
        let grown: Vec<_> = batches.iter().filter(|b| b.cut_reason == "max_wait").collect();
        assert!(!grown.is_empty(), "under the spike batches were cut by max wait: {batches:#?}");
        assert!(grown.iter().any(|b| b.items.len() > 4), "a batch grew beyond one arrival wave");
        for p in &done2 {
            let valid_before: U256 = p.authorization.as_ref().unwrap().valid_before.parse().unwrap();
            assert!(U256::from(p.block_time) < valid_before, "settled within its deadline");
        }
    })
    .await
    .expect("within the time limit");
}

async fn payments_a_settler_of_ours_already_settled_follow_their_own_evidence(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 1).await;
        // First without settler keys: the payments are accepted and wait.
        let d = TestDaemon::start_on_ledger(Arc::clone(&s.devnet), Arc::clone(&s.ledger), |c| {
            c.audit.nonce_interval_ms = 0
        })
        .await;
        let payers = d.payers("ours", 2, 1_000_000).await;
        let items = payments(&d, &payers, 2, 7, PAYEE);
        let before = s.devnet.balance_of(PAYEE).await.unwrap();
        let ids = submit_all(&d, &items).await;
        d.stop().await;

        // Our settler account settles them outside the engine, in two blocks (as a batch
        // the engine lost track of would have).
        let kept = s.devnet.send_batch_as(&s.settlers[0], &items[..1]).await.unwrap();
        s.devnet.mine().await.unwrap();
        let lost = s.devnet.send_batch_as(&s.settlers[0], &items[1..]).await.unwrap();
        assert!(kept.status() && lost.status());

        // The engine's pre-simulation finds both nonces used, by our settler's logs: both
        // included with that evidence, none failed, no batch of their own.
        let d = daemon(&s, |c| c.settlement.confirmations = 30).await;
        let included = |p: &v1::Payment| status(p) == v1::PaymentStatus::Included;
        let first = wait_for(&d, &ids, WAIT, included).await;
        assert_eq!(first[0].tx_hash, kept.transaction_hash.to_string());
        assert_eq!(first[1].tx_hash, lost.transaction_hash.to_string());
        assert!(first.iter().all(|p| p.batch_id.is_empty()));

        // The second one's block is reorged away: it goes back to accepted and a batch of
        // the engine settles it; the first settles at depth on its own evidence.
        let head = s.devnet.block_number().await.unwrap();
        s.devnet.reorg(head - lost.block_number.unwrap() + 1).await.unwrap();
        let _miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(100), None);
        let done = wait_for(&d, &ids, WAIT, settled).await;
        assert_eq!(
            done[0].tx_hash,
            kept.transaction_hash.to_string(),
            "settled by the transaction that used it"
        );
        assert_ne!(done[1].tx_hash, lost.transaction_hash.to_string(), "the reorged transaction is gone");
        assert!(!done[1].batch_id.is_empty(), "re-settled in a batch of the engine");
        d.stop().await;
        assert_settled_once(&s, &items, before).await;
    })
    .await
    .expect("within the time limit");
}

async fn the_exported_fee_shares_of_each_transaction_sum_to_its_receipts_fee(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let s = setup(backend, 1).await;
        let d = daemon(&s, |_| {}).await;
        let payers = d.payers("fees", 5, 1_000_000).await;
        s.devnet.set_automine(false).await.unwrap();
        let now = SystemClock.now_unix();
        let pay = |i: usize| {
            PaymentBuilder::new(&payers[i], &d.domain(), now).to(PAYEE).nonce_index(i as u64).build()
        };
        // Two batches: in the first one payment settles and two fail (their payers emptied
        // their balance ahead of it in the same block); in the second every payment fails.
        // The failures are decided once their block is final (anvil: 64 blocks on).
        let mut outcomes = Vec::new();
        for (wave, drained) in [(vec![0, 1, 2], vec![1, 2]), (vec![3, 4], vec![3, 4])] {
            let items: Vec<_> = wave.iter().map(|&i| pay(i)).collect();
            let ids = submit_as_one_wave(&d, &items).await;
            let submitted = |p: &v1::Payment| status(p) == v1::PaymentStatus::Submitted;
            wait_for(&d, &ids, WAIT, submitted).await;
            poll(|| s.devnet.pool_hashes(), |h: &Vec<B256>| h.len() == 1).await;
            for &i in &drained {
                // A far higher tip than the batch's: mined first in the next block.
                let drainer = s.devnet.provider_for(&payers[i]).await.unwrap();
                let _pending = ITestUSDC::new(s.devnet.token(), &drainer)
                    .transfer(Address::repeat_byte(0x99), U256::from(1_000_000u64))
                    .gas(100_000) // not estimated: the node would estimate after the pending batch
                    .max_priority_fee_per_gas(50_000_000_000)
                    .max_fee_per_gas(100_000_000_000)
                    .send()
                    .await
                    .unwrap();
            }
            poll(|| s.devnet.pool_hashes(), |h: &Vec<B256>| h.len() == 1 + drained.len()).await;
            s.devnet.mine().await.unwrap();
            let miner = Miner::start(Arc::clone(&s.devnet), Duration::from_millis(100), None);
            outcomes.extend(wait_for(&d, &ids, WAIT, is_final).await);
            drop(miner);
        }
        let failed = |p: &v1::Payment| {
            (status(p), p.failure_reason.as_str()) == (v1::PaymentStatus::Failed, "insufficient_funds")
        };
        assert!(settled(&outcomes[0]), "{:?}", outcomes[0]);
        assert!(outcomes[1..].iter().all(failed), "{outcomes:?}");
        d.stop().await;

        let ledger = s.ledger.open();
        let mut csv = Vec::new();
        let (tokens, filter) =
            (Config::parse("").unwrap().token_table(), x402_batcher::export::Filter::default());
        x402_batcher::export::export(
            &*ledger,
            &tokens,
            0,
            &filter,
            x402_batcher::export::Format::Csv,
            &mut csv,
        )
        .unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_slice());
        let header = reader.headers().unwrap().clone();
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let mut by_tx: std::collections::BTreeMap<B256, (U256, u64, usize)> = Default::default();
        for row in reader.records() {
            let row = row.unwrap();
            // Outcomes only: a settled payment's `finalized` entry repeats its shares (the
            // failures are decided once their block is final, so the test runs past it).
            if &row[col("entry")] != "outcome" {
                continue;
            }
            let e = by_tx.entry(row[col("tx_hash")].parse().unwrap()).or_default();
            e.0 += row[col("fee_share_wei")].parse::<U256>().unwrap();
            e.1 += row[col("gas_share")].parse::<u64>().unwrap();
            e.2 += 1;
        }
        assert_eq!(
            by_tx.values().map(|t| t.2).collect::<Vec<_>>().iter().sum::<usize>(),
            5,
            "every payment has its transaction"
        );
        assert_eq!(by_tx.len(), 2, "two transactions: {by_tx:?}");
        for (tx, (fees, gas, rows)) in by_tx {
            let receipt = s.devnet.provider().get_transaction_receipt(tx).await.unwrap().unwrap();
            let paid = U256::from(receipt.gas_used) * U256::from(receipt.effective_gas_price);
            assert_eq!(
                (fees, gas),
                (paid, receipt.gas_used),
                "tx {tx} ({rows} payments): shares vs gasUsed x effectiveGasPrice"
            );
        }
        // Reconcile checks the same of every settled batch.
        let endpoint =
            x402_batcher::chain::RpcEndpoint::connect_http(s.devnet.chain_id(), s.devnet.rpc_url()).unwrap();
        let head = s.devnet.block_number().await.unwrap();
        let report =
            x402_batcher::reconcile::reconcile(&*ledger, &endpoint, &[s.devnet.token()], false, 0, head)
                .await
                .unwrap();
        assert_eq!((report.fees_checked, report.discrepancies), (2, vec![]));
    })
    .await
    .expect("within the time limit");
}

/// Polls `read` until `done` holds (at most 30 s).
async fn poll<T, F, Fut>(read: F, done: impl Fn(&T) -> bool) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, devnet::DevnetError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = read().await.unwrap();
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within 30 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    happy_path_settles_every_payment_at_depth_in_batches,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_batch_of_one_really_settles,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    mixed_batch_fails_exactly_the_bad_items_with_their_reasons,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_reorg_after_inclusion_resettles_everything_once,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_dropped_transaction_is_resubmitted,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_fee_spike_grows_batches_and_replaces_the_stuck_transaction,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    payments_a_settler_of_ours_already_settled_follow_their_own_evidence,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_exported_fee_shares_of_each_transaction_sum_to_its_receipts_fee,
);
