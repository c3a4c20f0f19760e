//! The facilitator HTTP API's own rules, over real HTTP on 127.0.0.1, a real anvil and a
//! real ledger (no Node: the middlewares' side is tests/interop.rs): holds and their
//! claims, replays refused on either surface, payment-identifier retries, lapsing holds,
//! the drain, malformed and oversized bodies, the status URL, TLS with a bearer token, and
//! a hold placed on one daemon of a fleet holding on the others.

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use common::daemon::TestDaemon;
use common::settle::{Miner, settle_with};
use common::store::{Backend, TestLedger};
use serde_json::{Value, json};
use x402_batcher::api::v1;
use x402_batcher::client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::config::{Config, CredentialConfig, Role, SettleMode, TlsConfig};
use x402_batcher::ledger::LedgerStore as _;
use x402_batcher::ledger::{RocksLedger, Status};
use x402_batcher::tools::devnet::Devnet;
use x402_batcher::tools::testkit::{self, PaymentBuilder};
use x402_batcher::x402::SignedAuthorization;

const LIMIT: Duration = Duration::from_secs(120);

/// A settling daemon with the facilitator on, `tune`d.
async fn daemon(
    seed: &str,
    tune: impl FnOnce(&mut Config) + Send + 'static,
) -> (TestDaemon, PrivateKeySigner, Miner) {
    let net = Arc::new(Devnet::start().await.unwrap());
    let settlers = net.new_settlers(seed, 1).await.unwrap();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path = dir.path().to_owned();
    let d = TestDaemon::start_on(Arc::clone(&net), dir, move |c| {
        settle_with(c, &path, &settlers);
        c.facilitator.listen = Some("127.0.0.1:0".parse().unwrap());
        tune(c);
    })
    .await;
    let payer = d.payers(seed, 1, 10_000_000).await.remove(0);
    let miner = Miner::start(net, Duration::from_millis(100), None);
    (d, payer, miner)
}

/// A facilitator body for a fresh payment of `payer` (nonce `i`), with an optional
/// payment-identifier.
fn body(d: &TestDaemon, payer: &PrivateKeySigner, i: u64, payment_identifier: Option<&str>) -> String {
    let signed = PaymentBuilder::new(payer, &d.domain(), SystemClock.now_unix()).nonce_index(i).build();
    body_of(d, &signed, payment_identifier)
}

/// The facilitator body carrying `signed` (the same authorization another surface may send).
fn body_of(d: &TestDaemon, signed: &SignedAuthorization, payment_identifier: Option<&str>) -> String {
    let mut v: Value = serde_json::from_str(&testkit::facilitator_body(
        signed,
        &testkit::requirements_for(signed),
        &d.domain(),
    ))
    .unwrap();
    if let Some(id) = payment_identifier {
        v["paymentPayload"]["extensions"] =
            json!({ "payment-identifier": { "info": { "required": false, "id": id } } });
    }
    v.to_string()
}

