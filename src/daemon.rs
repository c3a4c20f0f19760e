//! Assembly of the running daemon: ledger, writer, verify pool, chain connections, balance
//! cache, ingest and the gRPC server, with an orderly drain on shutdown.
//!
//! Start-up refuses to run on anything doubtful: an invalid config, a ledger of a newer
//! schema, or a token whose on-chain `DOMAIN_SEPARATOR()` differs from the configured one.
//! Shutdown (the `shutdown` future resolving, e.g. on SIGTERM) stops accepting connections,
//! answers new submissions UNAVAILABLE, lets in-flight ones finish (acked or refused), ends
//! the long-lived streams, and waits for the ledger writer to commit what it holds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

use crate::admission::Admission;
use crate::api::{self, v1};
use crate::audit::NonceAudit;
use crate::auth::{Auth, Role};
use crate::balance::{BalanceCache, ChainBalances};
use crate::chain::{self, RpcEndpoint};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, DEFAULT_LEDGER_QUEUE_CAPACITY};
use crate::ingest::Ingest;
use crate::ledger::{Ledger, LedgerError, LedgerHandle, LedgerStore};
use crate::policy::{PolicyHandle, SettlementPolicy};
use crate::server::Services;
use crate::verify::VerifyPool;

/// How long shutdown waits for the ledger writer after the server stopped. Every answered
/// submission is already on disk; this only bounds a clean exit.
const WRITER_JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for a settlement round in progress.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("ledger")]
    Ledger(#[from] LedgerError),
    #[error("chain {chain_id}: rpc_url is not a valid URL")]
    RpcUrl { chain_id: u64 },
    #[error(transparent)]
    Chain(chain::ChainError),
    #[error("chain {chain_id}: RPC call {call} failed: {detail}")]
    Rpc { chain_id: u64, call: &'static str, detail: String },
    #[error("settler keys")]
    Keys(#[from] crate::settle::KeyError),
    #[error("settlement engine for chain {chain_id}")]
    Settle {
        chain_id: u64,
        #[source]
        source: crate::settle::SettleError,
    },
    #[error("could not start a thread")]
    Thread(#[source] std::io::Error),
    #[error("could not build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
    #[error("the ledger failed to commit, nothing more could be made durable: {0}")]
    LedgerFailed(String),
    #[error("TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("facilitator HTTP server failed")]
    Facilitator(#[source] std::io::Error),
    #[error("cannot listen for metrics on {addr}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The daemon's listeners, bound before it starts (so their addresses can be reported,
/// and a port 0 resolved, first).
pub struct Listeners {
    /// API servers: Ingest and Payments (`server.listen`).
    pub api: TcpListener,
    /// Operators: Admin (`admin.listen`).
    pub admin: TcpListener,
    /// API servers' x402 middlewares: the facilitator HTTP API (`facilitator.listen`), when
    /// served.
    pub facilitator: Option<TcpListener>,
}

impl Listeners {
    /// Binds `server.listen` and `admin.listen`.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let bind = |addr: std::net::SocketAddr, field: &str| {
            let field = field.to_owned();
            async move {
                TcpListener::bind(addr).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({field}): {e}"))
                })
            }
        };
        let facilitator = match config.facilitator.listen {
            Some(addr) => Some(bind(addr, "facilitator.listen").await?),
            None => None,
        };
        Ok(Listeners {
            api: bind(config.server.listen, "server.listen").await?,
            admin: bind(config.admin.listen, "admin.listen").await?,
            facilitator,
        })
    }

    /// The gRPC listeners on 127.0.0.1, on ports the system picks (tests, the demo, the
    /// load generator); no facilitator.
    pub async fn loopback() -> std::io::Result<Listeners> {
        Ok(Listeners {
            api: TcpListener::bind("127.0.0.1:0").await?,
            admin: TcpListener::bind("127.0.0.1:0").await?,
            facilitator: None,
        })
    }

    /// [`Listeners::loopback`] with the facilitator on 127.0.0.1 too.
    pub async fn loopback_with_facilitator() -> std::io::Result<Listeners> {
        let mut listeners = Self::loopback().await?;
        listeners.facilitator = Some(TcpListener::bind("127.0.0.1:0").await?);
        Ok(listeners)
    }
}

/// Runs the daemon on `listeners` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    config.validate()?;
    config.validate_for_run()?;
    if listeners.facilitator.is_some() {
        config.validate_facilitator_settles()?;
    }
    let path = config.ledger.path.clone().expect("validate_for_run requires ledger.path");
    // Installed first: a SIGHUP during start-up must not kill the daemon (the default action).
    let hangup = match config.source {
        Some(_) => match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP ({e}); config reload is off");
                None
            }
        },
        None => None,
    };
    let metrics_task = match (config.metrics.listen, crate::telemetry::install()) {
        (Some(addr), Some(handle)) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::MetricsListen { addr, source })?;
            let bound =
                listener.local_addr().map_err(|source| DaemonError::MetricsListen { addr, source })?;
            tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
            // Scripts and tests read the bound address (the port may be 0 in the config).
            println!("metrics on {bound}");
            Some(tokio::spawn(crate::telemetry::serve(listener, handle)))
        }
        _ => None,
    };
    let policy = PolicyHandle::new(config.settlement.policy());
    let auth = Auth::new(&config.credentials).map_err(DaemonError::Credentials)?;
    let tls = config.tls.as_ref().map(crate::tls::server_config).transpose()?;
    if !auth.required() {
        tracing::warn!(
            "no [[credentials]] configured: calls are not authenticated (the listeners are on loopback)"
        );
    }

    let mut endpoints: HashMap<u64, RpcEndpoint> = HashMap::new();
    for c in &config.chains {
        let endpoint = RpcEndpoint::connect_http(c.chain_id, &c.rpc_url)
            .ok_or(DaemonError::RpcUrl { chain_id: c.chain_id })?;
        endpoints.insert(c.chain_id, endpoint);
    }
    let tokens = config.token_table();
    for token in tokens.iter() {
        let endpoint = &endpoints[&token.domain.chain_id];
        chain::check_domain(&endpoint.provider, &token.domain).await.map_err(|e| match e {
            // The transport error quotes the URL, which may carry an API key.
            chain::ChainError::Rpc { call, source } => DaemonError::Rpc {
                chain_id: endpoint.chain_id,
                call,
                detail: endpoint.redact(&source.to_string()),
            },
            other => DaemonError::Chain(other),
        })?;
        tracing::info!(
            chain_id = token.domain.chain_id,
            token = %token.domain.verifying_contract,
            "token EIP-712 domain matches the chain"
        );
    }

    let ledger: Arc<dyn LedgerStore> = Arc::new(Ledger::open(&path)?);
    tracing::info!(path = %path.display(), last_seq = ledger.last_seq(), pending = ledger.pending(), "ledger open");
    let queue = if config.ledger.queue_capacity == 0 {
        DEFAULT_LEDGER_QUEUE_CAPACITY
    } else {
        config.ledger.queue_capacity
    };
    let (writer, writer_thread) = LedgerHandle::start(ledger, queue).map_err(DaemonError::Thread)?;
    let pool = Arc::new(VerifyPool::from_config(&config.verify).map_err(DaemonError::Thread)?);
    let audit = NonceAudit::new(writer.clone(), endpoints.clone());
    let balances = BalanceCache::start(
        Arc::new(ChainBalances::new(endpoints.clone())),
        Duration::from_millis(config.balances.max_age_ms),
        config.balances.max_batch,
    );
    let audit_task = (config.audit.nonce_interval_ms > 0).then(|| {
        tokio::spawn(
            audit.run_every(Duration::from_millis(config.audit.nonce_interval_ms), Arc::clone(&clock)),
        )
    });
    let (settle_stop, settle_stopped) = watch::channel(false);
    let mut engines = Vec::new();
    let signers =
        if config.settlement.enabled() { crate::settle::load_keys(&config.settlement)? } else { Vec::new() };
    if config.settlement.enabled() {
        let chains: std::collections::BTreeSet<u64> = tokens.iter().map(|t| t.domain.chain_id).collect();
        for chain_id in chains {
            let engine = crate::settle::Engine::new(
                crate::settle::RpcChain::new(endpoints[&chain_id].clone()),
                writer.clone(),
                Arc::clone(&clock),
                Some(balances.clone()),
                &signers,
                config.settlement.clone(),
                policy.subscribe(),
            )
            .map_err(|source| DaemonError::Settle { chain_id, source })?;
            tracing::info!(
                chain_id,
                settlers = ?signers.iter().map(|s| s.address()).collect::<Vec<_>>(),
                confirmations = config.settlement.confirmations,
                "settlement engine started"
            );
            engines.push(tokio::spawn(engine.run(settle_stopped.clone())));
        }
    } else {
        tracing::warn!(
            "no settler keys configured (settlement.settler_keys_file / settler_keys_env): payments are \
             accepted and held, not settled"
        );
    }
    let supported = crate::facilitator::supported(
        &tokens,
        &config.network_aliases,
        &signers.iter().map(|s| s.address()).collect::<Vec<_>>(),
    );
    let admission = Admission::new(tokens, config.network_aliases.clone(), config.admission.clone(), clock);
    let limits = crate::limits::Limits::new(&config.limits);
    let ingest = Arc::new(Ingest::new(admission, pool, writer, balances, limits));

    let (drain_tx, drain_rx) = watch::channel(false);
    let mut drain_seen = drain_rx.clone();
    let facilitator_addr = listeners.facilitator.as_ref().and_then(|l| l.local_addr().ok());
    let facilitator = listeners.facilitator.map(|listener| {
        let f = crate::facilitator::Facilitator::new(
            Arc::clone(&ingest),
            Arc::clone(&auth),
            config.facilitator.clone(),
            supported,
            drain_rx.clone(),
        );
        (f, listener)
    });
    let services = Services::new(Arc::clone(&ingest), drain_rx, policy.clone());
    let reload_task =
        config.source.clone().zip(hangup).map(|(source, hangup)| {
            tokio::spawn(reload_on_sighup(source, hangup, policy, Arc::clone(&auth)))
        });
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<v1::ingest_server::IngestServer<Services>>().await;
    // Reflection on both listeners (grpcurl needs it), behind each listener's gate.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .build_v1()
    };
    let max = config.server.max_message_bytes;

    let (api_addr, admin_addr) = (listeners.api.local_addr().ok(), listeners.admin.local_addr().ok());
    tracing::info!(
        ?api_addr,
        ?admin_addr,
        ?facilitator_addr,
        tls = tls.is_some(),
        authenticated = auth.required(),
        "serving gRPC"
    );
    // Stops on the shutdown signal, or when the ledger can no longer make anything
    // durable (then the daemon exits with an error, for its supervisor to restart it).
    let fatal: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let drain = {
        let ingest = Arc::clone(&ingest);
        let (writer, fatal) = (ingest.ledger().clone(), Arc::clone(&fatal));
        async move {
            tokio::select! {
                _ = shutdown => tracing::info!("shutdown requested: draining"),
                cause = writer.failure() => {
                    tracing::error!("the ledger can no longer record payments ({cause}): draining and stopping");
                    *fatal.lock() = Some(cause);
                }
            }
            ingest.start_draining();
            health.set_not_serving::<v1::ingest_server::IngestServer<Services>>().await;
            let _ = drain_tx.send(true);
        }
    };
    // Health answers anyone (load balancers probe it); everything else passes the gate.
    let (api_gate, admin_gate) = (auth.gate(Role::Api), auth.gate(Role::Admin));
    let api = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(config.server.max_concurrent_streams))
        .add_service(health_service.clone())
        .add_service(InterceptedService::new(reflection()?, api_gate.clone()))
        .add_service(InterceptedService::new(
            v1::ingest_server::IngestServer::new(services.clone()).max_decoding_message_size(max),
            api_gate.clone(),
        ))
        .add_service(InterceptedService::new(
            v1::payments_server::PaymentsServer::new(services.clone()).max_decoding_message_size(max),
            api_gate,
        ))
        .serve_with_incoming_shutdown(
            crate::tls::incoming(listeners.api, tls.clone(), Role::Api.as_str()),
            drain,
        );
    let mut admin_drain = drain_seen.clone();
    let http_drain = drain_seen.clone();
    let tls_http = tls.as_deref().map(crate::tls::http_server_config);
    let admin = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(ADMIN_MAX_CONCURRENT_STREAMS))
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection()?, admin_gate.clone()))
        .add_service(InterceptedService::new(
            v1::admin_server::AdminServer::new(services).max_decoding_message_size(max),
            admin_gate,
        ))
        .serve_with_incoming_shutdown(
            crate::tls::incoming(listeners.admin, tls, Role::Admin.as_str()),
            async move {
                let _ = admin_drain.wait_for(|draining| *draining).await;
            },
        );
    let http = async move {
        let Some((f, listener)) = facilitator else { return Ok(()) };
        let tls = tls_http;
        let mut drained = http_drain;
        let shutdown = async move {
            let _ = drained.wait_for(|draining| *draining).await;
        };
        crate::facilitator::serve(f, listener, tls, max, shutdown).await.map_err(DaemonError::Facilitator)
    };
    let server = async move {
        let grpc = async { tokio::try_join!(api, admin).map_err(DaemonError::from) };
        tokio::try_join!(grpc, http).map(|_| ())
    };
    // A drain ends when every connection has closed; a client that keeps a stream open
    // (its request half never finished) must not hold the daemon up for ever. A commit
    // that never returns (storage that blocks rather than fails) holds every submission
    // waiting on it, and a drain would wait for them for ever: stop at once (nothing
    // waiting was acknowledged; the supervisor restarts the daemon).
    let drain_deadline = async move {
        let _ = drain_seen.wait_for(|draining| *draining).await;
        tokio::time::sleep(DRAIN_LIMIT).await;
    };
    tokio::select! {
        served = server => served?,
        _ = drain_deadline => {
            tracing::warn!("the drain did not finish within {DRAIN_LIMIT:?}: closing the connections still open");
        }
        stalled = ledger_stall(ingest.ledger().clone()) => {
            tracing::error!("a ledger commit has not returned for {stalled:?}: stopping without draining");
            return Err(DaemonError::LedgerFailed(format!("a commit has not returned for {stalled:?}")));
        }
    }

    for task in [audit_task, metrics_task, reload_task].into_iter().flatten() {
        task.abort();
        let _ = task.await;
    }
    // The engines finish their round (each step is written before it is acted on, so
    // stopping between rounds or, on a timeout, within one loses nothing).
    let _ = settle_stop.send(true);
    for task in engines {
        let abort = task.abort_handle();
        if tokio::time::timeout(ENGINE_STOP_TIMEOUT, task).await.is_err() {
            abort.abort();
        }
    }
    // Every request has been answered. The writer commits what it still holds and stops
    // (connection tasks that linger may still hold handles; they get UNAVAILABLE).
    let writer = ingest.ledger().clone();
    drop(ingest);
    let joined = tokio::task::spawn_blocking(move || {
        writer.stop();
        writer_thread.join()
    });
    if tokio::time::timeout(WRITER_JOIN_TIMEOUT, joined).await.is_err() {
        tracing::warn!(
            "ledger writer still busy after {WRITER_JOIN_TIMEOUT:?}; exiting anyway (answered writes are on disk)"
        );
    }
    if let Some(cause) = fatal.lock().take() {
        return Err(DaemonError::LedgerFailed(cause));
    }
    tracing::info!("stopped");
    Ok(())
}

