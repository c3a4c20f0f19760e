//! A nonce used on chain outside the daemon fails its accepted payment, with the official
//! code, and never becomes settled; unused nonces are left alone.

mod common;

use std::time::Duration;

use common::daemon::TestDaemon;
use futures::StreamExt;
use x402_batcher::api::v1;
use x402_batcher::chain::{self};
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::testkit::{self, PaymentBuilder};

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
