//! Faults from outside at the connection level (issue #28): a slowloris of twice the
//! facilitator's connection cap while a real client's payments go on being accepted; idle
//! and silent connections (and gRPC ones stalled after the preface) dropped after their
//! timeouts on the HTTP and gRPC listeners while a gRPC channel that answers keep-alives
//! stays; the daemon binary under a low open-file
//! limit, flooded on every listener, committing every payment it acknowledges.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use alloy::primitives::{Address, U256};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use x402_batcher::api::v1;
use x402_batcher::client::Client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::config::{Config, SettleMode};
use x402_batcher::daemon::{DaemonError, Listeners};
use x402_batcher::ledger::{LedgerStore as _, RocksLedger};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions};

const LIMIT: Duration = Duration::from_secs(120);

/// A daemon in this process with the facilitator on, answering `/settle` once a payment is
/// durable (`accepted`), no settlement.
struct Running {
    net: Devnet,
    api: SocketAddr,
    facilitator: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), DaemonError>>,
    dir: tempfile::TempDir,
}

async fn running(tune: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let net = Devnet::start().await.unwrap();
    let mut config = Config::parse("").unwrap();
    config.tokens.push(net.token_config());
    config.chains.push(net.chain_config());
    config.ledger.path = Some(dir.path().join("ledger"));
    config.facilitator.listen = Some("127.0.0.1:0".parse().unwrap());
    config.facilitator.settle_mode = SettleMode::Accepted;
    tune(&mut config);
    let listeners = Listeners::loopback_with_facilitator().await.unwrap();
    let api = listeners.api.local_addr().unwrap();
    let facilitator = listeners.facilitator.as_ref().unwrap().local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving =
        tokio::spawn(x402_batcher::daemon::serve(config, listeners, Arc::new(SystemClock), async {
            let _ = stopped.await;
        }));
    Running { net, api, facilitator, stop, serving, dir }
}

impl Running {
    /// `n` facilitator bodies, each a fresh payment of a funded payer.
    async fn bodies(&self, seed: &str, n: usize) -> Vec<String> {
        let payers = devnet::payer_keys(seed, 4);
        let addrs: Vec<Address> = payers.iter().map(|p| p.address()).collect();
        self.net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let opts = LoadOptions {
            payments: n,
            payers,
            rate: None,
            streams: 1,
            value: 1_000,
            payees: vec![Address::repeat_byte(0x2e)],
            run_id: 1,
        };
        loadgen::presign_facilitator(&self.net.token_domain(), &opts, SystemClock.now_unix())
    }

    /// Stops the daemon; the payers' records in its ledger.
    async fn stop(self) -> usize {
        let _ = self.stop.send(());
        self.serving.await.unwrap().unwrap();
        RocksLedger::open_read_only(&self.dir.path().join("ledger")).unwrap().records().unwrap().len()
    }
}

/// One HTTP/1.1 connection to the facilitator, held open: the client of an API server
/// whose keep-alive connection is already open when a flood starts. (A pooling client such
/// as reqwest may open a new connection for a request while its idle one is being handed
/// back, and a new connection is what a full listener refuses.)
struct Held(hyper::client::conn::http1::SendRequest<http_body_util::Full<axum::body::Bytes>>);