async fn post(url: &str, path: &str, body: &str) -> (u16, Value) {
    let reply =
        reqwest::Client::new().post(format!("{url}{path}")).body(body.to_owned()).send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

fn reason(v: &Value) -> &str {
    v["invalidReason"].as_str().or(v["errorReason"].as_str()).unwrap_or("")
}

/// A payment verified once is held: verifying it again, or settling it through the other
/// surface's replay, is refused; its settle claims the hold; after it, every verify or
/// settle of it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_payment_is_held_then_settled_once() {
    tokio::time::timeout(LIMIT, async {
        let (d, payer, _miner) = daemon("held", |_| {}).await;
        let url = d.facilitator_url();
        let b = body(&d, &payer, 1, None);
        let (status, v) = post(&url, "/verify", &b).await;
        assert_eq!((status, v["isValid"].clone()), (200, json!(true)), "{v}");
        assert_eq!(v["payer"], payer.address().to_checksum(None));
        let (_, again) = post(&url, "/verify", &b).await;
        assert_eq!((again["isValid"].clone(), reason(&again)), (json!(false), "invalid_exact_evm_nonce_already_used"));
        assert!(again["invalidMessage"].as_str().unwrap().contains("held"), "{again}");

        let (status, settled) = post(&url, "/settle", &b).await;
        assert_eq!((status, settled["success"].clone()), (200, json!(true)), "{settled}");
        let tx = settled["transaction"].as_str().unwrap();
        assert_eq!(tx.len(), 66, "the including transaction's hash: {settled}");
        for path in ["/verify", "/settle"] {
            let (_, v) = post(&url, path, &b).await;
            assert_eq!(reason(&v), "invalid_exact_evm_nonce_already_used", "{path} after the settle: {v}");
        }

        // The status URL in the settle's extensions.
        let status_url = settled["extensions"]["x402-batcher"]["statusUrl"].as_str().unwrap();
        let view: Value = reqwest::get(format!("{url}{status_url}")).await.unwrap().json().await.unwrap();
        assert_eq!(view["transaction"], tx);
        assert!(["included", "settled"].contains(&view["status"].as_str().unwrap()), "{view}");
        let missing = reqwest::get(format!("{url}/payments/0x{}", "00".repeat(16))).await.unwrap();
        assert_eq!(missing.status().as_u16(), 404);
        let malformed = reqwest::get(format!("{url}/payments/nope")).await.unwrap();
        assert_eq!(malformed.status().as_u16(), 400);

        // Verified over HTTP, then submitted over gRPC (a replay through the other surface):
        // one acceptance between them, the HTTP settle is refused.
        // One authorization for both surfaces (built twice, a second boundary between the two
        // builds would make two authorizations with one nonce).
        let signed = PaymentBuilder::new(&payer, &d.domain(), SystemClock.now_unix()).nonce_index(2).build();
        let b2 = body_of(&d, &signed, None);
        assert_eq!(post(&url, "/verify", &b2).await.1["isValid"], true);
        let req = client::typed_request("grpc".into(), &signed, &testkit::requirements_for(&signed));
        let reply = d.ingest().await.submit(req).await.unwrap().into_inner();
        assert!(
            matches!(reply.outcome, Some(v1::submit_reply::Outcome::Accepted(ref a)) if a.repeat == v1::Repeat::New as i32),
            "{reply:?}"
        );
        let (_, v) = post(&url, "/settle", &b2).await;
        assert_eq!(reason(&v), "invalid_exact_evm_nonce_already_used", "{v}");
        d.stop().await;
    })
    .await
    .expect("bounded");
}

/// Two daemons of a fleet on one PostgreSQL ledger, one settler key between them: a header
/// verified on one is held on the other too (its `/verify` refused: the nonce is held), and
/// settled through the other, which claims the hold; the payment is recorded and settled
/// once, and neither daemon verifies or settles it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_verified_on_one_daemon_of_a_fleet_is_held_on_the_others() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let settlers = net.new_settlers("fleet-hold", 1).await.unwrap();
        let ledger = TestLedger::new(Backend::Postgres);
        let mut fleet = Vec::new();
        for _ in 0..2 {
            let (path, settlers) = (ledger.dir.path().to_owned(), settlers.clone());
            fleet.push(
                TestDaemon::start_on_ledger(Arc::clone(&net), Arc::clone(&ledger), move |c| {
                    settle_with(c, &path, &settlers);
                    c.settlement.lease_ms = 1_000;
                    c.facilitator.listen = Some("127.0.0.1:0".parse().unwrap());
                })
                .await,
            );
        }
        let payer = fleet[0].payers("fleet-hold", 1, 10_000_000).await.remove(0);
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(100), None);
        let (one, other) = (fleet[0].facilitator_url(), fleet[1].facilitator_url());
        let b = body(&fleet[0], &payer, 1, None);

        let (_, v) = post(&one, "/verify", &b).await;
        assert_eq!(v["isValid"], true, "{v}");
        let (_, again) = post(&other, "/verify", &b).await;
        assert_eq!(reason(&again), "invalid_exact_evm_nonce_already_used", "{again}");
        assert!(again["invalidMessage"].as_str().unwrap().contains("held"), "{again}");

        let (status, settled) = post(&other, "/settle", &b).await;
        assert_eq!((status, settled["success"].clone()), (200, json!(true)), "{settled}");
        for (url, path) in [(&one, "/verify"), (&one, "/settle"), (&other, "/verify")] {
            let (_, v) = post(url, path, &b).await;
            assert_eq!(reason(&v), "invalid_exact_evm_nonce_already_used", "{path} after the settle: {v}");
        }
        let records = ledger.open().records().unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            records[0].tx_hash.map(|h| h.to_string()).as_deref(),
            settled["transaction"].as_str(),
            "settled in the transaction /settle named"
        );
        for d in fleet {
            d.stop().await;
        }
    })
    .await
    .expect("bounded");
}

