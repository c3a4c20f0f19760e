//! The x402 facilitator HTTP API: what the ecosystem's middlewares (`x402-express`,
//! `@x402/express`, ...) call when configured with a facilitator URL.
//!
//! ```text
//! GET  /supported  the kinds taken (every configured token's network, v1 names and CAIP-2
//!                  ids), the extensions, the settler addresses
//! POST /verify     the whole decision of a gRPC Submit, then a hold (nothing owed yet)
//! POST /settle     the same decision, then the durable acceptance (claiming the hold), then
//!                  an answer by [`SettleMode`]: once included, once confirmed, or at once
//! GET  /payments/{id}  a payment's status (the URL an `accepted` settle answers with)
//! GET  /health     serving or draining
//! ```
//!
//! An adapter, like the gRPC services: it translates bodies and replies ([`wire`]) and
//! decides nothing itself. Every decision is [`Ingest::decide`]'s, over the same ledger,
//! credentials ([`Auth::check`]) and per-server limits; payments made here are exported and
//! reconciled with the rest. How `/settle` waits and answers is in [`settle`].
//!
//! Replies follow the protocol: a payment the protocol refuses is HTTP 200 with `isValid` /
//! `success` false and the official reason code; a malformed body is 400; a missing or
//! unknown credential 401, a credential of another role 403; an overloaded daemon 429, one
//! that cannot decide (draining, ledger or RPC node down) 503. Every refusal says why.

pub mod settle;
pub mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::rustls::ServerConfig;

use crate::admission::PaymentInput;
use crate::auth::{Auth, Peer, Role};
use crate::config::{FacilitatorConfig, SettleMode, TokenTable};
use crate::ingest::{Decision, Ingest, Intent, PaymentRequest, SubmitError};
use crate::ledger::{AuthKey, PaymentId, PaymentRecord, Repeat};
use crate::x402::{Reason, SCHEME_EXACT, network};
use wire::{FacilitatorRequest, SupportedKind, SupportedReply, VerifyReply, WireError};

/// The listener's name in logs and in `x402_batcher_auth_refused_total`.
pub const LISTENER: &str = "facilitator";

/// The facilitator's shared state.
pub struct Facilitator {
    ingest: Arc<Ingest>,
    auth: Arc<Auth>,
    config: FacilitatorConfig,
    supported: SupportedReply,
    /// Payments answered `settlement_pending`, by key, with when: the one retry of each
    /// waits again instead of being refused as a replay.
    pending: Mutex<HashMap<AuthKey, std::time::Instant>>,
    /// Turns true when the daemon drains: waiting settles answer at once.
    draining: watch::Receiver<bool>,
}

impl Facilitator {
    pub fn new(
        ingest: Arc<Ingest>,
        auth: Arc<Auth>,
        config: FacilitatorConfig,
        supported: SupportedReply,
        draining: watch::Receiver<bool>,
    ) -> Arc<Facilitator> {
        Arc::new(Facilitator { ingest, auth, config, supported, pending: Mutex::default(), draining })
    }

    /// The configured settle mode.
    pub fn settle_mode(&self) -> SettleMode {
        self.config.settle_mode
    }

    /// Authenticates a call: the caller's name for the ledger and the limits (its
    /// credential's, or `http:<address>` while authentication is off, on loopback), or the
    /// refusal to answer with.
    fn caller(&self, headers: &HeaderMap, peer: &Peer, endpoint: &'static str) -> Result<String, Refused> {
        let authorization = headers.get(header::AUTHORIZATION).map(|v| v.to_str().ok());
        match self.auth.check(LISTENER, Role::Api, authorization, Some(peer)) {
            Ok(Some(principal)) => Ok(principal.name.to_string()),
            Ok(None) => Ok(match peer.addr {
                Some(addr) => format!("http:{}", addr.ip()),
                None => "http".to_owned(),
            }),
            Err(status) => {
                let (code, outcome) = if status.code() == tonic::Code::PermissionDenied {
                    (StatusCode::FORBIDDEN, "permission_denied")
                } else {
                    (StatusCode::UNAUTHORIZED, "unauthenticated")
                };
                count(endpoint, outcome);
                Err(Refused { code, message: status.message().to_owned() })
            }
        }
    }

    /// The domain request of a decoded body, sent by `api_server`.
    fn payment_request(req: FacilitatorRequest, api_server: String) -> PaymentRequest {
        PaymentRequest {
            payment: PaymentInput::Header(req.payment),
            requirements: req.requirements,
            idempotency_key: req.payment_identifier.unwrap_or_default(),
            resource: req.resource,
            api_server,
        }
    }