impl Held {
    /// Connects, and waits until `/health` answers on the connection.
    async fn open(addr: SocketAddr) -> Held {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(tcp);
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut held = Held(send);
        let deadline = Instant::now() + Duration::from_secs(30);
        while held.call("GET", "/health", String::new()).await.0 != 200 {
            assert!(Instant::now() < deadline, "the facilitator did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        held
    }

    /// A request on the held connection: the status and the JSON reply.
    async fn call(&mut self, method: &str, path: &str, body: String) -> (u16, Value) {
        use http_body_util::BodyExt as _;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "facilitator")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
            .unwrap();
        self.0.ready().await.expect("the held connection is open");
        let reply = self.0.send_request(request).await.expect("answered on the held connection");
        let status = reply.status().as_u16();
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

/// Reads until the server closes the connection (or `limit` passes: `None`).
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Option<Instant> {
    let mut sink = Vec::new();
    match tokio::time::timeout(limit, conn.read_to_end(&mut sink)).await {
        Ok(_) => Some(Instant::now()),
        Err(_) => None,
    }
}

/// Connections closed by the server, by how soon after connecting.
#[derive(Default)]
struct Flood {
    /// Closed before the header timeout: refused at the cap.
    refused: AtomicUsize,
    /// Closed at or after the header timeout.
    timed_out: AtomicUsize,
    stop: AtomicBool,
}

/// One slowloris attacker: connects, sends half a request head and a header line every
/// 200 ms until the server closes, then connects again, until told to stop.
async fn slowloris(addr: SocketAddr, flood: Arc<Flood>, head_timeout: Duration) {
    while !flood.stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let opened = Instant::now();
        let mut ok = conn.write_all(b"POST /settle HTTP/1.1\r\nHost: x\r\n").await.is_ok();
        while ok && !flood.stop.load(Ordering::Relaxed) {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(200), conn.read(&mut byte)).await {
                Err(_) => ok = conn.write_all(b"X-Slow: 1\r\n").await.is_ok(),
                Ok(_) => ok = false,
            }
        }
        if !ok {
            let counter = if opened.elapsed() < head_timeout { &flood.refused } else { &flood.timed_out };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_of_twice_the_cap_does_not_keep_a_connected_client_from_paying() {
    const CAP: usize = 32;
    const HEAD: Duration = Duration::from_millis(1_500);
    tokio::time::timeout(LIMIT, async {
        let d = running(|c| {
            c.connections.max_facilitator = CAP;
            c.connections.header_read_timeout_ms = HEAD.as_millis() as u64;
        })
        .await;
        let bodies = d.bodies("slowloris", 20).await;
        let mut held = Held::open(d.facilitator).await;

        let flood = Arc::new(Flood::default());
        let attackers: Vec<_> =
            (0..2 * CAP).map(|_| tokio::spawn(slowloris(d.facilitator, Arc::clone(&flood), HEAD))).collect();
        // The flood holds the listener: attackers are being refused at the cap.
        let deadline = Instant::now() + Duration::from_secs(20);
        while flood.refused.load(Ordering::Relaxed) < CAP {
            assert!(Instant::now() < deadline, "no attacker was refused at the cap");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The client connected before the flood pays on: each payment accepted (durable)
        // within 1 s, over its open connection.
        let mut slowest = Duration::ZERO;
        for body in &bodies {
            let started = Instant::now();
            let (status, v) = held.call("POST", "/settle", body.clone()).await;
            slowest = slowest.max(started.elapsed());
            assert_eq!((status, &v["success"]), (200, &Value::Bool(true)), "{v}");
        }
        assert!(slowest < Duration::from_secs(1), "a payment took {slowest:?} during the flood");
        // Attackers inside the cap were cut at the header timeout and came back.
        let deadline = Instant::now() + 4 * HEAD;
        while flood.timed_out.load(Ordering::Relaxed) < CAP / 2 {
            assert!(Instant::now() < deadline, "no slow head was cut at the header timeout");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flood.stop.store(true, Ordering::Relaxed);
        for a in attackers {
            a.await.unwrap();
        }
        println!(
            "slowloris: {} refused at the cap, {} cut at the header timeout, slowest payment {slowest:?}",
            flood.refused.load(Ordering::Relaxed),
            flood.timed_out.load(Ordering::Relaxed)
        );
        assert_eq!(d.stop().await, bodies.len(), "every accepted payment is in the ledger");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_are_dropped_after_their_timeouts_and_a_live_channel_stays() {
    const HEAD: Duration = Duration::from_millis(1_000);
    const IDLE: Duration = Duration::from_millis(2_000);
    const N: usize = 100;
    tokio::time::timeout(LIMIT, async {
        let d = running(|c| {
            c.connections.header_read_timeout_ms = HEAD.as_millis() as u64;
            c.connections.idle_timeout_ms = IDLE.as_millis() as u64;
            c.connections.http2_keepalive_interval_ms = 500;
            c.connections.http2_keepalive_timeout_ms = 1_000;
        })
        .await;
        Held::open(d.facilitator).await;
        // A gRPC channel that answers keep-alive pings, used before and after the timeouts.
        let mut client = Client::connect(format!("http://{}", d.api)).await.unwrap();
        let unknown = || v1::GetPaymentRequest {
            key: Some(v1::get_payment_request::Key::PaymentId(format!("0x{}", "00".repeat(16)))),
        };
        let status = client.payments.get_payment(unknown()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

        // HTTP: a request answered, then nothing.
        let mut idle = Vec::new();
        for _ in 0..N {
            let mut conn = TcpStream::connect(d.facilitator).await.unwrap();
            conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let mut reply = Vec::new();
            let mut buf = [0u8; 512];
            while !String::from_utf8_lossy(&reply).contains("serving") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before its reply");
                reply.extend_from_slice(&buf[..n]);
            }
            idle.push((conn, Instant::now()));
        }
        // gRPC: connected, nothing sent (not even the HTTP/2 preface).
        let mut silent = Vec::new();
        for _ in 0..N {
            silent.push((TcpStream::connect(d.api).await.unwrap(), Instant::now()));
        }
        // gRPC: the preface, then nothing (no settings, no answer to pings): closed by the
        // unanswered keep-alive ping (500 ms + 1 s here) or the idle timeout, the sooner.
        let mut stalled = Vec::new();
        for _ in 0..N / 4 {
            let mut conn = TcpStream::connect(d.api).await.unwrap();
            conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
            stalled.push((conn, Instant::now()));
        }
        let closes = |conns: Vec<(TcpStream, Instant)>, at_least: Duration| async move {
            let mut after = Vec::new();
            for (mut conn, since) in conns {
                let closed = closed_within(&mut conn, Duration::from_secs(15)).await.expect("closed");
                after.push(closed - since);
            }
            // (`since` is read after the connect returns, a moment after the server's accept.)
            let early = at_least - Duration::from_millis(50);
            assert!(after.iter().all(|&a| a >= early), "closed early: {:?}", after.iter().min());
            after.into_iter().max().unwrap()
        };
        let (idle_last, silent_last, stalled_last) = tokio::join!(
            closes(idle, IDLE),
            closes(silent, HEAD),
            closes(stalled, Duration::from_millis(1_000))
        );
        println!(
            "connections: idle HTTP closed by {idle_last:?} after their reply, silent gRPC by \
             {silent_last:?}, gRPC stalled after the preface by {stalled_last:?}"
        );

        // The live channel outlived both timeouts and still serves.
        let status = client.payments.get_payment(unknown()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "the channel still serves: {status:?}");
        assert_eq!(d.stop().await, 0);
    })
    .await
    .expect("bounded");
}

/// The daemon binary with an open-file limit of 512, flooded on every listener with more
/// connections than the limit: its caps were lowered to fit under the limit less the
/// reserve, the flood is refused at the caps, and the payments sent meanwhile by clients
/// connected before it are acknowledged (the ledger and the RPC pool still get their
/// descriptors), and every one is in the ledger after a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_open_file_limit_leaves_the_ledger_and_rpc_their_descriptors() {
    const FILES: u64 = 512;
    const PAYMENTS: usize = 300;
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let extra = "[facilitator]\nlisten = \"127.0.0.1:0\"\nsettle_mode = \"accepted\"\n\
                     [connections]\nreserved_files = 200\nheader_read_timeout_ms = 60000\n";
        let config = common::binary::write_config(dir.path(), &net, extra);
        let mut daemon = common::binary::start_with_open_files(&config, FILES);
        let facilitator: SocketAddr = daemon.line_after("facilitator on ").parse().unwrap();
        let lowered = daemon.log_with(&["connection caps lowered"]);
        assert!(lowered.contains("open_files=Some(512)"), "{lowered}");

        // Clients connected before the flood.
        let client = Client::connect(daemon.url.clone()).await.unwrap();
        let mut held = Held::open(facilitator).await;
        let payers = devnet::payer_keys("fd-flood", 8);
        let addrs: Vec<Address> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let opts = |payers: &[alloy::signers::local::PrivateKeySigner], run_id| LoadOptions {
            payments: PAYMENTS,
            payers: payers.to_vec(),
            rate: None,
            streams: 2,
            value: 1_000,
            payees: vec![Address::repeat_byte(0x2f)],
            run_id,
        };
        let now = SystemClock.now_unix();
        let grpc = loadgen::presign(&net.token_domain(), &opts(&payers[..4], 1), now);
        let bodies = loadgen::presign_facilitator(&net.token_domain(), &opts(&payers[4..], 2), now);

        // The flood: silent connections, more than the whole limit, on every listener.
        let mut flood = Vec::new();
        let targets = [
            daemon.url.trim_start_matches("http://").parse::<SocketAddr>().unwrap(),
            daemon.admin_url.trim_start_matches("http://").parse().unwrap(),
            facilitator,
        ];
        for target in targets {
            for _ in 0..FILES / 2 {
                if let Ok(conn) = TcpStream::connect(target).await {
                    flood.push(conn);
                }
            }
        }
        assert!(flood.len() as u64 > FILES, "the flood opened {} connections", flood.len());

        let report = loadgen::run(&client, grpc, None, 2).await;
        assert_eq!(report.acked.len(), PAYMENTS, "every gRPC payment acked: {}", report.summary());
        let mut accepted = 0;
        for body in bodies.iter().take(50) {
            let (status, v) = held.call("POST", "/settle", body.clone()).await;
            assert_eq!((status, &v["success"]), (200, &Value::Bool(true)), "{v}");
            accepted += 1;
        }
        drop(flood);

        daemon.signal("TERM");
        assert!(daemon.child.wait().unwrap().success(), "a clean stop");
        let logs = daemon.logs_so_far();
        let bad: Vec<_> =
            logs.iter().filter(|l| l.contains("Too many open files") || l.contains("ERROR")).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(logs.iter().any(|l| l.contains("connection refused")), "the flood was refused at the caps");
        let ledger = RocksLedger::open_read_only(&dir.path().join("ledger")).unwrap();
        assert_eq!(ledger.records().unwrap().len(), PAYMENTS + accepted, "every acknowledged payment");
    })
    .await
    .expect("bounded");
}

/// A laptop's shell limit (1,024 descriptors, soft and hard) under the default reserve of
/// 1,024: the daemon keeps half back instead, says so, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_limit_below_the_default_reserve_still_serves() {
    tokio::time::timeout(LIMIT, async {
        let net = Devnet::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = common::binary::write_config(dir.path(), &net, "");
        let mut daemon = common::binary::start_with_open_files(&config, 1_024);
        let line = daemon.log_with(&["half of it is kept back"]);
        assert!(line.contains("kept_back=512"), "{line}");
        let mut client = Client::connect(daemon.url.clone()).await.unwrap();
        let request = v1::GetPaymentRequest {
            key: Some(v1::get_payment_request::Key::PaymentId(format!("0x{}", "00".repeat(16)))),
        };
        let status = client.payments.get_payment(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "served: {status:?}");
        daemon.signal("TERM");
        assert!(daemon.child.wait().unwrap().success());
    })
    .await
    .expect("bounded");
}
