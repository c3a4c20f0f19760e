//! The decision path for one submitted payment, shared by both surfaces (gRPC `Submit`,
//! the HTTP facilitator's `/verify` and `/settle`), and the one place decisions become gRPC
//! replies and statuses.
//!
//! ```text
//! PaymentRequest ─▶ admission (static) ─▶ verify pool ─▶ window ─▶ balance ─▶ ledger writer ─▶ decision
//!                                                                            (accept, or hold)
//! ```
//!
//! Business refusals (bad signature, mismatch, expired, insufficient funds, nonce reuse)
//! are normal decisions with the official x402 reason code. System conditions are
//! [`SubmitError`]s: INVALID_ARGUMENT for a malformed request, RESOURCE_EXHAUSTED when a
//! bounded queue is full, UNAVAILABLE while draining or when a balance or the ledger cannot
//! be read or written. Nothing is recorded unless the decision is an acceptance.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use alloy::primitives::U256;

use crate::admission::{Admission, PaymentInput};
use crate::api::{self, v1};
use crate::balance::BalanceCache;
use crate::config::DEFAULT_MAX_TIMEOUT_SECS;
use crate::ledger::{
    AcceptOutcome, AcceptRequest, AuthKey, HoldOutcome, HoldRequest, LedgerError, LedgerHandle,
    PaymentRecord, Repeat, Submission,
};
use crate::limits::Limits;
use crate::verify::{PoolError, VerifyPool};
use crate::x402::{PaymentRequirements, Reason};

/// A payment as an API server hands it in, whichever surface it came by.
#[derive(Debug, Clone)]
pub struct PaymentRequest {
    pub payment: PaymentInput,
    pub requirements: PaymentRequirements,
    /// The x402 `payment-identifier` or another key the client names the payment by.
    pub idempotency_key: String,
    /// What the payment is for (the request URL), for finance.
    pub resource: String,
    /// The API server that received it: its credential's name when authenticated.
    pub api_server: String,
}

/// What the caller wants once the payment is judged good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Record it: an acceptance is durable and owed (gRPC `Submit`, HTTP `/settle`).
    Accept,
    /// Reserve it for `hold_ms` without recording anything (HTTP `/verify`); the acceptance
    /// that follows claims the hold.
    Hold { hold_ms: u64 },
}

/// The daemon's answer to a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Durably recorded: now ([`Repeat::New`]), or before, by this submission's key
    /// ([`Repeat::Retry`]) or not ([`Repeat::Replay`]).
    Accepted { record: PaymentRecord, repeat: Repeat },
    /// Good, and held until then (Unix ms); nothing recorded.
    Held { payer: alloy::primitives::Address, expires_at_ms: u64 },
    /// Refused; nothing recorded or held.
    Rejected { reason: Reason, message: String },
}

/// A system condition that kept a request from being decided. Nothing was recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("malformed request: {0}")]
    InvalidArgument(String),
    #[error("overloaded: {0}; retry with backoff")]
    ResourceExhausted(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl SubmitError {
    pub fn code(&self) -> tonic::Code {
        match self {
            SubmitError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            SubmitError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            SubmitError::Unavailable(_) => tonic::Code::Unavailable,
            SubmitError::PermissionDenied(_) => tonic::Code::PermissionDenied,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), self.to_string())
    }

    fn from_ledger(e: LedgerError) -> SubmitError {
        match e {
            LedgerError::QueueFull => SubmitError::ResourceExhausted("ledger write queue is full".into()),
            other => SubmitError::Unavailable(format!("ledger: {other}")),
        }
    }
}

