//! Pre-simulation names, per item, why the token would refuse it, on a real anvil; it
//! changes nothing on chain.

use std::time::Duration;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use x402_batcher::chain::{IEip3009, RpcEndpoint};
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::config::SettlementConfig;
use x402_batcher::simulate::simulate;
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::testkit::PaymentBuilder;
use x402_batcher::x402::Reason;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn each_refusal_is_named_and_nothing_changes() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let keys = devnet::payer_keys("simulate", 2);
        let (rich, poor) = (&keys[0], &keys[1]);
        net.fund(&[rich.address()], U256::from(1_000_000u64)).await.unwrap();
        net.fund(&[poor.address()], U256::from(5u64)).await.unwrap();
        let now = SystemClock.now_unix();
        let domain = net.token_domain();
        let b = |k: &PrivateKeySigner, i: u64| PaymentBuilder::new(k, &domain, now).nonce_index(i);

        // Used outside the batch first.
        let used = b(rich, 2).build();
        net.send_batch(std::slice::from_ref(&used)).await.unwrap();

        let items = vec![
            b(rich, 1).build(),
            used,
            b(poor, 1).build(),
            b(rich, 3).signed_by(&PrivateKeySigner::random()).build(),
            b(rich, 4).expired().build(),
            b(rich, 5).not_yet_valid().build(),
        ];
        let endpoint = RpcEndpoint::connect_http(net.chain_id(), net.rpc_url()).unwrap();
        let verdicts = simulate(&endpoint, &items, SettlementConfig::default().seed_gas_limit(items.len()))
            .await
            .unwrap();
        let reasons: Vec<Option<Reason>> =
            verdicts.iter().map(|v| v.as_ref().err().map(|f| f.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                None,
                Some(Reason::NonceAlreadyUsed),
                Some(Reason::InsufficientFunds),
                Some(Reason::InvalidSignature),
                Some(Reason::InvalidValidBefore),
                Some(Reason::InvalidValidAfter),
            ],
            "{verdicts:?}"
        );

        // A simulation is a call: the good item is still unused.
        let token = IEip3009::new(net.token(), net.provider());
        let a = &items[0].authorization;
        assert!(!token.authorizationState(a.from, a.nonce).call().await.unwrap());
        assert!(simulate(&endpoint, &[], 100_000).await.unwrap().is_empty());
    })
    .await
    .expect("bounded");
}
