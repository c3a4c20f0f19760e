//! Past the confirmation depth, on a real anvil (its `safe` and `finalized` tags follow
//! `--slots-in-an-epoch`): a settled payment is final only once its block is finalized; a
//! reorg as deep as the confirmation depth that mines the settlement transaction again in
//! another block corrects the evidence; a deeper one that drops it reverses the settlement
//! and the payments settle again, and the books (export, totals, payee balances) agree.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use common::daemon::TestDaemon;
use common::settle::{Miner, payments, settling_daemon, status, wait_for};
use x402_batcher::api::v1;
use x402_batcher::config::TokenTable;
use x402_batcher::export::{self, Filter, Format};
use x402_batcher::ledger::{LedgerStore as _, LogEntry, PaymentRecord, RocksLedger, Status, books};
use x402_batcher::tools::devnet::{Devnet, DevnetOptions};

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(60);
const PAYEE: Address = Address::repeat_byte(0xfa);

fn settled(p: &v1::Payment) -> bool {
    status(p) == v1::PaymentStatus::Settled
}

/// Submits `items` while settlement is paused, then resumes: one batch, one transaction.
async fn wave(d: &TestDaemon, items: &[x402_batcher::x402::SignedAuthorization]) -> Vec<String> {
    let mut admin = d.admin().await;
    let pause = |on| v1::UpdatePolicyRequest { paused: Some(on), ..Default::default() };
    admin.update_policy(pause(true)).await.unwrap();
    let mut ids = Vec::new();
    for s in items {
        ids.push(common::settle::submit(d, s).await);
    }
    admin.update_policy(pause(false)).await.unwrap();
    ids
}

/// The settlement log after the daemon stopped, and its CSV export.
fn log_after(dir: &std::path::Path) -> (Vec<PaymentRecord>, String) {
    let ledger = RocksLedger::open(&dir.join("ledger")).unwrap();
    let log = ledger.settlement_log(0, usize::MAX).unwrap().into_iter().map(|(_, r)| r).collect();
    let mut csv = Vec::new();
    export::export(&ledger, &TokenTable::default(), 0, &Filter::default(), Format::Csv, &mut csv).unwrap();
    (log, String::from_utf8(csv).unwrap())
}

