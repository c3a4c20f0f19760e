//! Start-up, step by step: the config checked, metrics served, access (policy, credentials,
//! TLS), the chains and their tokens' domains checked, the ledger and its writer, the verify
//! pool and balance cache, the settlement engines, and the ingest path over them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::Address;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{DaemonError, Listeners};
use crate::admission::Admission;
use crate::audit::NonceAudit;
use crate::auth::Auth;
use crate::balance::{BalanceCache, ChainBalances};
use crate::chain::{self, RpcEndpoint};
use crate::clock::Clock;
use crate::config::{Config, DEFAULT_LEDGER_QUEUE_CAPACITY, TokenTable};
use crate::connections::{Gate, Protocol, Timeouts};
use crate::ingest::Ingest;
use crate::ledger::LedgerHandle;
use crate::payer::{BatchedSignatures, ChainSignatures, SignatureJudge};
use crate::policy::PolicyHandle;
use crate::settle::{Engine, RpcChain, StatusBoard};
use crate::verify::VerifyPool;

/// Raises the soft open-file limit to the hard one: every connection, ledger file and RPC
/// socket takes a descriptor, and a distribution's default soft limit (often 1,024) is
/// reached by a few hundred idle clients. Logs the limit it runs with; a limit that cannot
/// be read or raised is logged and start-up goes on with it. Returns it (`None`: unknown or
/// unlimited).
pub fn open_files() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut raised = limit;
    raised.current = limit.maximum;
    if raised.current != limit.current
        && let Err(e) = setrlimit(Resource::Nofile, raised)
    {
        tracing::warn!(soft = ?limit.current, hard = ?limit.maximum, "cannot raise the open-file limit: {e}");
        return limit.current;
    }
    let now = getrlimit(Resource::Nofile).current;
    tracing::info!(open_files = ?now, was = ?limit.current, "open-file limit");
    now
}

/// How long shutdown waits for a settlement round in progress.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks the config for running with these listeners.
pub(super) fn check(config: &Config, listeners: &Listeners) -> Result<(), DaemonError> {
    config.validate()?;
    config.validate_for_run()?;
    if listeners.facilitator.is_some() {
        config.validate_facilitator_settles()?;
    }
    Ok(())
}

/// The connection cap of each listener, fitted under the open-file limit
/// ([`crate::connections::fit_caps`]), and the per-peer cap of those that run without
/// credentials.
pub(super) struct Caps {
    pub api: usize,
    pub admin: usize,
    pub facilitator: usize,
    pub metrics: usize,
    /// `None`: the listeners authenticate their callers (the metrics listener never does).
    pub per_peer: Option<usize>,
    pub timeouts: Timeouts,
}

impl Caps {
    pub fn new(config: &Config, listeners: &Listeners) -> Result<Caps, DaemonError> {
        let c = &config.connections;
        let wanted = [
            c.max_api,
            c.max_admin,
            if listeners.facilitator.is_some() { c.max_facilitator } else { 0 },
            if config.metrics.listen.is_some() { c.max_metrics } else { 0 },
        ];
        let served: Vec<usize> = wanted.iter().copied().filter(|&w| w > 0).collect();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let fitted = crate::connections::fit_caps(limit, c.reserved_files, &served)?;
        if fitted.reserved < c.reserved_files {
            tracing::warn!(
                open_files = ?limit,
                reserved_files = c.reserved_files,
                kept_back = fitted.reserved,
                "the open-file limit is too low to keep connections.reserved_files back beside the \
                 connection caps: half of it is kept back instead (raise the hard limit)"
            );
        }
        let kept_back = fitted.reserved;
        let mut fitted = fitted.caps.into_iter();
        let [api, admin, facilitator, metrics] =
            wanted.map(|w| if w > 0 { fitted.next().unwrap_or(0) } else { 0 });
        let caps = Caps {
            api,
            admin,
            facilitator,
            metrics,
            per_peer: config.credentials.is_empty().then_some(c.max_per_peer),
            timeouts: Timeouts::new(c),
        };
        let lowered = [api, admin, facilitator, metrics] != wanted;
        if lowered {
            tracing::warn!(
                open_files = ?limit,
                reserved = kept_back,
                api, admin, facilitator, metrics,
                "connection caps lowered to fit the open-file limit less connections.reserved_files \
                 (raise the hard limit to serve the configured caps)"
            );
        } else {
            tracing::info!(open_files = ?limit, api, admin, facilitator, metrics, per_peer = ?caps.per_peer, "connection caps");
        }
        Ok(caps)
    }

    /// The door of listener `name`.
    pub fn gate(
        &self,
        name: &'static str,
        protocol: Protocol,
        cap: usize,
        per_peer: Option<usize>,
    ) -> Arc<Gate> {
        Gate::new(name, protocol, cap, per_peer, self.timeouts)
    }
}