/// Concurrent calls on one Admin connection: operators and their scripts, not a fleet.
const ADMIN_MAX_CONCURRENT_STREAMS: u32 = 16;

/// Longest a drain waits for clients to close their connections after every request read
/// was answered.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Longest a ledger commit may run before the daemon gives up on the storage.
const LEDGER_STALL_LIMIT: Duration = Duration::from_secs(10);

/// Resolves when a ledger commit has been running for over [`LEDGER_STALL_LIMIT`].
async fn ledger_stall(writer: LedgerHandle) -> Duration {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Some(d) = writer.commit_running_for()
            && d > LEDGER_STALL_LIMIT
        {
            return d;
        }
    }
}

/// Re-reads the config file on every SIGHUP and applies its settlement policy (batch size,
/// max wait, target cost, confirmations, deadline margin; pause stays as it is) and its
/// credentials (a removed one is revoked for the next call). A file that does not parse or
/// validate, or that would turn authentication on or off, changes nothing and is logged;
/// other sections need a restart.
async fn reload_on_sighup(
    source: std::path::PathBuf,
    mut hangup: tokio::signal::unix::Signal,
    policy: PolicyHandle,
    auth: Arc<Auth>,
) {
    while hangup.recv().await.is_some() {
        let path = source.display().to_string();
        match Config::load(&source) {
            Ok(new) if new.credentials.is_empty() == auth.required() => tracing::warn!(
                config = %path,
                "config reload refused, nothing changed: turning authentication on or off needs a restart"
            ),
            Ok(new) => {
                let from_file = new.settlement.policy();
                let result = policy.update(&format!("SIGHUP {path}"), |current| {
                    Ok(SettlementPolicy { paused: current.paused, ..from_file.clone() })
                });
                if result.is_err() {
                    continue;
                }
                // Validated with the file, and the on/off switch is excluded above.
                if let Err(e) = auth.reload(&new.credentials) {
                    tracing::error!(config = %path, "policy reloaded but credentials not: {e}");
                    continue;
                }
                tracing::info!(
                    config = %path,
                    credentials = new.credentials.len(),
                    "config reloaded ([settlement] policy fields and [[credentials]] apply without a restart)"
                );
            }
            Err(e) => tracing::warn!(config = %path, "config reload refused, nothing changed: {e}"),
        }
    }
}
