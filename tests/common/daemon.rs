//! A daemon in-process on 127.0.0.1:0, over a real devnet and a ledger in a temp dir
//! (RocksDB) or on a throw-away PostgreSQL.

use std::sync::Arc;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use x402_batcher::api::v1;
use x402_batcher::clock::SystemClock;
use x402_batcher::config::Config;
use x402_batcher::tools::devnet::{self, Devnet};
use x402_batcher::x402::eip712::TokenDomain;

use super::store::{Backend, TestLedger};

pub struct TestDaemon {
    pub devnet: Arc<Devnet>,
    pub addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    /// The facilitator HTTP API, when the config asked for it (`facilitator.listen` set).
    pub facilitator_addr: Option<std::net::SocketAddr>,
    /// The test's files (the RocksDB ledger among them); shared with a restarted daemon.
    pub dir: Arc<tempfile::TempDir>,
    /// The ledger; shared with a restarted daemon.
    pub ledger: Arc<TestLedger>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), x402_batcher::daemon::DaemonError>>>,
}

impl TestDaemon {
    /// Starts a devnet and a daemon on it; `tune` adjusts the config first.
    pub async fn start(tune: impl FnOnce(&mut Config)) -> TestDaemon {
        let devnet = Arc::new(Devnet::start().await.unwrap());
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start_on(devnet, dir, tune).await
    }

    /// Starts a devnet and a daemon on it over a new ledger on `backend`.
    pub async fn start_with(backend: Backend, tune: impl FnOnce(&mut Config)) -> TestDaemon {
        let devnet = Arc::new(Devnet::start().await.unwrap());
        Self::start_on_ledger(devnet, TestLedger::new(backend), tune).await
    }

    /// A daemon on an existing devnet and RocksDB ledger directory (a restart).
    pub async fn start_on(
        devnet: Arc<Devnet>,
        dir: Arc<tempfile::TempDir>,
        tune: impl FnOnce(&mut Config),
    ) -> TestDaemon {
        Self::start_on_ledger(devnet, TestLedger::in_dir(Backend::Rocksdb, dir), tune).await
    }

    /// A daemon on an existing devnet and ledger (a restart).
    pub async fn start_on_ledger(
        devnet: Arc<Devnet>,
        ledger: Arc<TestLedger>,
        tune: impl FnOnce(&mut Config),
    ) -> TestDaemon {
        let dir = Arc::clone(&ledger.dir);
        let mut config = Config::parse("").unwrap();
        config.tokens.push(devnet.token_config());
        config.chains.push(devnet.chain_config());
        ledger.configure(&mut config);
        tune(&mut config);
        let listeners = if config.facilitator.listen.is_some() {
            x402_batcher::daemon::Listeners::loopback_with_facilitator().await.unwrap()
        } else {
            x402_batcher::daemon::Listeners::loopback().await.unwrap()
        };
        let (addr, admin_addr) = (listeners.api.local_addr().unwrap(), listeners.admin.local_addr().unwrap());
        let facilitator_addr = listeners.facilitator.as_ref().map(|l| l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task =
            tokio::spawn(x402_batcher::daemon::serve(config, listeners, Arc::new(SystemClock), async {
                let _ = stopped.await;
            }));
        let daemon = TestDaemon {
            devnet,
            addr,
            admin_addr,
            facilitator_addr,
            dir,
            ledger,
            stop: Some(stop),
            task: Some(task),
        };
        // The listener is bound before the daemon starts, so this connects at once and the
        // request is answered as soon as the daemon serves: no polling needed. A daemon that
        // fails to start drops the listener, and the request fails. Health answers without
        // credentials.
        let ready = async {
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            let channel = tonic::transport::Channel::from_shared(daemon.admin_url())?.connect().await?;
            let mut health = HealthClient::new(channel);
            health.check(HealthCheckRequest { service: String::new() }).await.map_err(|s| s.into())
        };
        let ready: Result<_, Box<dyn std::error::Error>> =
            tokio::time::timeout(std::time::Duration::from_secs(30), ready)
                .await
                .expect("daemon came up in time");
        ready.expect("daemon answers its first request");
        daemon
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The facilitator's base URL (the daemon must have been started with one).
    pub fn facilitator_url(&self) -> String {
        format!("http://{}", self.facilitator_addr.expect("started with a facilitator listener"))
    }

    /// The Admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub async fn admin(&self) -> v1::admin_client::AdminClient<Channel> {
        v1::admin_client::AdminClient::connect(self.admin_url()).await.unwrap()
    }

    pub async fn ingest(&self) -> v1::ingest_client::IngestClient<Channel> {
        v1::ingest_client::IngestClient::connect(self.url()).await.unwrap()
    }

    pub async fn payments(&self) -> v1::payments_client::PaymentsClient<Channel> {
        v1::payments_client::PaymentsClient::connect(self.url()).await.unwrap()
    }

    pub fn domain(&self) -> TokenDomain {
        self.devnet.token_domain()
    }

    /// `n` payers funded with `balance` base units each.
    pub async fn payers(&self, seed: &str, n: usize, balance: u64) -> Vec<PrivateKeySigner> {
        let payers = devnet::payer_keys(seed, n);
        let addrs: Vec<_> = payers.iter().map(|p| p.address()).collect();
        self.devnet.fund(&addrs, U256::from(balance)).await.unwrap();
        payers
    }

    /// Stops the daemon as SIGTERM would and waits for it to exit cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
