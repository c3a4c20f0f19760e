//! Our digest, our contracts and the chain agree: a payment verified offline settles on
//! anvil through the aggregate3 contract and leaves its `AuthorizationUsed` log, and the
//! token itself accepts exactly the viem vectors we label valid.

use crate::common;

use std::time::Duration;

use alloy::primitives::{Address, U256};
use serde::Deserialize;
use x402_batcher::api::{self, v1};
use x402_batcher::chain::{self, IEip3009};
use x402_batcher::clock::{Clock, ManualClock, SystemClock};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::testkit::PaymentBuilder;
use x402_batcher::verify::VerifyPool;
use x402_batcher::x402::SignedAuthorization;

/// Every test here is bounded: anvil answers in milliseconds.
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn verified_authorization_settles_through_aggregate3() {
    tokio::time::timeout(LIMIT, async {
        let devnet = Devnet::start().await.unwrap();
        let domain = devnet.token_domain();
        chain::check_domain(devnet.provider(), &domain).await.unwrap();

        let payer = devnet::payer_keys("settle-test", 1).remove(0);
        devnet.fund(&[payer.address()], U256::from(1_000_000u64)).await.unwrap();
        let now = SystemClock.now_unix();
        let payee = Address::repeat_byte(0x42);
        let builder = PaymentBuilder::new(&payer, &domain, now).to(payee).value(250_000);

        // Verify exactly as a submission would be: message conversion, admission, pool.
        let req = v1::SubmitRequest {
            payment: Some(v1::submit_request::Payment::Authorization(api::typed_authorization(
                &builder.build(),
            ))),
            requirements: Some(v1::PaymentRequirements {
                scheme: "exact".into(),
                network: format!("eip155:{}", devnet.chain_id()),
                asset: devnet.token().to_string(),
                pay_to: payee.to_string(),
                amount: "250000".into(),
                max_timeout_seconds: 300,
            }),
            ..Default::default()
        };
        let admission = common::admission(&[devnet.token_config()], ManualClock::new(now));
        let pool = VerifyPool::new(1, 16).unwrap();
        let admitted = common::judge(&admission, &pool, &req).await.expect("payment verifies");

        // A second item whose nonce is already used must fail alone, not sink the batch.
        let receipt = devnet.send_batch(&[admitted.signed.clone(), admitted.signed.clone()]).await.unwrap();
        assert!(receipt.status(), "the batch transaction succeeds");
        let used = chain::authorizations_used(&receipt, devnet.token());
        let a = &admitted.signed.authorization;
        assert_eq!(used, vec![(a.from, a.nonce)], "exactly one AuthorizationUsed, for our payment");
        assert_eq!(devnet.balance_of(payee).await.unwrap(), U256::from(250_000u64));
        assert_eq!(devnet.balance_of(payer.address()).await.unwrap(), U256::from(750_000u64));
        let token = IEip3009::new(devnet.token(), devnet.provider());
        assert!(token.authorizationState(a.from, a.nonce).call().await.unwrap());
    })
    .await
    .expect("test finished within its time limit");
}

#[derive(Deserialize)]
struct VectorFile {
    now: u64,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    id: String,
    form: String,
    expect: String,
    #[serde(default)]
    authorization: Option<serde_json::Value>,
}

/// The token on chain is the final judge of a signature: it must accept every viem vector we
/// call valid and refuse every one we refuse for its signature.
#[tokio::test]
async fn chain_agrees_with_the_signature_labels() {
    tokio::time::timeout(LIMIT, async {
        let devnet = Devnet::start().await.unwrap();
        let path = format!("{}/tests/vectors/viem.json", env!("CARGO_MANIFEST_DIR"));
        let file: VectorFile = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();

        let mut judged: Vec<(String, bool, SignedAuthorization)> = Vec::new();
        for v in &file.vectors {
            let Some(a) = &v.authorization else { continue };
            let Some(a) = (v.form == "typed").then(|| typed(a)) else {
                continue;
            };
            if a.chain_id != devnet.chain_id() {
                continue;
            }
            // Requirement mismatches and time windows are the daemon's own policy; the
            // token judges only the signature.
            let should_settle = match v.expect.as_str() {
                "valid" => true,
                "invalid_exact_evm_payload_signature" => false,
                _ => continue,
            };
            let signed = api::signed_authorization(&a).unwrap();
            assert_eq!(
                signed.token,
                devnet.token(),
                "vectors assume the devnet token's deterministic address"
            );
            judged.push((v.id.clone(), should_settle, signed));
        }
        assert!(judged.len() >= 20, "only {} vectors to judge", judged.len());

        let mut payers: Vec<Address> = judged.iter().map(|(_, _, s)| s.authorization.from).collect();
        payers.sort();
        payers.dedup();
        devnet.fund(&payers, U256::from(1_000_000_000u64)).await.unwrap();
        // The vectors are valid around their file's clock; mine the batch then.
        devnet.raw::<_, serde_json::Value>("evm_setNextBlockTimestamp", [file.now]).await.unwrap();

        let items: Vec<SignedAuthorization> = judged.iter().map(|(_, _, s)| s.clone()).collect();
        let receipt = devnet.send_batch(&items).await.unwrap();
        assert!(receipt.status());
        let used = chain::authorizations_used(&receipt, devnet.token());
        let mut disagreements = Vec::new();
        for (id, should_settle, s) in &judged {
            let settled = used.contains(&(s.authorization.from, s.authorization.nonce));
            if settled != *should_settle {
                disagreements.push(format!("{id}: labelled settle={should_settle}, chain settled={settled}"));
            }
        }
        assert!(disagreements.is_empty(), "chain disagrees:\n{}", disagreements.join("\n"));
        let valid = judged.iter().filter(|(_, ok, _)| *ok).count();
        assert_eq!(used.len(), valid, "one AuthorizationUsed per valid vector, none for the others");
    })
    .await
    .expect("test finished within its time limit");
}

fn typed(a: &serde_json::Value) -> v1::TypedAuthorization {
    let s = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
    v1::TypedAuthorization {
        chain_id: a["chain_id"].as_u64().unwrap_or_default(),
        token: s("token"),
        from: s("from"),
        to: s("to"),
        value: s("value"),
        valid_after: s("validAfter"),
        valid_before: s("validBefore"),
        nonce: s("nonce"),
        signature: s("signature"),
    }
}
