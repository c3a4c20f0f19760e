//! `POST /settle`: the durable acceptance, then the answer the settle mode asks for.
//!
//! 1. The payment is decided like a gRPC submission and accepted (claiming its hold, if
//!    its `/verify` placed one). A payment already accepted for an earlier request is a
//!    replay and is refused (`invalid_exact_evm_nonce_already_used`) before the API's
//!    handler could serve it again, unless it carries the same `payment-identifier`
//!    (a retry: the same payment, the same answer) or this is the one retry of a
//!    `settlement_pending` answer.
//! 2. `accepted` mode answers at once: `success`, `transaction: ""`, and the payment's id
//!    and status URL in `extensions`.
//! 3. `included` and `confirmed` modes follow the payment in the ledger until its batch is
//!    included (or at the confirmation depth), then answer with the transaction's hash; an
//!    on-chain refusal answers `success: false` with the token's reason. Concurrent settles
//!    share batches: the planner decides when to cut, as for every payment.
//! 4. When the settle timeout passes first, a v2 caller gets `settlement_pending` with the
//!    transaction's hash (the payment id while no transaction carries it yet), and its
//!    client retries once; that retry waits again on the same payment. When a wait that
//!    has no retry left times out (v1 has none), or the daemon drains, the answer is final
//!    and matches what will happen to the money: a payment not yet in any transaction is
//!    withdrawn (failed, nothing charged: the client can pay again); one already in a
//!    signed transaction will almost surely settle, so it is answered `success` with that
//!    transaction's hash rather than refused and charged.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;

use super::wire::{self, SettleReply};
use super::{Facilitator, count, error_status, replayed, wire_status};
use crate::config::SettleMode;
use crate::ingest::{Decision, Intent};
use crate::ledger::{AuthKey, LedgerError, PaymentRecord, Repeat, Status, TransitionRequest};
use crate::x402::Reason;

/// Most payments remembered as answered `settlement_pending` at once; the oldest are
/// forgotten first (their retry is then refused as a replay, and their payment settles).
const MAX_PENDING_ANSWERS: usize = 100_000;

/// How a wait ended.
enum Waited {
    /// The payment reached the settle mode's state (or a final one).
    Reached(PaymentRecord),
    TimedOut,
    /// The daemon is draining: answer now.
    Draining,
}

/// What the reply says about a payment, beyond success: its id, status and where to
/// follow it.
fn extensions(record: &PaymentRecord) -> serde_json::Value {
    let id = record.payment_id().to_string();
    json!({ "x402-batcher": { "paymentId": id, "status": record.status.as_str(), "statusUrl": format!("/payments/{id}") } })
}

impl Facilitator {
    /// `POST /settle`.
    pub async fn settle(&self, api_server: String, body: &[u8]) -> (StatusCode, SettleReply) {
        let (status, reply) = self.settle_inner(api_server, body).await;
        let outcome = match (&reply.error_reason, reply.success) {
            (_, true) => "success",
            (Some(reason), false) => reason.as_str(),
            (None, false) => "failed",
        };
        count("settle", outcome);
        (status, reply)
    }