/// The same x402 payment-identifier gets the first answer again, at /verify and /settle;
/// the same payment without it is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_identifier_gets_the_first_answer_again() {
    tokio::time::timeout(LIMIT, async {
        let (d, payer, _miner) = daemon("pid", |_| {}).await;
        let url = d.facilitator_url();
        let keyed = body(&d, &payer, 1, Some("pay_7d5d747be160e280504c099d984bcfe0"));
        for _ in 0..2 {
            assert_eq!(post(&url, "/verify", &keyed).await.1["isValid"], true);
        }
        let (_, first) = post(&url, "/settle", &keyed).await;
        assert_eq!(first["success"], true, "{first}");
        let (_, second) = post(&url, "/settle", &keyed).await;
        assert_eq!(
            (second["success"].clone(), second["transaction"].clone()),
            (json!(true), first["transaction"].clone())
        );
        assert_eq!(post(&url, "/verify", &keyed).await.1["isValid"], true);
        let unkeyed = body(&d, &payer, 1, None);
        assert_eq!(reason(&post(&url, "/settle", &unkeyed).await.1), "invalid_exact_evm_nonce_already_used");
        let ledger = RocksLedger::open_read_only(&d.dir.path().join("ledger")).unwrap();
        assert_eq!(ledger.records().unwrap().len(), 1, "one payment");
        d.stop().await;
    })
    .await
    .expect("bounded");
}

/// A hold nobody claims lapses: nothing is recorded or charged, and the payment can be
/// verified again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclaimed_hold_lapses() {
    tokio::time::timeout(LIMIT, async {
        let (d, payer, _miner) = daemon("lapse", |c| c.facilitator.hold_ms = 1_000).await;
        let url = d.facilitator_url();
        let b = body(&d, &payer, 1, None);
        assert_eq!(post(&url, "/verify", &b).await.1["isValid"], true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, v) = post(&url, "/verify", &b).await;
            if v["isValid"] == true {
                break;
            }
            assert_eq!(reason(&v), "invalid_exact_evm_nonce_already_used");
            assert!(tokio::time::Instant::now() < deadline, "the hold did not lapse");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ledger = RocksLedger::open_read_only(&d.dir.path().join("ledger")).unwrap();
        assert!(ledger.records().unwrap().is_empty(), "a hold records nothing");
        assert_eq!(d.devnet.balance_of(payer.address()).await.unwrap(), U256::from(10_000_000u64));
        d.stop().await;
    })
    .await
    .expect("bounded");
}

/// A settle waiting on paused settlement answers at once when the daemon drains: the
/// payment, in no transaction yet, is withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_waiting_settles_at_once() {
    tokio::time::timeout(LIMIT, async {
        let (d, payer, _miner) = daemon("drain", |c| c.facilitator.settle_timeout_ms = 40_000).await;
        let url = d.facilitator_url();
        let pause = v1::UpdatePolicyRequest { paused: Some(true), ..Default::default() };
        d.admin().await.update_policy(pause).await.unwrap();
        let b = body(&d, &payer, 1, None);
        let waiting = tokio::spawn({
            let url = url.clone();
            async move { post(&url, "/settle", &b).await }
        });
        let dir = Arc::clone(&d.dir);
        let ledger_path = dir.path().join("ledger");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while RocksLedger::open_read_only(&ledger_path).unwrap().records().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the settle did not record its payment");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stopped = std::time::Instant::now();
        d.stop().await;
        let (status, v) = waiting.await.unwrap();
        assert!(stopped.elapsed() < Duration::from_secs(15), "answered at the drain, not at the timeout");
        assert_eq!((status, reason(&v)), (200, "unexpected_settle_error"), "{v}");
        let record = RocksLedger::open_read_only(&ledger_path).unwrap().records().unwrap().remove(0);
        assert_eq!(record.status, Status::Failed);
        assert!(record.failure_message.contains("withdrawn"), "{}", record.failure_message);
    })
    .await
    .expect("bounded");
}

