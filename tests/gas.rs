//! Gas, with the project's test token, measured in one run on anvil (gas is deterministic,
//! so this is a test, not a timing): a payment in a batch of 50 costs at most 0.70x the
//! same payment sent as its own transaction, and at most 1.05x the batch's marginal cost
//! per added payment (no avoidable overhead per item).

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
