//! Ingest while the RPC node browns out: a node that accepts connections and never answers
//! (a proxy in front of anvil that goes silent). Submissions that need a fresh payer balance
//! are refused with UNAVAILABLE naming the chain, promptly (never held until the client
//! gives up), and ingest recovers as soon as the node answers again.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::TestDaemon;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use x402_batcher::api::v1;
use x402_batcher::client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::devnet::Devnet;
use x402_batcher::tools::testkit::{self, PaymentBuilder};

const LIMIT: Duration = Duration::from_secs(120);

/// A TCP proxy to `upstream` that can go silent: new connections are accepted and never
/// answered, open ones stop carrying bytes (nothing is closed, as with a hung node).
struct Proxy {
    url: String,
    silent: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (silent, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(carry(client, upstream, rx.clone()));
            }
        });
        Proxy { url, silent, task }
    }

    fn set_silent(&self, on: bool) {
        self.silent.send_replace(on);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn carry(mut client: TcpStream, upstream: SocketAddr, mut silent: watch::Receiver<bool>) {
    if *silent.borrow() {
        // Accepted, never answered; let go once the node is back (the client retries).
        let _ = silent.wait_for(|s| !*s).await.map(|_| ());
        return;
    }
    let Ok(mut node) = TcpStream::connect(upstream).await else { return };
    let mut quiet = silent.clone();
    let went_silent = async move { quiet.wait_for(|s| *s).await.map(|_| ()) };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut node) => {}
        _ = went_silent => {
            // Open connections go silent too, until the node is back.
            let _ = silent.wait_for(|s| !*s).await.map(|_| ());
        }
    }
}

async fn submit(
    d: &TestDaemon,
    s: &x402_batcher::x402::SignedAuthorization,
) -> Result<String, tonic::Status> {
    let mut c = d.ingest().await;
    let req = client::typed_request("t".into(), s, &testkit::requirements_for(s));
    let reply = c.submit(req).await?.into_inner();
    match reply.outcome {
        Some(v1::submit_reply::Outcome::Accepted(a)) => Ok(a.payment_id),
        other => panic!("payment refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_gets_prompt_unavailable_refusals_and_ingest_recovers_at_once() {
    tokio::time::timeout(LIMIT, async {
        let net = Arc::new(Devnet::start().await.unwrap());
        let upstream: SocketAddr = net.rpc_url().trim_start_matches("http://").parse().unwrap();
        let proxy = Proxy::start(upstream).await;
        let proxy_url = proxy.url.clone();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        // Every submission needs a fresh balance; nothing but ingest talks to the node.
        let d = TestDaemon::start_on(Arc::clone(&net), dir, move |c| {
            c.chains[0].rpc_url = proxy_url;
            c.balances.max_age_ms = 0;
            c.audit.nonce_interval_ms = 0;
        })
        .await;
        let payers = d.payers("brownout", 40, 1_000_000).await;
        let pay = |i: usize| PaymentBuilder::new(&payers[i], &d.domain(), SystemClock.now_unix()).build();
        submit(&d, &pay(0)).await.expect("accepted while the node answers");

        proxy.set_silent(true);
        // A burst at once: every one refused, naming the chain, well before a client's 5 s.
        let started = Instant::now();
        let burst = futures::future::join_all((1..21).map(|i| {
            let s = pay(i);
            let d = &d;
            async move {
                let t = Instant::now();
                (submit(d, &s).await, t.elapsed())
            }
        }))
        .await;
        for (result, took) in &burst {
            let e = result.as_ref().expect_err("no acceptance without a balance");
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(e.message().contains(&format!("chain {}", net.chain_id())), "{}", e.message());
            assert!(*took < Duration::from_secs(2), "refused after {took:?}");
        }
        eprintln!("20 concurrent submissions refused within {:?}", started.elapsed());
        // Then each at once: the breaker is open.
        for i in 21..26 {
            let t = Instant::now();
            let e = submit(&d, &pay(i)).await.expect_err("still silent");
            assert_eq!(e.code(), tonic::Code::Unavailable);
            assert!(e.message().contains("the RPC node is failing"), "{}", e.message());
            assert!(t.elapsed() < Duration::from_millis(500), "refused after {:?}", t.elapsed());
        }

        // The node answers again: the next probe closes the breaker.
        proxy.set_silent(false);
        let back = Instant::now();
        let mut i = 26;
        loop {
            match submit(&d, &pay(i)).await {
                Ok(_) => break,
                Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}"),
            }
            assert!(back.elapsed() < Duration::from_secs(2), "ingest did not recover within 2 s");
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("accepting again {:?} after the node came back", back.elapsed());
        d.stop().await;
    })
    .await
    .expect("within the time limit");
}
