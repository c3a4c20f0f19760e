//! Limits: per-API-server rate and in-flight caps under overload (one server sending flat
//! out is shed with RESOURCE_EXHAUSTED while another, within its rate, is served in full,
//! and everything acknowledged goes on to settle); client deadlines (a call past its
//! deadline is dropped and records nothing); the message size cap; the per-connection
//! stream cap.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use common::daemon::TestDaemon;
use common::proxy::{FaultProxy, Mode};
use common::settle::{Miner, ledger_after, settling_daemon, wait_nothing_pending};
use x402_batcher::api::v1;
use x402_batcher::client::Client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::tools::loadgen::{self, LoadOptions};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_server_is_shed_while_a_quiet_one_is_served_and_acked_payments_settle() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let d = settling_daemon(&net, "limits", 1, |c| {
            c.limits.per_server_rate = 20.0;
            c.limits.per_server_burst = 20;
            c.limits.per_server_in_flight = 8;
        })
        .await;
        let dir = Arc::clone(&d.dir);
        let payers = devnet::payer_keys("limits", 40);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        net.fund(&addrs, U256::from(100_000_000u64)).await.unwrap();
        let _miner = Miner::start(Arc::clone(&net), Duration::from_millis(200), None);
        let now = SystemClock.now_unix();
        let load = |server: &str, payers: &[alloy::signers::local::PrivateKeySigner], n, run_id| {
            let opts = LoadOptions {
                payments: n,
                payers: payers.to_vec(),
                rate: None,
                streams: 1,
                value: 1_000,
                payees: vec![Address::repeat_byte(0x1e)],
                run_id,
            };
            let mut reqs = loadgen::presign(&net.token_domain(), &opts, now);
            for r in &mut reqs {
                r.api_server = server.to_owned();
            }
            reqs
        };
        let noisy = load("noisy", &payers[..20], 400, 1);
        let quiet = load("quiet", &payers[20..], 30, 2);
        let client = Client::connect(d.url()).await.unwrap();
        let (noisy_report, quiet_report) =
            tokio::join!(loadgen::run(&client, noisy, None, 1), loadgen::run(&client, quiet, Some(10.0), 1),);
        let exhausted = tonic::Code::ResourceExhausted as i32;
        let shed = noisy_report.errors.get(&exhausted).copied().unwrap_or(0);
        println!("limits: noisy {}; quiet {}", noisy_report.summary(), quiet_report.summary());
        assert!(shed > 200, "the flat-out server was shed: {}", noisy_report.summary());
        assert_eq!(noisy_report.acked.len() + shed, 400, "{:?}", noisy_report.errors);
        assert_eq!(
            quiet_report.acked.len(),
            30,
            "the quiet server was served in full: {}",
            quiet_report.summary()
        );

        // Everything acknowledged settles.
        wait_nothing_pending(&d.admin_url(), Duration::from_secs(60)).await;
        d.stop().await;
        let (log, _) = ledger_after(dir.path(), net.chain_id());
        assert_eq!(log.len(), noisy_report.acked.len() + 30);
        assert!(log.iter().all(|r| r.status == x402_batcher::ledger::Status::Settled));
    })
    .await
    .expect("within the time limit");
}

