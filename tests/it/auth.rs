//! Authentication of the daemon binary's two listeners, over TLS: mutual TLS (no
//! certificate, a certificate from the wrong CA, an unknown name, a caller on the wrong
//! listener) and bearer tokens (wrong, revoked by a SIGHUP, Admin called with an API
//! server's). Every refused call is logged with its peer and counted, and none is
//! processed: the payment first offered by refused callers is new when an authorized one
//! submits it.

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use alloy::primitives::Address;
use common::binary::{Daemon, start, write_config};
use common::metrics::{scrape, series, sum};
use common::pki::{Ca, Leaf};
use tonic::Code;
use x402_batcher::api::v1;
use x402_batcher::client::{Client, ClientAuth, ClientError};
use x402_batcher::tools::devnet::Devnet;

const LIMIT: Duration = Duration::from_secs(120);

/// Server certificate and key from `ca`, written to `dir`; the `[tls]` section using them
/// (with `ca` as the client CA if `mutual`).
fn tls_section(dir: &Path, ca: &Ca, mutual: bool) -> String {
    let server = ca.server("localhost");
    let (cert, key, client_ca) = (dir.join("server.pem"), dir.join("server.key"), dir.join("clients-ca.pem"));
    std::fs::write(&cert, &server.cert).unwrap();
    std::fs::write(&key, &server.key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&client_ca, ca.pem()).unwrap();
    let mut section =
        format!("[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", cert.display(), key.display());
    if mutual {
        section += &format!("client_ca_file = \"{}\"\n", client_ca.display());
    }
    section
}

fn credential(name: &str, role: &str, how: &str, value: &str) -> String {
    let value = match how {
        "token_sha256" => hex::encode(x402_batcher::auth::hash_token(value)),
        _ => value.to_owned(),
    };
    format!("[[credentials]]\nname = \"{name}\"\nrole = \"{role}\"\n{how} = \"{value}\"\n")
}

/// A client of `url` (https) trusting `ca`, with a client certificate and/or a token.
async fn connect(
    url: &str,
    ca: &Ca,
    identity: Option<&Leaf>,
    token: Option<&str>,
) -> Result<Client, ClientError> {
    let auth = ClientAuth {
        ca_pem: Some(ca.pem().into_bytes()),
        server_name: Some("localhost".into()),
        identity: identity.map(|l| (l.cert.clone().into_bytes(), l.key.clone().into_bytes())),
        token: token.map(str::to_owned),
    };
    Client::connect_with(url.replace("http://", "https://"), &auth).await
}

fn https(url: &str) -> String {
    url.replace("http://", "https://")
}

/// Submits `req` and expects a refusal with `code`; returns its message.
async fn refused(client: &mut Client, req: &v1::SubmitRequest, code: Code) -> String {
    match client.ingest.submit(req.clone()).await {
        Ok(reply) => panic!("expected {code:?}, got {:?}", reply.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            status.message().to_owned()
        }
    }
}

/// Submits `req` and expects a new acceptance (so no refused attempt before it was
/// processed); returns the payment's recorded api_server.
async fn accepted_new(client: &mut Client, req: &v1::SubmitRequest) -> String {
    let reply = client.ingest.submit(req.clone()).await.unwrap().into_inner();
    let Some(v1::submit_reply::Outcome::Accepted(a)) = reply.outcome else {
        panic!("not accepted: {reply:?}")
    };
    assert!(!a.duplicate, "the payment was recorded before: a refused call was processed");
    let key = v1::get_payment_request::Key::PaymentId(a.payment_id);
    let payment = client.payments.get_payment(v1::GetPaymentRequest { key: Some(key) }).await.unwrap();
    payment.into_inner().api_server
}