    async fn settle_inner(&self, api_server: String, body: &[u8]) -> (StatusCode, SettleReply) {
        let req = match wire::request(body) {
            Ok(req) => req,
            Err(e) => {
                return (
                    wire_status(&e),
                    SettleReply::failed(e.reason().code(), e.to_string(), String::new(), None),
                );
            }
        };
        let network = req.requirements.network.clone();
        let payer = req.payment.authorization.from;
        let version = req.x402_version;
        let failed = |reason: &str, message: String| {
            SettleReply::failed(reason, message, network.clone(), Some(payer))
        };
        let (record, repeat) =
            match self.ingest.decide(Self::payment_request(req, api_server), Intent::Accept).await {
                Ok(Decision::Accepted { record, repeat }) => (record, repeat),
                Ok(Decision::Rejected { reason, message }) => {
                    return (StatusCode::OK, failed(reason.code(), message));
                }
                Ok(Decision::Held { .. }) => {
                    let message = "an acceptance was answered with a hold".to_owned();
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        failed(Reason::UnexpectedSettleError.code(), message),
                    );
                }
                Err(e) => {
                    return (error_status(&e), failed(Reason::UnexpectedSettleError.code(), e.to_string()));
                }
            };
        let key = record.key();
        let answered_pending = self.pending.lock().remove(&key).is_some();
        if repeat == Repeat::Replay && !answered_pending {
            return (StatusCode::OK, failed(Reason::NonceAlreadyUsed.code(), replayed(&record)));
        }
        let mode = self.config.settle_mode;
        if mode == SettleMode::Accepted {
            return (StatusCode::OK, self.success(&record, String::new(), &network));
        }
        let started = Instant::now();
        let waited = self.wait(key, mode).await;
        metrics::histogram!("x402_batcher_facilitator_settle_wait_seconds", "mode" => mode.as_str())
            .record(started.elapsed().as_secs_f64());
        let reply = match waited {
            Waited::Reached(record) => self.answer(&record, &network),
            // A v2 client retries a `settlement_pending` once; v1 clients never do.
            Waited::TimedOut if version >= 2 && !answered_pending => {
                self.pending_answer(key, &record, &network)
            }
            Waited::TimedOut | Waited::Draining => self.resolve(key, &network).await,
        };
        (StatusCode::OK, reply)
    }

    /// Follows the payment until it reaches `mode`'s state, the timeout passes, or the
    /// daemon drains.
    async fn wait(&self, key: AuthKey, mode: SettleMode) -> Waited {
        let reached = move |r: &PaymentRecord| match mode {
            SettleMode::Included => matches!(r.status, Status::Included) || r.status.is_final(),
            SettleMode::Confirmed | SettleMode::Accepted => r.status.is_final(),
        };
        let mut follow = match self.ledger.follow(key) {
            Ok(follow) => follow,
            // Unreadable now: the final answer reads it again.
            Err(_) => return Waited::TimedOut,
        };
        let mut draining = self.draining.clone();
        let timeout = Duration::from_millis(self.config.settle_timeout_ms);
        tokio::select! {
            found = follow.until(reached) => found.map_or(Waited::TimedOut, Waited::Reached),
            _ = tokio::time::sleep(timeout) => Waited::TimedOut,
            _ = draining.wait_for(|d| *d) => Waited::Draining,
        }
    }

    /// The answer for a payment that reached its settle mode's state, or a final one.
    fn answer(&self, record: &PaymentRecord, network: &str) -> SettleReply {
        match record.status {
            Status::Failed | Status::Expired => {
                let mut reply = SettleReply::failed(
                    &record.failure_reason,
                    record.failure_message.clone(),
                    network.to_owned(),
                    Some(record.signed.authorization.from),
                );
                reply.extensions = Some(extensions(record));
                reply
            }
            _ => {
                let tx = self.transaction_of(record).map(|h| h.to_string()).unwrap_or_default();
                self.success(record, tx, network)
            }
        }
    }

    fn success(&self, record: &PaymentRecord, transaction: String, network: &str) -> SettleReply {
        SettleReply {
            success: true,
            error_reason: None,
            error_message: None,
            payer: Some(record.signed.authorization.from.to_checksum(None)),
            transaction,
            network: network.to_owned(),
            amount: Some(record.value().to_string()),
            extensions: Some(extensions(record)),
        }
    }

    /// `settlement_pending`, remembered so that the client's one retry waits again.
    fn pending_answer(&self, key: AuthKey, accepted: &PaymentRecord, network: &str) -> SettleReply {
        let record = self.ledger.ledger().get(&key).ok().flatten().unwrap_or_else(|| accepted.clone());
        let transaction = self
            .transaction_of(&record)
            .map(|h| h.to_string())
            .unwrap_or_else(|| record.payment_id().to_string());
        {
            let mut pending = self.pending.lock();
            if pending.len() >= MAX_PENDING_ANSWERS
                && let Some(oldest) = pending.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
            {
                pending.remove(&oldest);
            }
            pending.insert(key, Instant::now());
        }
        let mut reply = SettleReply::failed(
            "settlement_pending",
            format!(
                "payment {} is {} and not yet {} after {} ms; retry to keep waiting on the same payment",
                record.payment_id(),
                record.status.as_str(),
                self.config.settle_mode.as_str(),
                self.config.settle_timeout_ms
            ),
            network.to_owned(),
            Some(record.signed.authorization.from),
        );
        reply.transaction = transaction;
        reply.extensions = Some(extensions(&record));
        reply
    }

    /// The final answer when waiting is over: one that matches what happens to the money.
    async fn resolve(&self, key: AuthKey, network: &str) -> SettleReply {
        let ledger = &self.ledger;
        // Twice at most: a withdrawal can lose the race against the batch that takes it.
        for _ in 0..2 {
            let record = match ledger.ledger().get(&key) {
                Ok(Some(record)) => record,
                Ok(None) | Err(_) => break,
            };
            match record.status {
                Status::Accepted => {
                    let message = format!(
                        "not in any transaction after the settle timeout ({} ms: settlement paused, fees above \
                         the cap, or every settler busy); withdrawn: nothing was or will be charged for it",
                        self.config.settle_timeout_ms
                    );
                    let now_ms = self.clock.now_ms();
                    let mut withdraw = TransitionRequest::new(key, Status::Failed, now_ms);
                    withdraw.only_from = Some(Status::Accepted);
                    withdraw.failure = Some((Reason::UnexpectedSettleError, message));
                    match ledger.transition(withdraw).await {
                        Ok(withdrawn) => {
                            tracing::info!(payment = %withdrawn.payment_id(), "settle timed out before batching: withdrawn");
                            return self.answer(&withdrawn, network);
                        }
                        // Batched meanwhile: judge it again as it now stands.
                        Err(LedgerError::IllegalTransition { .. }) => continue,
                        Err(_) => break,
                    }
                }
                Status::Batched | Status::Submitted => {
                    tracing::warn!(
                        payment = %record.payment_id(),
                        status = record.status.as_str(),
                        "settle answered before inclusion: the payment is in a signed transaction"
                    );
                    let tx = self.transaction_of(&record).map(|h| h.to_string()).unwrap_or_default();
                    return self.success(&record, tx, network);
                }
                _ => return self.answer(&record, network),
            }
        }
        SettleReply::failed(
            Reason::UnexpectedSettleError.code(),
            "the payment's state cannot be read from the ledger".into(),
            network.to_owned(),
            None,
        )
    }
}