/// The reply for a decision, or for a system condition on a stream.
pub fn reply(request_id: String, result: Result<Decision, SubmitError>) -> v1::SubmitReply {
    use v1::submit_reply::Outcome;
    let outcome = match result {
        Ok(Decision::Accepted { record, repeat }) => Outcome::Accepted(v1::Accepted {
            payment_id: record.payment_id().to_string(),
            status: record.status.to_api() as i32,
            duplicate: repeat != Repeat::New,
            repeat: repeat_to_api(repeat) as i32,
        }),
        // gRPC submissions always accept; a hold is the HTTP facilitator's.
        Ok(Decision::Held { .. }) => Outcome::Error(v1::SubmitError {
            code: tonic::Code::Internal as i32,
            message: "a gRPC submission was held instead of accepted".into(),
        }),
        Ok(Decision::Rejected { reason, message }) => {
            Outcome::Rejected(v1::Rejected { reason: reason.code().into(), message })
        }
        Err(e) => Outcome::Error(v1::SubmitError { code: e.code() as i32, message: e.to_string() }),
    };
    v1::SubmitReply { request_id, outcome: Some(outcome) }
}

/// The payment and terms of a gRPC submission.
pub fn payment_request(req: &v1::SubmitRequest) -> Result<PaymentRequest, api::ConvertError> {
    Ok(PaymentRequest {
        payment: api::payment_input(req)?,
        requirements: api::requirements(req)?,
        idempotency_key: req.idempotency_key.clone(),
        resource: req.resource.clone(),
        api_server: req.api_server.clone(),
    })
}

/// The gRPC form of a [`Repeat`].
fn repeat_to_api(repeat: Repeat) -> v1::Repeat {
    match repeat {
        Repeat::New => v1::Repeat::New,
        Repeat::Retry => v1::Repeat::Retry,
        Repeat::Replay => v1::Repeat::Replay,
    }
}

/// Everything a submission passes through.
pub struct Ingest {
    admission: Admission,
    pool: Arc<VerifyPool>,
    ledger: LedgerHandle,
    balances: BalanceCache,
    limits: Limits,
    draining: AtomicBool,
}

impl Ingest {
    pub fn new(
        admission: Admission,
        pool: Arc<VerifyPool>,
        ledger: LedgerHandle,
        balances: BalanceCache,
        limits: Limits,
    ) -> Self {
        Self { admission, pool, ledger, balances, limits, draining: AtomicBool::new(false) }
    }

    pub fn ledger(&self) -> &LedgerHandle {
        &self.ledger
    }

    pub fn pool(&self) -> &VerifyPool {
        &self.pool
    }

    /// The clock decisions are made against.
    pub fn clock(&self) -> &Arc<dyn crate::clock::Clock> {
        self.admission.clock()
    }

    /// From now on, new submissions are answered UNAVAILABLE; those in flight finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Decides one gRPC submission (an acceptance), and counts its outcome.
    pub async fn submit(&self, req: &v1::SubmitRequest) -> Result<Decision, SubmitError> {
        let request = match payment_request(req) {
            Ok(request) => request,
            Err(e) if e.is_malformed_request() => {
                return self.count(Err(SubmitError::InvalidArgument(e.to_string())));
            }
            Err(e) => {
                return self.count(Ok(Decision::Rejected { reason: e.reason(), message: e.to_string() }));
            }
        };
        self.decide(request, Intent::Accept).await
    }

    /// Decides one payment with `intent`, and counts its outcome.
    pub async fn decide(&self, request: PaymentRequest, intent: Intent) -> Result<Decision, SubmitError> {
        let result = self.judge(request, intent).await;
        self.count(result)
    }

    fn count(&self, result: Result<Decision, SubmitError>) -> Result<Decision, SubmitError> {
        let m = crate::telemetry::hot();
        match &result {
            Ok(Decision::Accepted { repeat: Repeat::New, .. }) => m.accepted.increment(1),
            Ok(Decision::Accepted { .. }) => m.duplicate.increment(1),
            Ok(Decision::Held { .. }) => m.held.increment(1),
            Ok(Decision::Rejected { reason, .. }) => {
                m.rejected.increment(1);
                m.refused(reason.code());
            }
            Err(e) => {
                m.error.increment(1);
                m.refused(match e {
                    SubmitError::InvalidArgument(_) => "invalid_argument",
                    SubmitError::ResourceExhausted(_) => "resource_exhausted",
                    SubmitError::Unavailable(_) => "unavailable",
                    SubmitError::PermissionDenied(_) => "permission_denied",
                });
            }
        }
        result
    }