fn with_deadline(req: &v1::SubmitRequest, deadline: Duration) -> tonic::Request<v1::SubmitRequest> {
    let mut request = tonic::Request::new(req.clone());
    request.set_timeout(deadline);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_client_deadline_is_dropped_by_the_daemon_and_records_nothing() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let proxy = FaultProxy::start(net.rpc_url()).await;
        let url = proxy.url.clone();
        // One submission in flight per server: a handler still running after its caller's
        // deadline would hold the slot, and the next submission would be shed.
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let d = TestDaemon::start_on(Arc::clone(&net), dir, move |c| {
            c.chains[0].rpc_url = url;
            c.limits.per_server_in_flight = 1;
        })
        .await;
        let mut reqs =
            common::funded_submissions(&d.devnet, "deadline", 2, 2, Address::repeat_byte(0x1e)).await;
        for r in &mut reqs {
            r.api_server = "api-1".into();
        }
        let mut client = Client::connect(d.url()).await.unwrap();

        // The node stops answering: the payer's balance read would wait for the RPC
        // timeout (10 s); the caller gives it 300 ms.
        proxy.set(Mode::Blackhole);
        let status =
            client.ingest.submit(with_deadline(&reqs[0], Duration::from_millis(300))).await.unwrap_err();
        assert!(
            matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
            "{status:?}"
        );

        // The daemon dropped that call at its deadline, long before the RPC timeout: its
        // in-flight slot is free, so the next call gets past the limit (to wait in turn).
        let started = tokio::time::Instant::now();
        loop {
            let status =
                client.ingest.submit(with_deadline(&reqs[1], Duration::from_millis(300))).await.unwrap_err();
            if status.code() != tonic::Code::ResourceExhausted {
                assert!(matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled));
                break;
            }
            assert!(
                started.elapsed() < x402_batcher::chain::RPC_TIMEOUT / 2,
                "the first call still holds its slot: the daemon kept working past the client's deadline"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Nothing was recorded: once the node answers, the payment is new to the ledger.
        proxy.set(Mode::Up);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let accepted = loop {
            match client.ingest.submit(with_deadline(&reqs[0], Duration::from_secs(15))).await {
                Ok(reply) => break reply.into_inner(),
                Err(s) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "not served after the node returned: {s:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let Some(v1::submit_reply::Outcome::Accepted(a)) = accepted.outcome else { panic!("{accepted:?}") };
        assert!(!a.duplicate, "the call dropped at its deadline had recorded the payment");
    })
    .await
    .expect("within the time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_streams_beyond_the_connection_cap_wait() {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start(|c| {
            c.server.max_message_bytes = 4096;
            c.server.max_concurrent_streams = 2;
        })
        .await;
        let reqs = common::funded_submissions(&d.devnet, "caps", 3, 3, Address::repeat_byte(0x1e)).await;
        let mut client = Client::connect(d.url()).await.unwrap();

        // Twice the size cap: refused before it is decoded, nothing recorded, the
        // connection and the daemon serve on.
        let mut huge = reqs[0].clone();
        huge.resource = "x".repeat(8192);
        let status = client.ingest.submit(huge).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("too large"), "{status:?}");
        let reply = client.ingest.submit(reqs[0].clone()).await.unwrap().into_inner();
        assert!(
            matches!(reply.outcome, Some(v1::submit_reply::Outcome::Accepted(ref a)) if !a.duplicate),
            "{reply:?}"
        );

        // Two streams held open fill this connection's cap: a third call waits (here until
        // its deadline) rather than being served beside them.
        let (tx1, rx1) = tokio::sync::mpsc::channel::<v1::SubmitRequest>(1);
        let (tx2, rx2) = tokio::sync::mpsc::channel::<v1::SubmitRequest>(1);
        let open1 =
            client.ingest.submit_stream(tokio_stream::wrappers::ReceiverStream::new(rx1)).await.unwrap();
        let open2 =
            client.ingest.submit_stream(tokio_stream::wrappers::ReceiverStream::new(rx2)).await.unwrap();
        let status =
            client.ingest.submit(with_deadline(&reqs[1], Duration::from_millis(500))).await.unwrap_err();
        assert!(
            matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
            "{status:?}"
        );
        // Another connection has its own streams.
        let mut other = Client::connect(d.url()).await.unwrap();
        let reply = other.ingest.submit(reqs[1].clone()).await.unwrap().into_inner();
        assert!(matches!(reply.outcome, Some(v1::submit_reply::Outcome::Accepted(_))), "{reply:?}");
        // One stream closes: the first connection's next call is served.
        drop((tx1, open1));
        let reply = client
            .ingest
            .submit(with_deadline(&reqs[2], Duration::from_secs(10)))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(reply.outcome, Some(v1::submit_reply::Outcome::Accepted(_))), "{reply:?}");
        drop((tx2, open2));
    })
    .await
    .expect("within the time limit");
}

/// The daemon raises its soft open-file limit to the hard one before it opens anything,
/// and says so: started with a soft limit of 256 (a shell's `ulimit -Sn`), it logs the
/// hard limit it now runs with (here it then stops at a missing config).
#[test]
fn the_daemon_raises_its_soft_open_file_limit_to_the_hard_one() {
    let hard = std::process::Command::new("sh").args(["-c", "ulimit -Hn"]).output().unwrap();
    let hard = String::from_utf8(hard.stdout).unwrap().trim().to_owned();
    let out = std::process::Command::new("sh")
        .args(["-c", r#"ulimit -Sn 256 && exec "$0" run --config /nonexistent/x402-batcher.toml"#])
        .arg(env!("CARGO_BIN_EXE_x402-batcher"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("open-file limit"))
        .unwrap_or_else(|| panic!("no limit logged: {log}"));
    let expected =
        if hard == "unlimited" { "open_files=None".to_owned() } else { format!("open_files=Some({hard})") };
    assert!(line.contains(&expected) && line.contains("was=Some(256)"), "{line} (hard limit {hard})");
    assert!(!out.status.success(), "and then the missing config stops it");
}
