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
//! reconciled with the rest. Who calls is checked once, by the [`caller::Caller`] extractor
//! every route takes; `/verify` is [`verify`], `/settle` (how it waits and answers)
//! [`settle`], `/payments/{id}` [`payments`], the routes and the listener [`serve`].
//!
//! Replies follow the protocol: a payment the protocol refuses is HTTP 200 with `isValid` /
//! `success` false and the official reason code; a malformed body is 400; a missing or
//! unknown credential 401, a credential of another role 403; an overloaded daemon 429, one
//! that cannot decide (draining, ledger or RPC node down) 503. Every refusal says why.

pub mod caller;
pub mod payments;
pub mod serve;
pub mod settle;
pub mod verify;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::admission::PaymentInput;
use crate::auth::Auth;
use crate::clock::Clock;
use crate::config::{FacilitatorConfig, SettleMode, TokenTable};
use crate::ingest::{Ingest, PaymentRequest, SubmitError};
use crate::ledger::{AuthKey, LedgerHandle, PaymentRecord};
use crate::x402::{SCHEME_EXACT, network};
use wire::{FacilitatorRequest, SupportedKind, SupportedReply, WireError};

pub use serve::{router, serve};

/// The listener's name in logs and in `x402_batcher_auth_refused_total`.
pub const LISTENER: &str = "facilitator";

/// The facilitator's shared state.
pub struct Facilitator {
    /// Decides every payment (the same decision as gRPC's).
    ingest: Arc<Ingest>,
    /// Payments followed until their settle mode's state, batches read for their
    /// transaction, withdrawals written.
    ledger: LedgerHandle,
    clock: Arc<dyn Clock>,
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
    /// Over `ingest` (its decisions, ledger and clock), checking callers with `auth`.
    pub fn new(
        ingest: Arc<Ingest>,
        auth: Arc<Auth>,
        config: FacilitatorConfig,
        supported: SupportedReply,
        draining: watch::Receiver<bool>,
    ) -> Arc<Facilitator> {
        let (ledger, clock) = (ingest.ledger().clone(), Arc::clone(ingest.clock()));
        Arc::new(Facilitator {
            ingest,
            ledger,
            clock,
            auth,
            config,
            supported,
            pending: Mutex::default(),
            draining,
        })
    }

    /// The configured settle mode.
    pub fn settle_mode(&self) -> SettleMode {
        self.config.settle_mode
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
}

/// A call refused before it reached a decision: its status and why.
pub struct Refused {
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