    async fn judge(&self, req: PaymentRequest, intent: Intent) -> Result<Decision, SubmitError> {
        if self.is_draining() {
            return Err(SubmitError::Unavailable("the daemon is shutting down".into()));
        }
        // Held until this submission is decided: its server's in-flight slot.
        let _permit = self.limits.admit(&req.api_server).map_err(SubmitError::ResourceExhausted)?;
        let rejected = |reason: Reason, message: String| Ok(Decision::Rejected { reason, message });

        let requirements = req.requirements;
        let admitted = match self.admission.admit_static(req.payment, &requirements) {
            Ok(a) => a,
            Err(e) => return rejected(e.reason(), e.to_string()),
        };

        let m = crate::telemetry::hot();
        m.verify_queue_depth.set(self.pool.queue_depth() as f64);
        let started = std::time::Instant::now();
        let verified = self.pool.verify(vec![admitted]).await;
        m.verify_seconds.record(started.elapsed().as_secs_f64());
        let Some((admitted, outcome)) = verified.iter().next() else {
            return Err(SubmitError::Unavailable("verification returned no verdict".into()));
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return rejected(Reason::InvalidSignature, e.to_string()),
            Err(PoolError::QueueFull) => {
                return Err(SubmitError::ResourceExhausted("verification queue is full".into()));
            }
            Err(PoolError::ShutDown) => {
                return Err(SubmitError::Unavailable("verification pool stopped".into()));
            }
            Err(e @ PoolError::Panicked) => return rejected(e.reason(), e.to_string()),
        }
        let signed = admitted.signed.clone();

        // The writer decides duplicates before it looks at the window or the balance. A
        // payment the ledger already holds is answered even when no balance can be read
        // (a retry while the RPC node is down), hence the ledger read on that path only.
        let window = self.admission.check_window(&signed.authorization);
        let key = AuthKey::of(&signed);
        let balance = if window.is_err() {
            U256::ZERO
        } else {
            match self.balances.get(key.payer()).await {
                Ok(balance) => balance,
                Err(e) => {
                    if self.ledger.ledger().get(&key).map_err(SubmitError::from_ledger)?.is_none() {
                        return Err(SubmitError::Unavailable(format!(
                            "cannot read the payer's balance: {e}"
                        )));
                    }
                    U256::ZERO
                }
            }
        };

        let payer = signed.authorization.from;
        let accept = AcceptRequest {
            signed,
            submission: Submission {
                network: requirements.network,
                max_timeout_seconds: requirements.max_timeout_seconds.unwrap_or(DEFAULT_MAX_TIMEOUT_SECS),
                idempotency_key: req.idempotency_key,
                resource: req.resource,
                api_server: req.api_server,
            },
            balance,
            window,
            now_ms: self.admission.clock().now_ms(),
        };
        match intent {
            Intent::Accept => match self.ledger.accept(accept).await.map_err(SubmitError::from_ledger)? {
                AcceptOutcome::Accepted(record) => Ok(Decision::Accepted { record, repeat: Repeat::New }),
                AcceptOutcome::Duplicate(record, repeat) => Ok(Decision::Accepted { record, repeat }),
                AcceptOutcome::Refused { reason, message } => rejected(reason, message),
            },
            Intent::Hold { hold_ms } => {
                match self
                    .ledger
                    .hold(HoldRequest { accept, hold_ms })
                    .await
                    .map_err(SubmitError::from_ledger)?
                {
                    HoldOutcome::Held { expires_at_ms } => Ok(Decision::Held { payer, expires_at_ms }),
                    HoldOutcome::Recorded(record, repeat) => Ok(Decision::Accepted { record, repeat }),
                    HoldOutcome::Refused { reason, message } => rejected(reason, message),
                }
            }
        }
    }
}
