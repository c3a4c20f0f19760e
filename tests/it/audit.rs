//! A nonce used on chain outside the daemon fails its accepted payment, with the official
//! code, and never becomes settled; unused nonces are left alone.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::U256;

use common::daemon::TestDaemon;
use futures::StreamExt;
use x402_batcher::api::v1;
use x402_batcher::audit::NonceAudit;
use x402_batcher::chain::{self};
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::ledger::{
    AcceptOutcome, AcceptRequest, AuthKey, LedgerHandle, RocksLedger, Status, Submission, TransitionRequest,
};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::testkit::{self, PaymentBuilder};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_nonce_spent_elsewhere_fails_its_payment() {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start(|c| c.audit.nonce_interval_ms = 50).await;
        let payer = d.payers("audit", 1, 1_000_000).await.remove(0);
        let base = PaymentBuilder::new(&payer, &d.domain(), SystemClock.now_unix());
        let (spent, kept) = (base.clone().nonce_index(1).build(), base.clone().nonce_index(2).build());
        let mut ingest = d.ingest().await;
        for s in [&spent, &kept] {
            let req = x402_batcher::client::typed_request("r".into(), s, &testkit::requirements_for(s));
            let reply = ingest.submit(req).await.unwrap().into_inner();
            assert!(matches!(reply.outcome, Some(v1::submit_reply::Outcome::Accepted(_))));
        }

        // Someone else settles `spent` directly (another facilitator, the payer).
        let receipt = d.devnet.send_batch(std::slice::from_ref(&spent)).await.unwrap();
        assert_eq!(chain::authorizations_used(&receipt, spent.token).len(), 1);

        // The periodic audit notices: FAILED with the official code.
        let mut payments = d.payments().await;
        let mut watch = payments
            .watch_payments(v1::WatchPaymentsRequest {
                after_seq: 0,
                statuses: vec![v1::PaymentStatus::Failed as i32],
            })
            .await
            .unwrap()
            .into_inner();
        let event = watch.next().await.unwrap().unwrap();
        let failed = event.payment.unwrap();
        assert_eq!(failed.authorization.unwrap().nonce, spent.authorization.nonce.to_string());
        assert_eq!(failed.failure_reason, "invalid_exact_evm_nonce_already_used");

        let kept_now = payments
            .get_payment(v1::GetPaymentRequest {
                key: Some(v1::get_payment_request::Key::AuthorizationKey(v1::AuthorizationKey {
                    chain_id: kept.chain_id,
                    token: kept.token.to_string(),
                    from: kept.authorization.from.to_string(),
                    nonce: kept.authorization.nonce.to_string(),
                })),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(kept_now.status, v1::PaymentStatus::Accepted as i32, "an unused nonce is left alone");
        d.stop().await;
    })
    .await
    .expect("bounded");
}

/// A payment that was in a batch of ours and went back to accepted (its transaction was
/// dropped or reorged out) is not the audit's: the transaction may still be mined, and
/// then the payment settled. The settlement engine judges it with the chain's logs
/// (tests/it/settlement.rs); a never-batched one with a used nonce is failed as before.
#[tokio::test]
async fn a_payment_once_batched_is_left_to_the_settlement_engine() {
    tokio::time::timeout(LIMIT, async {
        let devnet = Devnet::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(RocksLedger::open(&dir.path().join("ledger")).unwrap());
        let (handle, writer) = LedgerHandle::start(ledger, 16).unwrap();
        let payer = devnet::payer_keys("audit-batched", 1).remove(0);
        devnet.fund(&[payer.address()], U256::from(1_000_000u64)).await.unwrap();
        let base = PaymentBuilder::new(&payer, &devnet.token_domain(), SystemClock.now_unix());
        let (batched, never) = (base.clone().nonce_index(1).build(), base.clone().nonce_index(2).build());
        for s in [&batched, &never] {
            let outcome = handle
                .accept(AcceptRequest {
                    signed: s.clone(),
                    submission: Submission::default(),
                    balance: U256::from(1_000_000u64),
                    window: Ok(()),
                    now_ms: 1,
                })
                .await
                .unwrap();
            assert!(matches!(outcome, AcceptOutcome::Accepted(_)));
        }
        // Into a batch and back, as the engine does when a batch is abandoned.
        let key = AuthKey::of(&batched);
        let mut t = TransitionRequest::new(key, Status::Batched, 2);
        t.batch_id = Some("1:1".into());
        handle.transition(t).await.unwrap();
        handle.transition(TransitionRequest::new(key, Status::Accepted, 3)).await.unwrap();

        // Both nonces used on chain.
        let receipt = devnet.send_batch(&[batched.clone(), never.clone()]).await.unwrap();
        assert_eq!(chain::authorizations_used(&receipt, batched.token).len(), 2);

        let endpoint = chain::RpcEndpoint::connect_http(devnet.chain_id(), devnet.rpc_url()).unwrap();
        let audit = NonceAudit::new(handle.clone(), HashMap::from([(devnet.chain_id(), endpoint)]));
        let report = audit.run_once(4).await.unwrap();
        assert_eq!((report.checked, report.failed), (1, 1), "only the never-batched payment is checked");
        let ledger = handle.ledger();
        assert_eq!(ledger.get(&AuthKey::of(&never)).unwrap().unwrap().status, Status::Failed);
        assert_eq!(ledger.get(&key).unwrap().unwrap().status, Status::Accepted);
        // RocksDB closed before the process exits (not by a writer thread still closing it).
        handle.stop();
        writer.join().unwrap();
    })
    .await
    .expect("bounded");
}
