//! Assembly of the running daemon: ledger, writer, verify pool, chain connections, balance
//! cache, ingest and the gRPC server, with an orderly drain on shutdown.
//!
//! Start-up refuses to run on anything doubtful: an invalid config, a ledger of a newer
//! schema, or a token whose on-chain `DOMAIN_SEPARATOR()` differs from the configured one.
//! Shutdown (the `shutdown` future resolving, e.g. on SIGTERM) stops accepting connections,
//! answers new submissions UNAVAILABLE, lets in-flight ones finish (acked or refused), ends
//! the long-lived streams, and waits for the ledger writer to commit what it holds.
//!
//! [`serve`] reads as its steps: `start.rs` (checks, metrics, chains, the ledger and its
//! writer, settlement engines, ingest), `listen.rs` (the gRPC and facilitator servers until
//! the drain ends), `stop.rs` (background tasks, engines, the writer) and `reload.rs`
//! (SIGHUP).

mod listen;
mod reload;
mod start;
mod stop;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::chain::{self, RpcError};
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::ledger::LedgerError;

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
    Chain(Box<chain::ChainError>),
    #[error(transparent)]
    Rpc(#[from] RpcError),
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
    #[error(transparent)]
    Headroom(#[from] crate::connections::NoHeadroom),
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

    /// Where each listener is, one line each (`listening on ADDR` first: scripts read it).
    pub fn describe(&self) -> std::io::Result<String> {
        let mut lines =
            format!("listening on {}\nadmin on {}", self.api.local_addr()?, self.admin.local_addr()?);
        if let Some(http) = &self.facilitator {
            lines.push_str(&format!("\nfacilitator on {}", http.local_addr()?));
        }
        Ok(lines)
    }

    /// [`Listeners::loopback`] with the facilitator on 127.0.0.1 too.
    pub async fn loopback_with_facilitator() -> std::io::Result<Listeners> {
        let mut listeners = Self::loopback().await?;
        listeners.facilitator = Some(TcpListener::bind("127.0.0.1:0").await?);
        Ok(listeners)
    }
}

pub use start::open_files;

/// Runs the daemon on `listeners` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    start::check(&config, &listeners)?;
    let caps = start::Caps::new(&config, &listeners)?;
    // Installed first: a SIGHUP during start-up must not kill the daemon (the default action).
    let hangup = reload::hangup_signal(&config);
    let metrics = start::metrics(&config, &caps).await?;
    let access = start::Access::new(&config)?;
    let endpoints = start::chains(&config).await?;
    let core = start::Core::open(&config, &endpoints, &clock)?;
    let engines = start::engines(&config, &endpoints, &core, &clock, &access)?;
    let supported = crate::facilitator::supported(&core.tokens, &config.network_aliases, &engines.settlers);
    let ingest = start::ingest(&config, &core, clock);
    let reload = hangup.map(|(source, hangup)| {
        tokio::spawn(reload::on_sighup(source, hangup, access.policy.clone(), Arc::clone(&access.auth)))
    });
    let fatal =
        listen::serve(&config, listeners, &access, &caps, supported, Arc::clone(&ingest), shutdown).await?;
    stop::background([core.audit, metrics, reload]).await;
    engines.stop().await;
    stop::writer(ingest, core.writer_thread).await;
    if let Some(cause) = fatal {
        return Err(DaemonError::LedgerFailed(cause));
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// it is first awaited: a signal during start-up then ends the daemon cleanly once it is up,
/// instead of killing it by the default action.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (term, int) => {
                let e = term.err().or(int.err()).map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!("cannot watch SIGTERM/SIGINT ({e}); stop the daemon with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
