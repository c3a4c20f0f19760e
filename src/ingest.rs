//! The decision path for one submitted payment, shared by both surfaces (gRPC `Submit`,
//! the HTTP facilitator's `/verify` and `/settle`); each surface turns decisions into its
//! own replies (`server`, `facilitator`).
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
use crate::balance::BalanceCache;
use crate::config::DEFAULT_MAX_TIMEOUT_SECS;
use crate::ledger::{
    AcceptOutcome, AcceptRequest, AuthKey, HoldOutcome, HoldRequest, LedgerError, LedgerHandle,
    PaymentRecord, Refusal, Repeat, Submission,
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
    fn from_ledger(e: LedgerError) -> SubmitError {
        match e {
            LedgerError::QueueFull => SubmitError::ResourceExhausted("ledger write queue is full".into()),
            other => SubmitError::Unavailable(format!("ledger: {other}")),
        }
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

    /// Decides one payment with `intent`, and counts its outcome.
    pub async fn decide(&self, request: PaymentRequest, intent: Intent) -> Result<Decision, SubmitError> {
        let result = self.judge(request, intent).await;
        self.counted(result)
    }

    /// Counts a decision (or a request refused before one, by the surface that received
    /// it) in the submission metrics, and returns it.
    pub fn counted(&self, result: Result<Decision, SubmitError>) -> Result<Decision, SubmitError> {
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
        let window = self
            .admission
            .check_window(&signed.authorization)
            .map_err(|e| Refusal::new(e.reason(), e.to_string()));
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
