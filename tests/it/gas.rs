//! Gas, with the project's test token, measured in one run on anvil (gas is deterministic,
//! so this is a test, not a timing): a payment in a batch of 50 costs at most 0.70x the
//! same payment sent as its own transaction, and at most 1.05x the batch's marginal cost
//! per added payment (no avoidable overhead per item); and the settlement engine, left to
//! choose, settles 1, 10, 50 and 200 payments within 1 % of the cheapest single settlement
//! the token allows (BENCHMARKS.md records the table this prints).

use crate::common;

use std::time::Duration;

use alloy::primitives::U256;
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::local::PrivateKeySigner;
use x402_batcher::chain;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::testkit::{DEFAULT_PAYEE, PaymentBuilder};
use x402_batcher::x402::SignedAuthorization;

const LIMIT: Duration = Duration::from_secs(120);

async fn batch(net: &Devnet, items: &[SignedAuthorization]) -> TransactionReceipt {
    let receipt = net.send_batch(items).await.unwrap();
    assert_eq!(chain::authorizations_used(&receipt, net.token()).len(), items.len(), "every item settled");
    receipt
}

#[tokio::test]
async fn batching_saves_gas_with_no_overhead_per_item() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        // One payment per payer per transaction, every payer and the payee already funded:
        // the same storage writes for every payment, alone or batched.
        let payers = devnet::payer_keys("gas", 102);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(1_000_000u64)).await.unwrap();
        net.fund(&[DEFAULT_PAYEE], U256::from(1u64)).await.unwrap();
        let domain = net.token_domain();
        let now = SystemClock.now_unix();
        let pay = |p: &PrivateKeySigner| PaymentBuilder::new(p, &domain, now).build();

        // The same payment as its own transaction, straight to the token.
        let alone = pay(&payers[101]);
        let single = net.send_alone(&alone).await.unwrap();
        assert!(single.status());
        let g1 = single.gas_used as f64;

        let items: Vec<SignedAuthorization> = payers[..101].iter().map(pay).collect();
        let g50 = batch(&net, &items[..50]).await.gas_used as f64;
        let g51 = batch(&net, &items[50..101]).await.gas_used as f64;
        let per_payment = g50 / 50.0;
        let marginal = g51 - g50;
        println!(
            "gas: own transaction {g1:.0}; batch of 50 {g50:.0} = {per_payment:.0} per payment \
             ({:.3}x own tx); marginal per added payment {marginal:.0} (per payment / marginal {:.3})",
            per_payment / g1,
            per_payment / marginal
        );
        assert!(per_payment <= 0.70 * g1, "{per_payment} per payment vs {g1} alone");
        assert!(per_payment <= 1.05 * marginal, "{per_payment} per payment vs {marginal} marginal");
    })
    .await
    .expect("bounded");
}

/// The engine settles waves of 1, 10, 50 and 200 payments (distinct fresh payers, a funded
/// payee). The same run measures one transaction per payment, the token's marginal floor
/// (the 51st payment of a hand-built `aggregate3`), and the cheapest single settlement of
/// each size built by hand (the direct call or an `aggregate3` of one for one payment, an
/// `aggregate3` of all for more). Each wave costs at most 1.01x that optimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_settles_each_size_within_a_percent_of_the_floor() {
    use common::settle::{Miner, ledger_after, settling_daemon, status, wait_for};
    use std::sync::Arc;
    use x402_batcher::api::v1;
    const SIZES: [usize; 4] = [1, 10, 50, 200];
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let floor_payers = devnet::payer_keys("floor", 102 + 1 + 261);
        let addrs: Vec<_> = floor_payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(1_000_000u64)).await.unwrap();
        net.fund(&[DEFAULT_PAYEE], U256::from(1u64)).await.unwrap();
        let domain = net.token_domain();
        let now = SystemClock.now_unix();
        let pay = |p: &PrivateKeySigner| PaymentBuilder::new(p, &domain, now).build();
        let own = net.send_alone(&pay(&floor_payers[101])).await.unwrap().gas_used as f64;
        let items: Vec<SignedAuthorization> = floor_payers[..101].iter().map(pay).collect();
        let g50 = batch(&net, &items[..50]).await.gas_used as f64;
        let g51 = batch(&net, &items[50..101]).await.gas_used as f64;
        let marginal = g51 - g50;
        let aggregate_of_one = batch(&net, &[pay(&floor_payers[102])]).await.gas_used as f64;
        let mut by_hand = Vec::new();
        let mut next = 103;
        for n in SIZES {
            let items: Vec<_> = floor_payers[next..next + n].iter().map(pay).collect();
            next += n;
            let g = batch(&net, &items).await.gas_used as f64;
            by_hand.push(if n == 1 { own.min(aggregate_of_one) } else { g });
        }

        let d = settling_daemon(&net, "floor", 1, |_| {}).await;
        let payers = d.payers("engine", 261, 1_000_000).await;
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        let mut admin = d.admin().await;
        let pause = |on| v1::UpdatePolicyRequest { paused: Some(on), ..Default::default() };
        let mut waves = Vec::new();
        let mut next = 0;
        for n in SIZES {
            admin.update_policy(pause(true)).await.unwrap();
            let mut ids = Vec::new();
            for p in &payers[next..next + n] {
                let s = PaymentBuilder::new(p, &d.domain(), SystemClock.now_unix()).build();
                ids.push(common::settle::submit(&d, &s).await);
            }
            next += n;
            admin.update_policy(pause(false)).await.unwrap();
            let settled = |p: &v1::Payment| status(p) == v1::PaymentStatus::Settled;
            waves.push(wait_for(&d, &ids, Duration::from_secs(60), settled).await);
        }
        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (_, batches) = ledger_after(dir.path(), net.chain_id());
        println!(
            "own transaction {own:.0} gas; aggregate3 of one {aggregate_of_one:.0}; marginal floor {marginal:.0}"
        );
        println!("| payments | settlements | gas per payment | × own tx | × marginal floor | × best single settlement by hand |");
        for ((n, done), optimum) in SIZES.iter().zip(&waves).zip(&by_hand) {
            let txs: std::collections::BTreeSet<_> = done.iter().map(|p| p.tx_hash.clone()).collect();
            let gas: u64 = batches
                .iter()
                .filter_map(|b| b.inclusion)
                .filter(|i| txs.contains(&i.tx_hash.to_string()))
                .map(|i| i.gas_used)
                .sum();
            let per = gas as f64 / *n as f64;
            let best = optimum / *n as f64;
            println!(
                "| {n} | {} | {per:.0} | {:.3} | {:.3} | {:.4} |",
                txs.len(),
                per / own,
                per / marginal,
                per / best
            );
            assert_eq!(txs.len(), 1, "{n} payments in one settlement");
            assert!(per <= 1.01 * best, "{n} payments: {per:.0} gas each vs {best:.0} at best");
        }
    })
    .await
    .expect("bounded");
}