/// Bodies that are not facilitator requests are 400 with a reason; oversized ones 413;
/// a payment the protocol refuses is 200 with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_bodies_are_refused() {
    tokio::time::timeout(LIMIT, async {
        let (d, payer, _miner) = daemon("bodies", |_| {}).await;
        let url = d.facilitator_url();
        for path in ["/verify", "/settle"] {
            let (status, v) = post(&url, path, "not json").await;
            assert_eq!((status, reason(&v)), (400, "invalid_payload"), "{path}: {v}");
            let (status, _) = post(&url, path, &"x".repeat(70_000)).await;
            assert_eq!(status, 413, "{path}");
        }
        let mut forged: Value = serde_json::from_str(&body(&d, &payer, 1, None)).unwrap();
        forged["paymentPayload"]["payload"]["authorization"]["value"] = json!("20000");
        forged["paymentRequirements"]["amount"] = json!("20000");
        forged["paymentPayload"]["accepted"]["amount"] = json!("20000");
        let (status, v) = post(&url, "/verify", &forged.to_string()).await;
        assert_eq!((status, reason(&v)), (200, "invalid_exact_evm_payload_signature"), "{v}");
        d.stop().await;
    })
    .await
    .expect("bounded");
}

/// Over TLS with a bearer token, as a middleware behind `createAuthHeaders` calls it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facilitator_serves_tls_with_a_bearer_token() {
    tokio::time::timeout(LIMIT, async {
        let ca = common::pki::Ca::new("test CA");
        let server = ca.server("localhost");
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
        std::fs::write(&cert, &server.cert).unwrap();
        std::fs::write(&key, &server.key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = "x4b_facilitator_tls";
        let credential = |name: &str, role, t: &str| CredentialConfig {
            name: name.into(),
            role,
            token_sha256: Some(hex::encode(x402_batcher::auth::hash_token(t))),
            cert_name: None,
        };
        let net = Devnet::start().await.unwrap();
        let payer = x402_batcher::tools::devnet::payer_keys("tls", 1).remove(0);
        net.fund(&[payer.address()], U256::from(10_000_000u64)).await.unwrap();
        let mut config = Config::parse("").unwrap();
        config.tokens.push(net.token_config());
        config.chains.push(net.chain_config());
        config.ledger.path = Some(dir.path().join("ledger"));
        config.tls = Some(TlsConfig { cert_file: cert, key_file: key, client_ca_file: None });
        config.facilitator.listen = Some("127.0.0.1:0".parse().unwrap());
        config.facilitator.settle_mode = SettleMode::Accepted;
        config.credentials =
            vec![credential("shop", Role::Api, token), credential("ops", Role::Admin, "x4b_ops")];
        let listeners = x402_batcher::daemon::Listeners::loopback_with_facilitator().await.unwrap();
        let port = listeners.facilitator.as_ref().unwrap().local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving =
            tokio::spawn(x402_batcher::daemon::serve(config, listeners, Arc::new(SystemClock), async {
                let _ = stopped.await;
            }));

        let https = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
            .build()
            .unwrap();
        let url = format!("https://localhost:{port}");
        // Up once /health answers over TLS (a poll with a deadline: start-up checks the chain).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !https.get(format!("{url}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            assert!(tokio::time::Instant::now() < deadline, "the facilitator did not come up over TLS");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let domain = net.token_domain();
        let signed = PaymentBuilder::new(&payer, &domain, SystemClock.now_unix()).nonce_index(1).build();
        let b = testkit::facilitator_body(&signed, &testkit::requirements_for(&signed), &domain);
        let refused = https.post(format!("{url}/settle")).body(b.clone()).send().await.unwrap();
        assert_eq!(refused.status().as_u16(), 401);
        let reply = https.post(format!("{url}/settle")).bearer_auth(token).body(b).send().await.unwrap();
        assert_eq!(reply.status().as_u16(), 200);
        let v: Value = reply.json().await.unwrap();
        assert_eq!(
            (v["success"].clone(), v["transaction"].clone()),
            (json!(true), json!("")),
            "accepted mode: {v}"
        );
        let _ = stop.send(());
        serving.await.unwrap().unwrap();
        let ledger = RocksLedger::open_read_only(&dir.path().join("ledger")).unwrap();
        assert_eq!(ledger.records().unwrap()[0].submission.api_server, "shop", "named after the credential");
    })
    .await
    .expect("bounded");
}