    /// `POST /verify`: the decision, then a hold.
    pub async fn verify(&self, api_server: String, body: &[u8]) -> (StatusCode, VerifyReply) {
        let req = match wire::request(body) {
            Ok(req) => req,
            Err(e) => {
                count("verify", e.reason().code());
                return (wire_status(&e), VerifyReply::invalid(e.reason().code(), e.to_string(), None));
            }
        };
        let payer = req.payment.authorization.from;
        let hold = Intent::Hold { hold_ms: self.config.hold_ms };
        let (status, reply) = match self.ingest.decide(Self::payment_request(req, api_server), hold).await {
            Ok(Decision::Held { payer, .. }) => (StatusCode::OK, VerifyReply::valid(payer)),
            // The same payment-identifier as the acceptance: the first answer again.
            Ok(Decision::Accepted { repeat: Repeat::Retry, .. }) => {
                (StatusCode::OK, VerifyReply::valid(payer))
            }
            Ok(Decision::Accepted { record, .. }) => (
                StatusCode::OK,
                VerifyReply::invalid(Reason::NonceAlreadyUsed.code(), replayed(&record), Some(payer)),
            ),
            Ok(Decision::Rejected { reason, message }) => {
                (StatusCode::OK, VerifyReply::invalid(reason.code(), message, Some(payer)))
            }
            Err(e) => (
                error_status(&e),
                VerifyReply::invalid(Reason::UnexpectedVerifyError.code(), e.to_string(), Some(payer)),
            ),
        };
        count("verify", reply.invalid_reason.as_deref().unwrap_or("valid"));
        (status, reply)
    }

    /// The `/payments/{id}` view of a payment.
    fn payment_view(&self, record: &PaymentRecord) -> serde_json::Value {
        let hash = |h: Option<alloy::primitives::B256>| h.map(|h| h.to_string());
        serde_json::json!({
            "paymentId": record.payment_id().to_string(),
            "status": record.status.as_str(),
            "payer": record.signed.authorization.from.to_checksum(None),
            "payTo": record.signed.authorization.to.to_checksum(None),
            "amount": record.value().to_string(),
            "asset": record.signed.token.to_checksum(None),
            "network": record.submission.network,
            "transaction": hash(record.tx_hash).or_else(|| self.transaction_of(record).map(|h| h.to_string())),
            "blockNumber": (record.block_number > 0).then_some(record.block_number),
            "failureReason": (!record.failure_reason.is_empty()).then_some(&record.failure_reason),
            "failureMessage": (!record.failure_message.is_empty()).then_some(&record.failure_message),
            "acceptedAtMs": record.accepted_at_ms,
        })
    }

    /// The hash of the transaction carrying `record` (its batch's newest signed attempt),
    /// before its inclusion is known.
    fn transaction_of(&self, record: &PaymentRecord) -> Option<alloy::primitives::B256> {
        if let Some(hash) = record.tx_hash {
            return Some(hash);
        }
        let (chain, counter) = crate::ledger::BatchRecord::parse_id(&record.batch_id)?;
        let batch = self.ingest.ledger().ledger().batch(chain, counter).ok()??;
        batch.attempts.last().map(|a| a.tx_hash)
    }
}