async fn admin_refused(client: &mut Client, code: Code) -> String {
    let status = client.admin.get_status(v1::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    status.message().to_owned()
}

/// The peer's address appears in the refusal's log line.
fn logged(daemon: &Daemon, needles: &[&str]) {
    let line = daemon.log_with(needles);
    assert!(line.contains("127.0.0.1:"), "refusal logged without its peer: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_named_certificates_only_and_each_role_on_its_own_listener() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (fleet, rogue) = (Ca::new("fleet CA"), Ca::new("rogue CA"));
        let extra = format!(
            "{}{}{}[metrics]\nlisten = \"127.0.0.1:0\"\n",
            tls_section(dir.path(), &fleet, true),
            credential("api-1", "api", "cert_name", "api-1.fleet.test"),
            credential("ops", "admin", "cert_name", "ops.fleet.test"),
        );
        let mut daemon = start(&write_config(dir.path(), &net, &extra));
        let metrics = daemon.line_after("metrics on ");
        let (api_url, admin_url) = (daemon.url.clone(), daemon.admin_url.clone());
        let reqs = common::funded_submissions(&net, "auth", 2, 2, Address::repeat_byte(0xa7)).await;
        let (api1, ops) = (fleet.client("api-1.fleet.test"), fleet.client("ops.fleet.test"));

        // No certificate (and no token): UNAUTHENTICATED, logged with the peer.
        let mut anonymous = connect(&api_url, &fleet, None, None).await.unwrap();
        let why = refused(&mut anonymous, &reqs[0], Code::Unauthenticated).await;
        assert!(why.contains("no credentials"), "{why}");
        logged(&daemon, &["refused", "no credentials"]);

        // The health service answers anyone (load balancers probe it).
        let channel = tonic::transport::Channel::from_shared(https(&api_url))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(fleet.pem()))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        let health = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .unwrap();
        assert_eq!(
            health.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        // A certificate with the right name from the wrong CA: the handshake fails (the
        // client may learn it at connect or at its first call), logged with the peer.
        let forged = rogue.client("api-1.fleet.test");
        match connect(&api_url, &fleet, Some(&forged), None).await {
            Err(e) => println!("wrong-CA certificate refused at connect: {e:?}"),
            Ok(mut c) => {
                let status = c.ingest.submit(reqs[0].clone()).await.unwrap_err();
                assert!(
                    matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                    ),
                    "{status:?}"
                );
            }
        }
        logged(&daemon, &["refused", "TLS handshake failed"]);

        // A certificate from the right CA whose name no credential carries.
        let mut stranger =
            connect(&api_url, &fleet, Some(&fleet.client("stranger.fleet.test")), None).await.unwrap();
        let why = refused(&mut stranger, &reqs[0], Code::Unauthenticated).await;
        assert!(why.contains("no configured credential"), "{why}");

        // An operator's certificate on the API listener; an API server's on the Admin one.
        let mut ops_on_api = connect(&api_url, &fleet, Some(&ops), None).await.unwrap();
        let why = refused(&mut ops_on_api, &reqs[0], Code::PermissionDenied).await;
        assert!(why.contains("`ops` is an admin credential"), "{why}");
        let mut api_on_admin = connect(&admin_url, &fleet, Some(&api1), None).await.unwrap();
        let why = admin_refused(&mut api_on_admin, Code::PermissionDenied).await;
        assert!(why.contains("`api-1` is an api credential"), "{why}");
        logged(&daemon, &["refused", "`api-1` is an api credential"]);

        // The API server, claiming another server's name: refused.
        let mut api = connect(&api_url, &fleet, Some(&api1), None).await.unwrap();
        let mut claims_other = reqs[0].clone();
        claims_other.api_server = "api-2".into();
        let why = refused(&mut api, &claims_other, Code::PermissionDenied).await;
        assert!(why.contains("not the authenticated caller"), "{why}");
        // The Admin service is not on the API listener at all.
        admin_refused(&mut api, Code::Unimplemented).await;

        // Only now is the payment processed, and named after its authenticated sender.
        assert_eq!(accepted_new(&mut api, &reqs[0]).await, "api-1");
        let mut operator = connect(&admin_url, &fleet, Some(&ops), None).await.unwrap();
        let status = operator.admin.get_status(v1::GetStatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.pending_payments, 1);

        let s = series(&scrape(&metrics).await);
        let refusals =
            |code: &str| sum(&s, "x402_batcher_auth_refused_total", &[&format!("code=\"{code}\"")]);
        assert!(refusals("unauthenticated") >= Some(2.0), "{:?}", refusals("unauthenticated"));
        assert!(refusals("permission_denied") >= Some(3.0), "{:?}", refusals("permission_denied"));
        assert!(refusals("tls_handshake") >= Some(1.0), "{:?}", refusals("tls_handshake"));

        daemon.signal("TERM");
        assert!(daemon.child.wait().unwrap().success());
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_wrong_or_revoked_are_refused_and_admin_needs_an_admin_token() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("server CA");
        let tls = tls_section(dir.path(), &ca, false);
        let (t1, t2, ops) = ("x4b_token-of-api-1", "x4b_token-of-api-2", "x4b_token-of-ops");
        let with =
            |servers: &str| format!("{tls}{servers}{}", credential("ops", "admin", "token_sha256", ops));
        let both = format!(
            "{}{}",
            credential("api-1", "api", "token_sha256", t1),
            credential("api-2", "api", "token_sha256", t2)
        );
        let config = write_config(dir.path(), &net, &with(&both));
        let mut daemon = start(&config);
        let (api_url, admin_url) = (daemon.url.clone(), daemon.admin_url.clone());
        let reqs = common::funded_submissions(&net, "auth", 2, 2, Address::repeat_byte(0xa7)).await;

        // Plaintext against the TLS listener: no call gets through; logged.
        if let Ok(mut plain) = Client::connect(api_url.clone()).await {
            assert!(plain.ingest.submit(reqs[0].clone()).await.is_err());
        }
        logged(&daemon, &["refused", "TLS handshake failed"]);

        // No token, a wrong one, a malformed header.
        let mut none = connect(&api_url, &ca, None, None).await.unwrap();
        assert!(refused(&mut none, &reqs[0], Code::Unauthenticated).await.contains("no credentials"));
        let mut wrong = connect(&api_url, &ca, None, Some("x4b_guess")).await.unwrap();
        assert!(refused(&mut wrong, &reqs[0], Code::Unauthenticated).await.contains("unknown or revoked"));
        logged(&daemon, &["refused", "unknown or revoked"]);

        // api-2 works, until its entry is removed and the daemon reloads: then the same
        // connection is refused, while api-1 goes on.
        let mut api2 = connect(&api_url, &ca, None, Some(t2)).await.unwrap();
        assert_eq!(accepted_new(&mut api2, &reqs[1]).await, "api-2");
        write_config(dir.path(), &net, &with(&credential("api-1", "api", "token_sha256", t1)));
        daemon.signal("HUP");
        // Until the reload applies, api-2's retry of its own payment is a harmless duplicate.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while api2.ingest.submit(reqs[1].clone()).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "the reload did not revoke api-2's token");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let why = refused(&mut api2, &reqs[0], Code::Unauthenticated).await;
        assert!(why.contains("revoked"), "{why}");
        logged(&daemon, &["refused", "unknown or revoked"]);

        // Admin with an API server's token: PERMISSION_DENIED; with the operator's: served.
        let mut api1_on_admin = connect(&admin_url, &ca, None, Some(t1)).await.unwrap();
        let why = admin_refused(&mut api1_on_admin, Code::PermissionDenied).await;
        assert!(why.contains("`api-1` is an api credential"), "{why}");
        logged(&daemon, &["refused", "`api-1` is an api credential"]);
        let mut operator = connect(&admin_url, &ca, None, Some(ops)).await.unwrap();
        let status = operator.admin.get_status(v1::GetStatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.pending_payments, 1, "only api-2's payment was processed");
        let mut ops_on_api = connect(&api_url, &ca, None, Some(ops)).await.unwrap();
        refused(&mut ops_on_api, &reqs[0], Code::PermissionDenied).await;

        // The refused payment is new to the ledger when api-1 sends it.
        let mut api1 = connect(&api_url, &ca, None, Some(t1)).await.unwrap();
        assert_eq!(accepted_new(&mut api1, &reqs[0]).await, "api-1");

        daemon.signal("TERM");
        assert!(daemon.child.wait().unwrap().success());
    })
    .await
    .expect("test finished in time");
}
