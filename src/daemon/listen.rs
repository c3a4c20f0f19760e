//! Serving: the API and Admin gRPC servers and the facilitator's HTTP server, until a drain
//! (the shutdown signal, or a ledger that can no longer make anything durable) has ended.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

use super::start::{Access, Caps};
use super::{DaemonError, Listeners};
use crate::api::{self, v1};
use crate::auth::Role;
use crate::config::Config;
use crate::connections::Protocol;
use crate::ingest::Ingest;
use crate::ledger::LedgerHandle;
use crate::server::Services;

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

/// Serves every listener until the drain ends. Returns why the ledger failed, if that is
/// what started the drain (the daemon then exits with an error, for its supervisor to
/// restart it).
pub(super) async fn serve(
    config: &Config,
    listeners: Listeners,
    access: &Access,
    caps: &Caps,
    supported: crate::facilitator::wire::SupportedReply,
    ingest: Arc<Ingest>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Option<String>, DaemonError> {
    let (drain_tx, drain_rx) = watch::channel(false);
    let drained = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|draining| *draining).await;
    };
    let facilitator_addr = listeners.facilitator.as_ref().and_then(|l| l.local_addr().ok());
    let facilitator = listeners.facilitator.map(|listener| {
        let f = crate::facilitator::Facilitator::new(
            Arc::clone(&ingest),
            Arc::clone(&access.auth),
            config.facilitator.clone(),
            supported,
            drain_rx.clone(),
        );
        (f, listener)
    });
    let services =
        Services::new(Arc::clone(&ingest), drain_rx.clone(), access.policy.clone(), access.board.clone());
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
        tls = access.tls.is_some(),
        authenticated = access.auth.required(),
        "serving gRPC"
    );
    // Stops on the shutdown signal, or when the ledger can no longer make anything durable.
    let fatal: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let drain = drain_on(shutdown, Arc::clone(&ingest), health, drain_tx, Arc::clone(&fatal));
    // Health answers anyone (load balancers probe it); everything else passes the gate.
    let (api_gate, admin_gate) = (access.auth.gate(Role::Api), access.auth.gate(Role::Admin));
    let door = |role: Role, cap| caps.gate(role.as_str(), Protocol::Grpc, cap, caps.per_peer);
    let (api_door, admin_door) = (door(Role::Api, caps.api), door(Role::Admin, caps.admin));
    let api = grpc(config)
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
            crate::connections::incoming(listeners.api, access.tls.clone(), api_door),
            drain,
        );
    let admin = grpc(config)
        .max_concurrent_streams(Some(ADMIN_MAX_CONCURRENT_STREAMS))
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection()?, admin_gate.clone()))
        .add_service(InterceptedService::new(
            v1::admin_server::AdminServer::new(services).max_decoding_message_size(max),
            admin_gate,
        ))
        .serve_with_incoming_shutdown(
            crate::connections::incoming(listeners.admin, access.tls.clone(), admin_door),
            drained(drain_rx.clone()),
        );
    let tls_http = access.tls.as_deref().map(crate::tls::http_server_config);
    let http_drained = drained(drain_rx.clone());
    let http_door = caps.gate(crate::facilitator::LISTENER, Protocol::Http, caps.facilitator, caps.per_peer);
    let http = async move {
        let Some((f, listener)) = facilitator else { return Ok(()) };
        crate::facilitator::serve(f, listener, tls_http, http_door, max, http_drained)
            .await
            .map_err(DaemonError::Facilitator)
    };
    let server = async move {
        let grpc = async { tokio::try_join!(api, admin).map_err(DaemonError::from) };
        tokio::try_join!(grpc, http).map(|_| ())
    };
    until_drained(server, drain_rx, ingest.ledger().clone()).await?;
    Ok(fatal.lock().take())
}

/// A gRPC server with the HTTP/2 keep-alive pings of `[connections]`.
fn grpc(config: &Config) -> tonic::transport::Server {
    let c = &config.connections;
    let keepalive =
        (c.http2_keepalive_interval_ms > 0).then(|| Duration::from_millis(c.http2_keepalive_interval_ms));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_millis(c.http2_keepalive_timeout_ms)))
}

/// Starts the drain on the shutdown signal, or when the ledger can no longer make anything
/// durable (its cause kept in `fatal`): ingest refuses new submissions, health says not
/// serving, and every listener is told to drain.
async fn drain_on(
    shutdown: impl Future<Output = ()>,
    ingest: Arc<Ingest>,
    health: tonic_health::server::HealthReporter,
    drain_tx: watch::Sender<bool>,
    fatal: Arc<parking_lot::Mutex<Option<String>>>,
) {
    let writer = ingest.ledger().clone();
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

/// Runs `server` until it ends. A drain ends when every connection has closed; a client
/// that keeps a stream open (its request half never finished) must not hold the daemon up
/// for ever. A commit that never returns (storage that blocks rather than fails) holds
/// every submission waiting on it, and a drain would wait for them for ever: stop at once
/// (nothing waiting was acknowledged; the supervisor restarts the daemon).
async fn until_drained(
    server: impl Future<Output = Result<(), DaemonError>>,
    drain_rx: watch::Receiver<bool>,
    writer: LedgerHandle,
) -> Result<(), DaemonError> {
    let drain_deadline = async move {
        let mut rx = drain_rx;
        let _ = rx.wait_for(|draining| *draining).await;
        tokio::time::sleep(DRAIN_LIMIT).await;
    };
    tokio::select! {
        served = server => served?,
        _ = drain_deadline => {
            tracing::warn!("the drain did not finish within {DRAIN_LIMIT:?}: closing the connections still open");
        }
        stalled = ledger_stall(writer) => {
            tracing::error!("a ledger commit has not returned for {stalled:?}: stopping without draining");
            return Err(DaemonError::LedgerFailed(format!("a commit has not returned for {stalled:?}")));
        }
    }
    Ok(())
}