/// Serves `/metrics` when `metrics.listen` is set (and this process has no recorder yet),
/// under the metrics listener's caps (per peer too: it never authenticates).
pub(super) async fn metrics(config: &Config, caps: &Caps) -> Result<Option<JoinHandle<()>>, DaemonError> {
    let (Some(addr), Some(handle)) = (config.metrics.listen, crate::telemetry::install()) else {
        return Ok(None);
    };
    let listen_err = |source| DaemonError::MetricsListen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen_err)?;
    let bound = listener.local_addr().map_err(listen_err)?;
    tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
    // Scripts and tests read the bound address (the port may be 0 in the config).
    println!("metrics on {bound}");
    let gate = caps.gate("metrics", Protocol::Http, caps.metrics, Some(config.connections.max_per_peer));
    let (router, upkeep) = crate::telemetry::app(handle);
    Ok(Some(tokio::spawn(async move {
        let _upkeep = upkeep;
        let served =
            crate::connections::serve_http(listener, None, gate, router, std::future::pending()).await;
        if let Err(e) = served {
            tracing::error!("the metrics listener stopped: {e}");
        }
    })))
}

/// Who may call, over what, under which runtime policy.
pub(super) struct Access {
    pub policy: PolicyHandle,
    /// What each settlement engine last saw (Admin `GetStatus`).
    pub board: StatusBoard,
    pub auth: Arc<Auth>,
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Access {
    pub fn new(config: &Config) -> Result<Access, DaemonError> {
        let auth = Auth::new(&config.credentials).map_err(DaemonError::Credentials)?;
        let tls = config.tls.as_ref().map(crate::tls::server_config).transpose()?;
        if !auth.required() {
            tracing::warn!(
                "no [[credentials]] configured: calls are not authenticated (the listeners are on loopback)"
            );
        }
        Ok(Access {
            policy: PolicyHandle::new(config.settlement.policy()),
            board: StatusBoard::default(),
            auth,
            tls,
        })
    }
}

/// An RPC endpoint per configured chain, each token's EIP-712 domain checked against its
/// contract: a daemon that would accept signatures the token refuses does not start.
pub(super) async fn chains(config: &Config) -> Result<HashMap<u64, RpcEndpoint>, DaemonError> {
    let mut endpoints = HashMap::new();
    for c in &config.chains {
        let endpoint = RpcEndpoint::connect_all(c.chain_id, &c.urls())
            .ok_or(DaemonError::RpcUrl { chain_id: c.chain_id })?;
        endpoints.insert(c.chain_id, endpoint);
    }
    for token in config.token_table().iter() {
        let endpoint = &endpoints[&token.domain.chain_id];
        chain::check_domain(&endpoint.provider, &token.domain).await.map_err(|e| match e {
            // The transport error quotes the URL, which may carry an API key.
            chain::ChainError::Rpc { call, source } => DaemonError::Rpc(endpoint.error(call, source)),
            other => DaemonError::Chain(Box::new(other)),
        })?;
        tracing::info!(
            chain_id = token.domain.chain_id,
            token = %token.domain.verifying_contract,
            "token EIP-712 domain matches the chain"
        );
    }
    Ok(endpoints)
}

/// The ledger and its writer, the verify pool, the balance cache and the nonce audit.
pub(super) struct Core {
    pub tokens: TokenTable,
    pub writer: LedgerHandle,
    pub writer_thread: std::thread::JoinHandle<()>,
    pub pool: Arc<VerifyPool>,
    pub balances: BalanceCache,
    /// ERC-1271 checks of payers with code.
    pub signatures: Arc<dyn SignatureJudge>,
    pub audit: Option<JoinHandle<()>>,
}

impl Core {
    pub fn open(
        config: &Config,
        endpoints: &HashMap<u64, RpcEndpoint>,
        clock: &Arc<dyn Clock>,
    ) -> Result<Core, DaemonError> {
        let ledger = crate::ledger::open(&config.ledger)?;
        tracing::info!(at = %ledger.location(), last_seq = ledger.last_seq(), pending = ledger.pending(), "ledger open");
        let queue = match config.ledger.queue_capacity {
            0 => DEFAULT_LEDGER_QUEUE_CAPACITY,
            n => n,
        };
        let (writer, writer_thread) = LedgerHandle::start(ledger, queue).map_err(DaemonError::Thread)?;
        let pool = Arc::new(VerifyPool::from_config(&config.verify).map_err(DaemonError::Thread)?);
        let balances = BalanceCache::start(
            Arc::new(ChainBalances::new(
                endpoints.clone(),
                Duration::from_millis(config.balances.read_timeout_ms),
            )),
            &config.balances,
        );
        // ERC-1271 checks of concurrent submissions share one eth_call per chain.
        let signatures = Arc::new(BatchedSignatures::start(
            Arc::new(ChainSignatures::new(
                endpoints.clone(),
                Duration::from_millis(config.balances.read_timeout_ms),
            )),
            config.balances.max_batch,
        ));
        let audit = (config.audit.nonce_interval_ms > 0).then(|| {
            let audit = NonceAudit::new(writer.clone(), endpoints.clone());
            tokio::spawn(
                audit.run_every(Duration::from_millis(config.audit.nonce_interval_ms), Arc::clone(clock)),
            )
        });
        Ok(Core { tokens: config.token_table(), writer, writer_thread, pool, balances, signatures, audit })
    }
}

/// The settlement engines, one per chain with a token, and how to stop them.
pub(super) struct Engines {
    /// The settler accounts (the facilitator's `/supported` names them).
    pub settlers: Vec<Address>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Engines {
    /// Lets each engine finish its round (each step is written before it is acted on, so
    /// stopping between rounds or, on a timeout, within one loses nothing).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(ENGINE_STOP_TIMEOUT, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Starts a settlement engine per chain with a token, when settler keys are configured.
pub(super) fn engines(
    config: &Config,
    endpoints: &HashMap<u64, RpcEndpoint>,
    core: &Core,
    clock: &Arc<dyn Clock>,
    access: &Access,
) -> Result<Engines, DaemonError> {
    let (stop, stopped) = watch::channel(false);
    if !config.settlement.enabled() {
        tracing::warn!(
            "no settler keys configured (settlement.settler_keys_file / settler_keys_env): payments are \
             accepted and held, not settled"
        );
        return Ok(Engines { settlers: Vec::new(), stop, tasks: Vec::new() });
    }
    let signers = crate::settle::load_keys(&config.settlement)?;
    let settlers: Vec<Address> = signers.iter().map(|s| s.address()).collect();
    let chains: BTreeSet<u64> = core.tokens.iter().map(|t| t.domain.chain_id).collect();
    let mut tasks = Vec::new();
    // A ledger other daemons share: settler accounts are divided by leases, held under a
    // name unique to this process.
    let owner = core.writer.ledger().fleet().is_some().then(fleet_member_name);
    for chain_id in chains {
        let op_stack = config.chains.iter().any(|c| c.chain_id == chain_id && c.op_stack);
        let engine = Engine::new(
            RpcChain::new(endpoints[&chain_id].clone()).op_stack(op_stack),
            core.writer.clone(),
            Arc::clone(clock),
            Some(core.balances.clone()),
            &signers,
            config.settlement.clone(),
            access.policy.subscribe(),
        )
        .map_err(|source| DaemonError::Settle { chain_id, source })?
        .with_board(access.board.clone())
        .with_finality(
            config.chains.iter().find(|c| c.chain_id == chain_id).map(|c| c.finality).unwrap_or_default(),
        )
        .with_preconfirmations(
            config.chains.iter().find(|c| c.chain_id == chain_id).and_then(|c| c.preconfirmation_ms),
        );
        let ws_url = config.chains.iter().find(|c| c.chain_id == chain_id).and_then(|c| c.ws_url.clone());
        let engine = match ws_url {
            Some(url) => {
                let (feed, follower) = crate::settle::heads::follow(chain_id, url, stopped.clone());
                tasks.push(follower);
                engine.with_head_feed(feed)
            }
            None => engine,
        };
        let engine = match &owner {
            Some(owner) => engine.with_leases(owner, config.settlement.lease_ms),
            None => engine,
        };
        tracing::info!(
            chain_id,
            ?settlers,
            confirmations = config.settlement.confirmations,
            op_stack,
            "settlement engine started"
        );
        tasks.push(tokio::spawn(engine.run(stopped.clone())));
    }
    Ok(Engines { settlers, stop, tasks })
}

/// This process's name in a fleet: host, process id and start time (a restarted daemon is
/// a new member, so it takes its accounts back under a new epoch).
fn fleet_member_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{}-{}-{}", host.trim(), std::process::id(), started.as_millis())
}

/// The ingest path: admission, the verify pool, the ledger writer, balances and limits.
pub(super) fn ingest(config: &Config, core: &Core, clock: Arc<dyn Clock>) -> Arc<Ingest> {
    let admission =
        Admission::new(core.tokens.clone(), config.network_aliases.clone(), config.admission.clone(), clock);
    let limits = crate::limits::Limits::new(&config.limits);
    let factories =
        config.chains.iter().map(|c| (c.chain_id, c.erc6492_factories.iter().copied().collect())).collect();
    Arc::new(
        Ingest::new(
            admission,
            Arc::clone(&core.pool),
            core.writer.clone(),
            core.balances.clone(),
            Arc::clone(&core.signatures),
            limits,
        )
        .with_erc6492_factories(factories),
    )
}
