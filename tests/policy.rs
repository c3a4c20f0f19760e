//! The settlement policy at runtime, through the Admin service: read, refused when bad
//! (nothing changes), and applied from the next batch without a restart: pause, max batch
//! size and confirmation depth.

// A failed unwrap fails the test that made it.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::Address;
use common::daemon::TestDaemon;
use common::settle::{ledger_after, settling_daemon, status, submit, wait_for};
use tonic::transport::Channel;
use x402_batcher::api::v1;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::devnet::Devnet;
use x402_batcher::tools::testkit::PaymentBuilder;

const LIMIT: Duration = Duration::from_secs(120);
/// How long one wait for payment states may take: below LIMIT, so a stuck wait reports the
/// states it saw.
const WAIT: Duration = Duration::from_secs(60);
const PAYEE: Address = Address::repeat_byte(0xbe);

async fn admin(d: &TestDaemon) -> v1::admin_client::AdminClient<Channel> {
    v1::admin_client::AdminClient::connect(d.admin_url()).await.unwrap()
}

/// The engine's completed rounds, from the process's metrics (the daemon runs in-process).
fn rounds() -> u64 {
    let text = x402_batcher::telemetry::install().expect("recorder installed").render();
    text.lines()
        .find(|l| l.starts_with("x402_batcher_settlement_round_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_through_admin_apply_from_the_next_batch_and_bad_values_are_refused() {
    tokio::time::timeout(LIMIT, async {
        let devnet = Arc::new(Devnet::start().await.unwrap());
        let d = settling_daemon(&devnet, "policy", 1, |c| {
            c.settlement.max_batch_size = 200;
            c.settlement.confirmations = 3;
        })
        .await;
        let mut admin = admin(&d).await;

        let p = admin.get_policy(v1::GetPolicyRequest {}).await.unwrap().into_inner();
        assert_eq!(
            (
                p.max_batch_size,
                p.confirmation_depth,
                p.max_wait_seconds,
                p.max_wait_ms,
                p.linger_ms,
                p.paused
            ),
            (200, 3, 1, 1_000, 250, false)
        );

        // A bad value refuses the whole update, naming the field; nothing changes.
        for (req, field) in [
            (
                v1::UpdatePolicyRequest { max_batch_size: Some(0), paused: Some(true), ..Default::default() },
                "max_batch_size",
            ),
            (v1::UpdatePolicyRequest { confirmation_depth: Some(0), ..Default::default() }, "confirmations"),
            (
                v1::UpdatePolicyRequest {
                    max_wait_ms: Some(500),
                    max_wait_seconds: Some(1),
                    ..Default::default()
                },
                "max_wait_ms",
            ),
            (v1::UpdatePolicyRequest { linger_ms: Some(60_001), ..Default::default() }, "linger_ms"),
            (
                v1::UpdatePolicyRequest {
                    target_cost_per_payment_wei: Some("ten".into()),
                    ..Default::default()
                },
                "target_cost_per_payment_wei",
            ),
        ] {
            let e = admin.update_policy(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(field), "{field}: {}", e.message());
        }
        assert_eq!(admin.get_policy(v1::GetPolicyRequest {}).await.unwrap().into_inner(), p);

        // Waits in milliseconds; the seconds field still works for older callers.
        let ms =
            v1::UpdatePolicyRequest { max_wait_ms: Some(1_500), linger_ms: Some(100), ..Default::default() };
        let changed = admin.update_policy(ms).await.unwrap().into_inner();
        assert_eq!((changed.max_wait_ms, changed.max_wait_seconds, changed.linger_ms), (1_500, 1, 100));
        let secs =
            v1::UpdatePolicyRequest { max_wait_seconds: Some(1), linger_ms: Some(250), ..Default::default() };
        assert_eq!(admin.update_policy(secs).await.unwrap().into_inner(), p);

        // Paused: payments are accepted and wait, round after round.
        let paused = v1::UpdatePolicyRequest { paused: Some(true), ..Default::default() };
        assert!(admin.update_policy(paused).await.unwrap().into_inner().paused);
        let status_paused = admin.get_status(v1::GetStatusRequest {}).await.unwrap().into_inner();
        assert!(status_paused.paused);
        let payers = d.payers("policy", 5, 1_000_000).await;
        let now = SystemClock.now_unix();
        let items: Vec<_> = (0..10)
            .map(|i| {
                PaymentBuilder::new(&payers[i % payers.len()], &d.domain(), now)
                    .to(PAYEE)
                    .nonce_index(i as u64)
                    .build()
            })
            .collect();
        let mut ids = Vec::new();
        for s in &items {
            ids.push(submit(&d, s).await);
        }
        let seen = rounds();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while rounds() < seen + 20 {
            assert!(tokio::time::Instant::now() < deadline, "the engine stopped running rounds");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held = wait_for(&d, &ids, WAIT, |_| true).await;
        assert!(
            held.iter().all(|p| status(p) == v1::PaymentStatus::Accepted),
            "nothing batched while paused"
        );

        // Resume with at most 4 per batch and depth 1. Nothing mines but the batches
        // themselves (automine), so only depth 1 lets the last batch settle.
        let resume = v1::UpdatePolicyRequest {
            paused: Some(false),
            max_batch_size: Some(4),
            confirmation_depth: Some(1),
            ..Default::default()
        };
        let p = admin.update_policy(resume).await.unwrap().into_inner();
        assert_eq!((p.max_batch_size, p.confirmation_depth, p.paused), (4, 1, false));
        let settled = |p: &v1::Payment| status(p) == v1::PaymentStatus::Settled;
        wait_for(&d, &ids, WAIT, settled).await;
        let dir = Arc::clone(&d.dir);
        d.stop().await;
        let (log, batches) = ledger_after(dir.path(), devnet.chain_id());
        assert_eq!(log.len(), 10);
        assert!(batches.len() >= 3 && batches.iter().all(|b| b.items.len() <= 4), "{batches:?}");
    })
    .await
    .expect("within the time limit");
}
