//! The daemon binary on a devnet with `[metrics] listen`: a scrape after a settled run finds
//! every metric it exports with plausible values, and SIGHUP applies a changed policy from
//! the config file.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use common::binary::{settling_config, start};
use common::metrics::{scrape, series, sum};
use common::settle::Miner;
use x402_batcher::api::v1;
use x402_batcher::client::{self, Client};
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::telemetry::NAMES;
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions};
use x402_batcher::tools::testkit::{self, PaymentBuilder};

const LIMIT: Duration = Duration::from_secs(180);
const PAYMENTS: usize = 50;

/// The settlement policy part of the config (what SIGHUP reloads), and the rest.
fn settlement(batch: usize, depth: u64) -> String {
    format!(
        "confirmations = {depth}\nmax_batch_size = {batch}\n\
         [admission]\nmin_validity_remaining_secs = 1\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [facilitator]\nlisten = \"127.0.0.1:0\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_devnet_run_shows_every_metric_and_sighup_reloads_the_policy() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let payers = devnet::payer_keys("metrics", 10);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let settler = net.new_settlers("metrics", 1).await.unwrap().remove(0);
        let dir = tempfile::tempdir().unwrap();
        let config = settling_config(dir.path(), &net, &settler, &settlement(20, 2));

        let mut daemon = start(&config);
        let facilitator = format!("http://{}", daemon.line_after("facilitator on "));
        let metrics = daemon.line_after("metrics on ");
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        let mut client = Client::connect(daemon.url.clone()).await.unwrap();
        let mut admin = Client::connect(daemon.admin_url.clone()).await.unwrap().admin;
        let payee = Address::repeat_byte(0xbe);
        let now = SystemClock.now_unix();
        let opts = LoadOptions {
            payments: PAYMENTS,
            payers: payers.clone(),
            rate: None,
            streams: 1,
            value: 1_000,
            payees: vec![payee],
            run_id: 1,
        };
        let requests = loadgen::presign(&net.token_domain(), &opts, now);
        let report = loadgen::run(&client, requests.clone(), None, 1).await;
        assert_eq!(report.acked.len(), PAYMENTS);
        // One refusal: signed by someone other than the payer.
        let forged = PaymentBuilder::new(&payers[0], &net.token_domain(), now)
            .nonce_index(999_999)
            .signed_by(&payers[1])
            .build();
        let req = client::typed_request("forged".into(), &forged, &testkit::requirements_for(&forged));
        let reply = client.ingest.submit(req).await.unwrap().into_inner();
        assert!(matches!(reply.outcome, Some(v1::submit_reply::Outcome::Rejected(_))));
        // One payment through the facilitator: verified (held), then settled once included.
        let paid = PaymentBuilder::new(&payers[0], &net.token_domain(), now).nonce_index(888_888).build();
        let body = testkit::facilitator_body(&paid, &testkit::requirements_for(&paid), &net.token_domain());
        let http = reqwest::Client::new();
        for endpoint in ["verify", "settle"] {
            let reply =
                http.post(format!("{facilitator}/{endpoint}")).body(body.clone()).send().await.unwrap();
            let reply: serde_json::Value = reply.json().await.unwrap();
            assert!(reply["isValid"] == true || reply["success"] == true, "{endpoint}: {reply}");
        }
        let paid_total = PAYMENTS + 1;

        // Every payment settled and the engine has seen it (nothing pending in its gauges).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let s = loop {
            let s = series(&scrape(&metrics).await);
            let settled =
                sum(&s, "x402_batcher_payments_final_total", &["status=\"settled\""]).unwrap_or(0.0);
            let pending_value = sum(&s, "x402_batcher_pending_value_base_units", &[]).unwrap_or(1.0);
            if settled == paid_total as f64 && pending_value == 0.0 {
                break s;
            }
            assert!(tokio::time::Instant::now() < deadline, "not settled: {settled} of {paid_total}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };

        // Every exported metric is there (rpc_errors_total appears with the first error,
        // auth_refused_total with the first refusal: tests/it/auth.rs checks it;
        // presimulation_refusals_total with the first payment the token would refuse; the
        // connections' refusals and idle closes with the first: tests/it/connections.rs; the
        // RPC endpoints' gauges only with several endpoints per chain).
        // lease_held only in fleet mode (a shared ledger: tests/it/fleet.rs checks it).
        let later = [
            "x402_batcher_lease_held",
            "x402_batcher_rpc_errors_total",
            "x402_batcher_auth_refused_total",
            "x402_batcher_presimulation_refusals_total",
            "x402_batcher_connections_refused_total",
            "x402_batcher_connections_idle_closed_total",
            "x402_batcher_rpc_endpoint_usable",
            "x402_batcher_rpc_endpoint_lag_blocks",
        ];
        for name in NAMES.iter().filter(|n| !later.contains(n)) {
            let present = s.keys().any(|k| {
                let base = k.split('{').next().unwrap();
                base == *name
                    || base.strip_prefix(*name).is_some_and(|r| ["_count", "_sum", "_bucket"].contains(&r))
            });
            assert!(present, "{name} missing from the scrape");
        }
        let get = |name: &str, labels: &[&str]| {
            sum(&s, name, labels).unwrap_or_else(|| panic!("{name} {labels:?}"))
        };
        assert_eq!(get("x402_batcher_submissions_total", &["outcome=\"accepted\""]), paid_total as f64);
        assert_eq!(get("x402_batcher_submissions_total", &["outcome=\"held\""]), 1.0);
        assert_eq!(get("x402_batcher_holds", &[]), 0.0, "the settle claimed the hold");
        let verified = ["endpoint=\"verify\"", "outcome=\"valid\""];
        assert_eq!(get("x402_batcher_facilitator_requests_total", &verified), 1.0);
        let settled = ["endpoint=\"settle\"", "outcome=\"success\""];
        assert_eq!(get("x402_batcher_facilitator_requests_total", &settled), 1.0);
        assert_eq!(get("x402_batcher_facilitator_settle_wait_seconds_count", &["mode=\"included\""]), 1.0);
        assert_eq!(
            get("x402_batcher_refusals_total", &["reason=\"invalid_exact_evm_payload_signature\""]),
            1.0
        );
        assert!(get("x402_batcher_verify_seconds_count", &[]) >= (paid_total + 2) as f64);
        assert!(get("x402_batcher_ledger_commit_seconds_count", &[]) > 0.0);
        assert_eq!(get("x402_batcher_pending_payments", &[]), 0.0);
        assert_eq!(get("x402_batcher_payments_near_deadline", &[]), 0.0);
        let batches = get("x402_batcher_batches_total", &[]);
        assert!(batches >= (paid_total / 20) as f64, "{batches} batches of at most 20");
        assert_eq!(get("x402_batcher_batch_size_count", &[]), batches);
        assert_eq!(get("x402_batcher_batch_size_sum", &[]), paid_total as f64);
        let gas = get("x402_batcher_batch_gas_per_payment_sum", &[])
            / get("x402_batcher_batch_gas_per_payment_count", &[]);
        assert!((30_000.0..100_000.0).contains(&gas), "gas per payment {gas}");
        assert!(get("x402_batcher_head_block", &[]) > 0.0);
        assert!(get("x402_batcher_base_fee_wei", &[]) > 0.0);
        let settler_label = format!("settler=\"{}\"", settler.address());
        assert!(get("x402_batcher_settler_balance_wei", &[&settler_label]) > 1e18, "funded with 1,000 ETH");
        assert_eq!(get("x402_batcher_transactions_pending", &[]), 0.0);
        assert_eq!(get("x402_batcher_reorgs_total", &[]), 0.0);
        assert_eq!(get("x402_batcher_accept_to_settled_seconds_count", &[]), paid_total as f64);
        let latency = get("x402_batcher_accept_to_settled_seconds_sum", &[]) / paid_total as f64;
        assert!(latency > 0.0 && latency < 90.0, "mean accept-to-settled {latency} s");
        assert!(get("x402_batcher_settlement_round_seconds_count", &[]) > 0.0);
        let last_round = get("x402_batcher_settlement_last_round_timestamp_seconds", &[]);
        assert!((SystemClock.now_unix() as f64 - last_round).abs() < 60.0, "last round at {last_round}");
        assert_eq!(get("x402_batcher_policy_max_batch_size", &[]), 20.0);
        assert_eq!(get("x402_batcher_policy_confirmations", &[]), 2.0);
        assert_eq!(get("x402_batcher_settlement_paused", &[]), 0.0);

        // One payment fails (its nonce is used outside the daemon) and one expires, while
        // settlement is paused; both are counted with their reason codes.
        let pause = |on| v1::UpdatePolicyRequest { paused: Some(on), ..Default::default() };
        admin.update_policy(pause(true)).await.unwrap();
        let now = SystemClock.now_unix();
        let builder =
            |i| PaymentBuilder::new(&payers[i], &net.token_domain(), now).nonce_index(500_000 + i as u64);
        let outside = builder(2).build();
        let expiring = builder(3).valid_before(now + 3).build();
        let mut ids = Vec::new();
        for p in [&outside, &expiring] {
            let req = client::typed_request("late".into(), p, &testkit::requirements_for(p));
            match client.ingest.submit(req).await.unwrap().into_inner().outcome {
                Some(v1::submit_reply::Outcome::Accepted(a)) => ids.push(a.payment_id),
                other => panic!("{other:?}"),
            }
        }
        assert!(net.send_batch(std::slice::from_ref(&outside)).await.unwrap().status());
        let state = |c: &Client, id: String| {
            let mut payments = c.payments.clone();
            async move {
                let req = v1::GetPaymentRequest { key: Some(v1::get_payment_request::Key::PaymentId(id)) };
                v1::PaymentStatus::try_from(payments.get_payment(req).await.unwrap().into_inner().status)
                    .unwrap()
            }
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while state(&client, ids[1].clone()).await != v1::PaymentStatus::Expired {
            assert!(tokio::time::Instant::now() < deadline, "the payment did not expire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin.update_policy(pause(false)).await.unwrap();
        while state(&client, ids[0].clone()).await != v1::PaymentStatus::Failed {
            assert!(tokio::time::Instant::now() < deadline, "the payment did not fail");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let s = series(&scrape(&metrics).await);
        let failed = ["status=\"failed\"", "reason=\"invalid_exact_evm_nonce_already_used\""];
        assert_eq!(sum(&s, "x402_batcher_payments_final_total", &failed), Some(1.0));
        let expired =
            ["status=\"expired\"", "reason=\"invalid_exact_evm_payload_authorization_valid_before\""];
        assert_eq!(sum(&s, "x402_batcher_payments_final_total", &expired), Some(1.0));
        assert_eq!(
            sum(&s, "x402_batcher_payments_final_total", &["status=\"settled\""]),
            Some(paid_total as f64)
        );

        // SIGHUP: the file's new policy applies without a restart, in Admin and in metrics.
        settling_config(dir.path(), &net, &settler, &settlement(7, 5));
        daemon.signal("HUP");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let p = admin.get_policy(v1::GetPolicyRequest {}).await.unwrap().into_inner();
            if (p.max_batch_size, p.confirmation_depth) == (7, 5) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "SIGHUP did not apply: {p:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = series(&scrape(&metrics).await);
        assert_eq!(sum(&s, "x402_batcher_policy_max_batch_size", &[]), Some(7.0));
        assert_eq!(sum(&s, "x402_batcher_policy_confirmations", &[]), Some(5.0));

        daemon.signal("TERM");
        assert!(daemon.child.wait().unwrap().success());
    })
    .await
    .expect("within the time limit");
}