/// A call refused before it reached a decision: its status and why.
struct Refused {
    code: StatusCode,
    message: String,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.code, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// Why a recorded payment is not verified or settled again.
fn replayed(record: &PaymentRecord) -> String {
    format!(
        "payment {} was already accepted for an earlier request (now {}): a payment pays for one request; \
         send the same payment-identifier to repeat a request",
        record.payment_id(),
        record.status.as_str()
    )
}

/// The HTTP status of a body that could not be decoded.
fn wire_status(e: &WireError) -> StatusCode {
    if e.is_malformed_request() { StatusCode::BAD_REQUEST } else { StatusCode::OK }
}

/// The HTTP status of a system condition.
fn error_status(e: &SubmitError) -> StatusCode {
    match e {
        SubmitError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        SubmitError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        SubmitError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        SubmitError::PermissionDenied(_) => StatusCode::FORBIDDEN,
    }
}

/// Counts one request by endpoint and outcome (`valid`, `success`, a reason code, or the
/// refusal of its caller).
fn count(endpoint: &'static str, outcome: &str) {
    metrics::counter!(
        "x402_batcher_facilitator_requests_total",
        "endpoint" => endpoint,
        "outcome" => outcome.to_owned()
    )
    .increment(1);
}

/// `GET /supported` from the token table, the network aliases and the settlers.
pub fn supported(
    tokens: &TokenTable,
    aliases: &std::collections::BTreeMap<String, u64>,
    settlers: &[alloy::primitives::Address],
) -> SupportedReply {
    let mut entries: Vec<_> = tokens.iter().collect();
    entries.sort_by_key(|t| (t.domain.chain_id, t.domain.verifying_contract));
    let mut kinds = Vec::new();
    for token in entries {
        let extra = serde_json::json!({
            "name": token.domain.name,
            "version": token.domain.version,
            "asset": token.domain.verifying_contract.to_checksum(None),
        });
        let chain_id = token.domain.chain_id;
        kinds.push(SupportedKind {
            x402_version: 2,
            scheme: SCHEME_EXACT,
            network: format!("eip155:{chain_id}"),
            extra: extra.clone(),
        });
        for name in network::v1_names(chain_id, aliases) {
            kinds.push(SupportedKind {
                x402_version: 1,
                scheme: SCHEME_EXACT,
                network: name,
                extra: extra.clone(),
            });
        }
    }
    let signers = settlers.iter().map(|a| a.to_checksum(None)).collect();
    SupportedReply {
        kinds,
        extensions: vec![wire::PAYMENT_IDENTIFIER],
        signers: [("eip155:*".to_owned(), signers)].into_iter().collect(),
    }
}

type Shared = State<Arc<Facilitator>>;

/// The routes, over `facilitator`, taking bodies of at most `max_body` bytes.
pub fn router(facilitator: Arc<Facilitator>, max_body: usize) -> Router {
    Router::new()
        .route("/supported", get(get_supported))
        .route("/verify", post(post_verify))
        .route("/settle", post(post_settle))
        .route("/payments/{id}", get(get_payment))
        .route("/health", get(get_health))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(facilitator)
}

async fn get_supported(
    State(f): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = f.caller(&headers, &peer, "supported") {
        return refused.into_response();
    }
    count("supported", "ok");
    Json(f.supported.clone()).into_response()
}

async fn post_verify(
    State(f): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api_server = match f.caller(&headers, &peer, "verify") {
        Ok(name) => name,
        Err(refused) => return refused.into_response(),
    };
    let (status, reply) = f.verify(api_server, &body).await;
    (status, Json(reply)).into_response()
}

async fn post_settle(
    State(f): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api_server = match f.caller(&headers, &peer, "settle") {
        Ok(name) => name,
        Err(refused) => return refused.into_response(),
    };
    let (status, reply) = f.settle(api_server, &body).await;
    (status, Json(reply)).into_response()
}

async fn get_payment(
    State(f): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refused) = f.caller(&headers, &peer, "payment") {
        return refused.into_response();
    }
    let Ok(id) = id.parse::<PaymentId>() else {
        let error = "a payment id is 0x followed by 32 hex digits";
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": error }))).into_response();
    };
    match f.ingest.ledger().ledger().get_by_id(&id) {
        Ok(Some(record)) => Json(f.payment_view(&record)).into_response(),
        Ok(None) => {
            (StatusCode::NOT_FOUND, Json(serde_json::json!({ "error": "no such payment" }))).into_response()
        }
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "error": format!("ledger: {e}") })))
                .into_response()
        }
    }
}

async fn get_health(State(f): Shared) -> Response {
    if f.ingest.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "draining" }))).into_response()
    } else {
        Json(serde_json::json!({ "status": "serving" })).into_response()
    }
}

/// The listener's connections (TLS or not) as axum takes them, each with its [`Peer`].
struct Incoming {
    conns: tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::tls::Conn>>,
    local: Option<std::net::SocketAddr>,
}

impl axum::serve::Listener for Incoming {
    type Io = crate::tls::Conn;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures::StreamExt as _;
        use tonic::transport::server::Connected as _;
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.connect_info();
                    return (conn, peer);
                }
                Some(Err(e)) => tracing::warn!(listener = LISTENER, "cannot accept a connection: {e}"),
                // The accept loop ended (the listener is closing): nothing more comes.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer::new(self.local, None))
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// Serves the facilitator on `listener` (TLS when `tls` is given) until `shutdown`
/// resolves, then lets the requests in flight finish.
pub async fn serve(
    facilitator: Arc<Facilitator>,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    max_body: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr().ok();
    let incoming = Incoming { conns: crate::tls::incoming(listener, tls, LISTENER), local };
    let app = router(facilitator, max_body).into_make_service_with_connect_info::<Peer>();
    axum::serve(incoming, app).with_graceful_shutdown(shutdown).await
}