fn entries(log: &[PaymentRecord], id: &str) -> Vec<LogEntry> {
    log.iter().filter(|r| r.payment_id().to_string() == id).map(|r| r.log_entry).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_becomes_final_only_when_its_block_is_finalized() {
    tokio::time::timeout(LIMIT, async {
        // finalized = head - 2 x 3 on anvil.
        let options = DevnetOptions { slots_in_an_epoch: Some(3), ..DevnetOptions::default() };
        let net = Arc::new(Devnet::start_with(options).await.unwrap());
        let d = settling_daemon(&net, "final", 1, |c| c.settlement.confirmations = 2).await;
        let payers = d.payers("final", 2, 1_000_000).await;
        let ids = wave(&d, &payments(&d, &payers, 2, 1, PAYEE)).await;
        // Mined at once (automine); one more block makes depth 2.
        let included = |p: &v1::Payment| p.block_number > 0;
        let block = wait_for(&d, &ids, WAIT, included).await[0].block_number;
        net.mine().await.unwrap();
        let done = wait_for(&d, &ids, WAIT, settled).await;
        let finalized = |net: &Devnet| {
            let net = net.provider().clone();
            async move {
                alloy::providers::Provider::get_block_by_number(
                    &net,
                    alloy::eips::BlockNumberOrTag::Finalized,
                )
                .await
                .unwrap()
                .map_or(0, |b| b.header.number)
            }
        };
        assert!(finalized(&net).await < block);
        assert!(done.iter().all(|p| p.finalized_at_ms == 0), "settled at depth 2, not final: {done:?}");
        // Until the finalized block passes it, it stays not final, round after round.
        while finalized(&net).await + 1 < block {
            net.mine().await.unwrap();
        }
        let p = wait_for(&d, &ids, Duration::from_secs(2), |_| true).await;
        assert!(p.iter().all(|p| p.finalized_at_ms == 0), "one block short of final");
        net.mine().await.unwrap();
        assert!(finalized(&net).await >= block);
        let p = wait_for(&d, &ids, WAIT, |p| p.finalized_at_ms > 0).await;
        assert!(p.iter().all(|p| p.finalized_at_ms >= done[0].accepted_at_ms && settled(p)));

        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (log, csv) = log_after(dir.path());
        for id in &ids {
            assert_eq!(entries(&log, id), [LogEntry::Outcome, LogEntry::Finalized]);
        }
        assert!(csv.lines().next().unwrap().contains(",entry,finalized_at"), "{csv}");
        assert_eq!(csv.lines().filter(|l| l.contains(",finalized,")).count(), 2, "{csv}");
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_at_the_depth_that_mines_the_transaction_again_elsewhere_corrects_the_evidence() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let d = settling_daemon(&net, "correct", 1, |c| c.settlement.confirmations = 2).await;
        let payers = d.payers("correct", 3, 1_000_000).await;
        let items = payments(&d, &payers, 3, 2, PAYEE);
        let before = net.balance_of(PAYEE).await.unwrap();
        let ids = wave(&d, &items).await;
        let block = wait_for(&d, &ids, WAIT, |p| p.block_number > 0).await[0].block_number;
        net.mine().await.unwrap();
        let done = wait_for(&d, &ids, WAIT, settled).await;
        let tx: B256 = done[0].tx_hash.parse().unwrap();
        let old_hash = done[0].block_hash.clone();
        // Depth 2 = the confirmation depth: both blocks replaced, the same transaction
        // mined again in the second new one.
        let raw = net.raw_transaction(tx).await.unwrap();
        assert_eq!(net.block_number().await.unwrap(), block + 1);
        net.reorg_with(2, &[(raw, 1)]).await.unwrap();
        net.mine().await.unwrap();
        let moved = wait_for(&d, &ids, WAIT, |p| p.block_number == block + 1).await;
        for p in &moved {
            assert!(settled(p), "still settled: {p:?}");
            assert_eq!(p.tx_hash, done[0].tx_hash, "the same transaction");
            assert_ne!(p.block_hash, old_hash, "in another block");
        }

        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (log, csv) = log_after(dir.path());
        for id in &ids {
            assert_eq!(entries(&log, id), [LogEntry::Outcome, LogEntry::Corrected]);
        }
        assert_eq!(csv.lines().filter(|l| l.contains(",corrected,")).count(), 3, "{csv}");
        let sum: U256 = items.iter().map(|i| i.authorization.value).sum();
        assert_eq!(net.balance_of(PAYEE).await.unwrap() - before, sum, "paid once");
        // Reconcile against the chain as it is now: clean.
        let ledger = RocksLedger::open_read_only(&dir.path().join("ledger")).unwrap();
        let endpoint = x402_batcher::chain::RpcEndpoint::connect_http(net.chain_id(), net.rpc_url()).unwrap();
        let head = net.block_number().await.unwrap();
        let report = x402_batcher::reconcile::reconcile(&ledger, &endpoint, &[net.token()], false, 0, head)
            .await
            .unwrap();
        assert!(report.discrepancies.is_empty(), "{:?}", report.discrepancies);
        assert_eq!(report.settled_checked, 3);
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_deeper_than_the_depth_that_drops_the_transaction_settles_the_payments_again() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let d = settling_daemon(&net, "reverse", 1, |c| c.settlement.confirmations = 2).await;
        let payers = d.payers("reverse", 4, 1_000_000).await;
        // The reorg below must not reach the funding of the payers: a few blocks on top.
        for _ in 0..3 {
            net.mine().await.unwrap();
        }
        let items = payments(&d, &payers, 4, 3, PAYEE);
        let before = net.balance_of(PAYEE).await.unwrap();
        let ids = wave(&d, &items).await;
        wait_for(&d, &ids, WAIT, |p| p.block_number > 0).await;
        net.mine().await.unwrap();
        let first = wait_for(&d, &ids, WAIT, settled).await;
        let first_tx = first[0].tx_hash.clone();
        // Three blocks: the settlement's, the one on top, and one more; all empty now.
        net.reorg(3).await.unwrap();
        assert_eq!(net.balance_of(PAYEE).await.unwrap(), before, "the reorg took the payments back");

        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        let again = wait_for(&d, &ids, WAIT, |p| settled(p) && p.tx_hash != first_tx).await;
        let txs: HashSet<_> = again.iter().map(|p| p.tx_hash.clone()).collect();
        assert!(!txs.contains(&first_tx));

        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (log, csv) = log_after(dir.path());
        for id in &ids {
            let e = entries(&log, id);
            assert_eq!(e[..3], [LogEntry::Outcome, LogEntry::Reversed, LogEntry::Outcome], "{id}: {e:?}");
        }
        let reversed: Vec<_> = log.iter().filter(|r| r.log_entry == LogEntry::Reversed).collect();
        assert!(
            reversed
                .iter()
                .all(|r| r.status == Status::Settled && r.tx_hash.unwrap().to_string() == first_tx)
        );
        assert_eq!(csv.lines().filter(|l| l.contains(",reversed,")).count(), 4, "{csv}");
        // The books: one standing settlement each, and the payee paid exactly that.
        let held = books(log);
        assert_eq!(held.len(), 4);
        assert!(
            held.iter().all(|r| r.status == Status::Settled && r.tx_hash.unwrap().to_string() != first_tx)
        );
        let sum: U256 = items.iter().map(|i| i.authorization.value).sum();
        assert_eq!(net.balance_of(PAYEE).await.unwrap() - before, sum, "the payee matches the books");
    })
    .await
    .expect("within the time limit");
}
