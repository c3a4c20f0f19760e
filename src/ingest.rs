//! The decision path for one submitted payment, shared by both surfaces (gRPC `Submit`,
//! the HTTP facilitator's `/verify` and `/settle`); each surface turns decisions into its
//! own replies (`server`, `facilitator`).
//!
//! ```text
//! PaymentRequest ─▶ admission (static) ─▶ verify pool ─▶ window ─▶ balance and code ─▶ ledger writer ─▶ decision
//!                                        (ECDSA)                   (a payer with code:     (accept, or hold)
//!                                                                   ERC-1271 on chain)
//! ```
//!
//! The payer's code decides how its signature is judged, as the token will judge it
//! ([`crate::payer`]): no code, the verify pool's ECDSA verdict; code (a contract wallet, an
//! EIP-7702 account), an ERC-1271 check on chain, whatever ECDSA says.
//!
//! Business refusals (bad signature, mismatch, expired, insufficient funds, nonce reuse)
//! are normal decisions with the official x402 reason code. System conditions are
//! [`SubmitError`]s: INVALID_ARGUMENT for a malformed request, RESOURCE_EXHAUSTED when a
//! bounded queue is full, UNAVAILABLE while draining or when a balance or the ledger cannot
//! be read or written. Nothing is recorded unless the decision is an acceptance.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use alloy::primitives::{Address, U256};

use crate::admission::{Admission, Admitted, PaymentInput};
use crate::balance::BalanceCache;
use crate::config::DEFAULT_MAX_TIMEOUT_SECS;
use crate::ledger::{
    AcceptOutcome, AcceptRequest, AuthKey, HoldOutcome, HoldRequest, LedgerError, LedgerHandle,
    PaymentRecord, Refusal, Repeat, Submission,
};
use crate::limits::Limits;
use crate::payer::{ChainVerdict, PayerCode, Route, SignatureJudge};
use crate::verify::{PoolError, VerifyPool};
use crate::x402::eip712::signing_hash;
use crate::x402::{PaymentRequirements, RawSignature, Reason, SignedAuthorization};

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
    signatures: Arc<dyn SignatureJudge>,
    /// Per chain, the ERC-6492 factories a wallet not deployed yet may name.
    factories: HashMap<u64, HashSet<Address>>,
    limits: Limits,
    draining: AtomicBool,
}

impl Ingest {
    pub fn new(
        admission: Admission,
        pool: Arc<VerifyPool>,
        ledger: LedgerHandle,
        balances: BalanceCache,
        signatures: Arc<dyn SignatureJudge>,
        limits: Limits,
    ) -> Self {
        Self {
            admission,
            pool,
            ledger,
            balances,
            signatures,
            factories: HashMap::new(),
            limits,
            draining: AtomicBool::new(false),
        }
    }

