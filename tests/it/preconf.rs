//! Preconfirmations on a real anvil behind the flashblocks stand-in (a flashblock every
//! 200 ms, blocks sealed only when the test says): opted in, a payment counts as included
//! at its preconfirmation and settles once its block is sealed; a broken preconfirmation
//! sends its payment back to be settled again, exactly once; not opted in, a preconfirmed
//! receipt is not taken for inclusion.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use common::daemon::TestDaemon;
use common::settle::{ledger_after, payments, settling_daemon, status, submit, wait_for};
use x402_batcher::api::v1;
use x402_batcher::ledger::BatchStatus;
use x402_batcher::tools::devnet::{Devnet, DevnetOptions, Flashblocks};

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(30);
const PAYEE: Address = Address::repeat_byte(0xfb);

/// A devnet whose blocks are sealed only by [`Flashblocks::seal_now`] (an hour apart
/// otherwise), and a daemon on it with one settler; `preconfirm`: the chain's opt-in.
async fn stand_in(seed: &str, preconfirm: bool) -> (Arc<Devnet>, TestDaemon) {
    let options =
        DevnetOptions { block_time_secs: Some(3_600), flashblock_ms: Some(200), ..Default::default() };
    let net = Arc::new(Devnet::start_with(options).await.unwrap());
    let d = settling_daemon(&net, seed, 1, |c| {
        c.chains[0].preconfirmation_ms = preconfirm.then_some(200);
        c.settlement.confirmations = 1;
    })
    .await;
    (net, d)
}

/// A funded payer, its funding sealed (the daemon reads balances at the sealed block).
async fn payer(net: &Devnet, d: &TestDaemon, seed: &str) -> Vec<alloy::signers::local::PrivateKeySigner> {
    let payers = d.payers(seed, 1, 1_000_000).await;
    flash(net).seal_now().await.unwrap();
    payers
}

/// The hash and time of block `n`, from anvil itself.
async fn block(net: &Devnet, n: u64) -> (String, u64) {
    use alloy::providers::Provider;
    let b = net.provider().get_block_by_number(n.into()).await.unwrap().expect("the block is there");
    (b.header.hash.to_string(), b.header.timestamp)
}

fn flash(net: &Devnet) -> &Flashblocks {
    net.flashblocks().expect("started with the stand-in")
}

fn is(want: v1::PaymentStatus) -> impl Fn(&v1::Payment) -> bool {
    move |p| status(p) == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_in_a_payment_is_included_at_its_preconfirmation_and_settles_once_sealed() {
    tokio::time::timeout(LIMIT, async {
        let (net, d) = stand_in("pre-in", true).await;
        let payers = payer(&net, &d, "pre-in").await;
        let item = &payments(&d, &payers, 1, 1, PAYEE)[0];
        let id = submit(&d, item).await;
        let p =
            wait_for(&d, std::slice::from_ref(&id), WAIT, is(v1::PaymentStatus::Included)).await.remove(0);
        assert!(
            p.block_number > flash(&net).sealed(),
            "included in block {} while the endpoint's head is {}: at the preconfirmation",
            p.block_number,
            flash(&net).sealed()
        );
        flash(&net).seal_now().await.unwrap();
        let p = wait_for(&d, &[id], WAIT, is(v1::PaymentStatus::Settled)).await.remove(0);
        // Its time is the sealed block's (the preconfirmation only estimated it).
        assert_eq!((p.block_hash.clone(), p.block_time), block(&net, p.block_number).await);
        assert_eq!(net.balance_of(PAYEE).await.unwrap(), U256::from(1_000));
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_preconfirmation_sends_its_payment_back_and_it_is_paid_exactly_once() {
    tokio::time::timeout(LIMIT, async {
        let (net, d) = stand_in("pre-broken", true).await;
        let payers = payer(&net, &d, "pre-broken").await;
        let item = &payments(&d, &payers, 1, 2, PAYEE)[0];
        let id = submit(&d, item).await;
        let promised =
            wait_for(&d, std::slice::from_ref(&id), WAIT, is(v1::PaymentStatus::Included)).await.remove(0);
        // The sequencer fails over before sealing: the flashblocks since the last seal are
        // dropped. Blocks are sealed on until the payment settles.
        flash(&net).renege();
        let sealer = {
            let net = Arc::clone(&net);
            tokio::spawn(async move {
                loop {
                    flash(&net).seal_now().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        };
        let paid = wait_for(&d, &[id], WAIT, is(v1::PaymentStatus::Settled)).await.remove(0);
        sealer.abort();
        assert_eq!(net.balance_of(PAYEE).await.unwrap(), U256::from(1_000), "paid once");
        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (_, batches) = ledger_after(dir.path(), net.chain_id());
        let broken = batches
            .iter()
            .find(|b| b.inclusion.is_some_and(|i| i.tx_hash.to_string() == promised.tx_hash))
            .expect("the preconfirmed batch is on record");
        assert_eq!(broken.status, BatchStatus::Abandoned, "its transaction is not on chain");
        assert_ne!(paid.tx_hash, promised.tx_hash, "settled by another transaction");
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_opted_in_a_preconfirmed_receipt_is_not_taken_for_inclusion() {
    tokio::time::timeout(LIMIT, async {
        let (net, d) = stand_in("pre-out", false).await;
        let payers = payer(&net, &d, "pre-out").await;
        let item = &payments(&d, &payers, 1, 3, PAYEE)[0];
        let id = submit(&d, item).await;
        // The engine has read the preconfirmed receipt several times...
        let deadline = tokio::time::Instant::now() + WAIT;
        while flash(&net).preconfirmed_receipts() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "the engine never read the receipt");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ... and still waits for the sealed block.
        let p = wait_for(&d, std::slice::from_ref(&id), WAIT, |_| true).await.remove(0);
        assert_eq!(status(&p), v1::PaymentStatus::Submitted);
        flash(&net).seal_now().await.unwrap();
        wait_for(&d, &[id], WAIT, is(v1::PaymentStatus::Settled)).await;
        assert_eq!(net.balance_of(PAYEE).await.unwrap(), U256::from(1_000));
    })
    .await
    .expect("within the time limit");
}