    /// Trusts these ERC-6492 factories on these chains (none by default).
    pub fn with_erc6492_factories(mut self, factories: HashMap<u64, HashSet<Address>>) -> Self {
        self.factories = factories;
        self
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
        let ecdsa = match outcome {
            Ok(verdict) => verdict,
            Err(PoolError::QueueFull) => {
                return Err(SubmitError::ResourceExhausted("verification queue is full".into()));
            }
            Err(PoolError::ShutDown) => {
                return Err(SubmitError::Unavailable("verification pool stopped".into()));
            }
            Err(e @ PoolError::Panicked) => return rejected(e.reason(), e.to_string()),
        };
        let mut signed = admitted.signed.clone();

        // The writer decides duplicates before it looks at the window or the balance. A
        // payment the ledger already holds is answered even when no balance can be read
        // (a retry while the RPC node is down), hence the ledger read on that path only.
        // The payer's code comes with its balance; it is needed to judge a signature ECDSA
        // refused (a contract wallet's) and to accept one it passed (an EIP-7702 account's
        // is judged by its delegate), not for a payment refused by its window anyway.
        let window = self
            .admission
            .check_window(&signed.authorization)
            .map_err(|e| Refusal::new(e.reason(), e.to_string()));
        let (balance, route) = match self.payer(admitted, ecdsa, &mut signed, window.is_err()).await? {
            Ok(read) => read,
            Err(refusal) => return rejected(Reason::InvalidSignature, refusal),
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
                route,
            },
            balance,
            window,
            now_ms: self.admission.clock().now_ms(),
        };
        self.record(accept, intent, payer).await
    }

    /// The payer's balance and how its signature is judged (its [`Route`]), with the
    /// signature judged by that route: `Ok(Err(why))` refused. A payment whose window is
    /// already refused (`window_refused`) and whose ECDSA signature is valid needs neither.
    /// While no balance can be read, a payment the ledger already holds is still answered
    /// (a retry while the RPC node is down); a new one is `Unavailable`. A deployed wallet's
    /// ERC-6492 wrapper is taken off `signed`.
    async fn payer(
        &self,
        admitted: &Admitted,
        ecdsa: Result<(), crate::verify::SignatureError>,
        signed: &mut SignedAuthorization,
        window_refused: bool,
    ) -> Result<Result<(U256, Route), String>, SubmitError> {
        let m = crate::telemetry::hot();
        let key = AuthKey::of(signed);
        if window_refused && ecdsa.is_ok() {
            return Ok(Ok((U256::ZERO, Route::Eoa)));
        }
        let started = std::time::Instant::now();
        let (read, cached) = self.balances.get_noting_cache(key.payer()).await;
        match read {
            Ok(state) => {
                // A token that checks ECDSA only judges every payer so, code or not.
                let route = if admitted.contract_signatures {
                    Route::of(state.code, signed.signature.erc6492().is_some())
                } else {
                    Route::Eoa
                };
                if let Err(refusal) = self.judge_signature(admitted, ecdsa, state.code, route).await? {
                    return Ok(Err(refusal));
                }
                // A deployed wallet's 6492 wrapper is kept unwrapped: the ledger holds a
                // wrapper only for a wallet its settlement deploys (allow-listed).
                if route != Route::Erc6492
                    && signed.signature.erc6492().is_some()
                    && let Some(inner) = RawSignature::new(signed.signature.for_token())
                {
                    signed.signature = inner;
                }
                // Same order as telemetry::PAYER_CHECK_ROUTES.
                let how = match route {
                    Route::Eoa if cached => 0,
                    Route::Eoa => 1,
                    Route::Erc1271 => 2,
                    Route::Eip7702 => 3,
                    Route::Erc6492 => 4,
                };
                m.payer_check_seconds[how].record(started.elapsed().as_secs_f64());
                Ok(Ok((state.balance, route)))
            }
            Err(e) => {
                if self.ledger.ledger().get(&key).map_err(SubmitError::from_ledger)?.is_none() {
                    return Err(SubmitError::Unavailable(format!(
                        "cannot read the payer's balance and code: {e}"
                    )));
                }
                Ok(Ok((U256::ZERO, Route::Eoa)))
            }
        }
    }

    /// Records the decided payment: accepted (claiming its hold, if any) or held.
    async fn record(
        &self,
        accept: AcceptRequest,
        intent: Intent,
        payer: Address,
    ) -> Result<Decision, SubmitError> {
        let rejected = |reason: Reason, message: String| Ok(Decision::Rejected { reason, message });
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

    /// Judges `admitted`'s signature as the token will, given its payer's `code`: `Ok(Ok)`
    /// valid, `Ok(Err(why))` refused (the message names the route), `Err` not judged (the
    /// node did not answer: retryable, never an acceptance).
    async fn judge_signature(
        &self,
        admitted: &Admitted,
        ecdsa: Result<(), crate::verify::SignatureError>,
        code: PayerCode,
        route: Route,
    ) -> Result<Result<(), String>, SubmitError> {
        let signed = &admitted.signed;
        let from = signed.authorization.from;
        let wrapper = signed.signature.erc6492();
        if let (Some(Err(e)), true) = (&wrapper, route != Route::Eoa) {
            return Ok(Err(format!(
                "the signature ends in the ERC-6492 suffix but is not a valid wrapper: {e}"
            )));
        }
        match route {
            Route::Eoa if code.has_code() => {
                return Ok(ecdsa.map_err(|e| {
                    format!(
                        "{e} (token {} checks signatures by ECDSA only: contract_signatures = false)",
                        signed.token
                    )
                }));
            }
            Route::Eoa => return Ok(ecdsa.map_err(|e| format!("{e} (payer {from} has no code: ECDSA)"))),
            Route::Erc6492 => {
                let factory = wrapper.and_then(Result::ok).map(|w| w.factory).unwrap_or_default();
                if !self.factories.get(&signed.chain_id).is_some_and(|f| f.contains(&factory)) {
                    return Ok(Err(format!(
                        "payer {from} has no code and signed with an ERC-6492 wrapper naming factory \
                         {factory}, which is not on chain {}'s allow-list (erc6492_factories)",
                        signed.chain_id
                    )));
                }
            }
            Route::Erc1271 | Route::Eip7702 => {}
        }
        let digest = signing_hash(admitted.domain_separator, &signed.authorization);
        let item = [(from, digest, signed.signature.bytes().clone())];
        let verdicts = self.signatures.judge(signed.chain_id, &item).await.map_err(|e| {
            SubmitError::Unavailable(format!("cannot check the payer's ERC-1271 signature: {e}"))
        })?;
        let shape = match code {
            PayerCode::Delegated(delegate) => format!("has code (EIP-7702 account delegated to {delegate})"),
            PayerCode::Contract => "has code (contract)".to_owned(),
            PayerCode::None => "is deployed by its ERC-6492 factory call".to_owned(),
        };
        Ok(match verdicts.first() {
            Some(ChainVerdict::Valid) => Ok(()),
            Some(ChainVerdict::NotDeployed) => {
                Err(format!("payer {from} has no code and its ERC-6492 factory call does not deploy it"))
            }
            Some(verdict) => Err(format!(
                "payer {from} {shape}, so the token asks it by ERC-1271 isValidSignature, \
                 and it refused this signature ({verdict:?}){}",
                if ecdsa.is_ok() {
                    "; that the signature recovers to the payer by ECDSA does not count"
                } else {
                    ""
                }
            )),
            None => Err("the signature check returned no verdict".to_owned()),
        })
    }
}
