//! What the ledger is asked to do, and what it answers: the commands the writer applies in
//! one decision order (accept, hold, transition, apply a settlement step), each with its
//! reply channel. Shared by every backend and the writer.

use alloy::primitives::{B256, U256};
use tokio::sync::oneshot;

use super::batch::BatchRecord;
use super::error::LedgerError;
use super::record::{AuthKey, PaymentRecord, Status, Submission};
use crate::x402::{Reason, SignedAuthorization};

/// Why a payment is refused: its x402 reason code and a message naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal { reason, message: message.into() }
    }
}

/// A verified payment to record.
#[derive(Debug, Clone)]
pub struct AcceptRequest {
    pub signed: SignedAuthorization,
    pub submission: Submission,
    /// The payer's on-chain balance as last read; must cover exposure plus this payment.
    pub balance: U256,
    /// The validity-window check, made by the caller against its clock. Judged by the
    /// writer so that a retry of an already recorded payment is answered as a duplicate
    /// even once its window has closed.
    pub window: Result<(), Refusal>,
    pub now_ms: u64,
}

/// How a submission relates to what the ledger holds for its authorization, and so
/// whether the API server may serve for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repeat {
    /// Recorded now: the first acceptance. Serve.
    New,
    /// Recorded before under the same, non-empty idempotency key (an x402
    /// `payment-identifier`): the same submission again, one payment. Serve the same
    /// answer again.
    Retry,
    /// Recorded before, and this submission does not carry the key it was recorded with
    /// (a resent header, a second API server): do not serve for it.
    Replay,
}

impl Repeat {
    /// Judges a resubmission of `existing` carrying `idempotency_key`.
    pub fn of(existing: &PaymentRecord, idempotency_key: &str) -> Repeat {
        if !idempotency_key.is_empty() && existing.submission.idempotency_key == idempotency_key {
            Repeat::Retry
        } else {
            Repeat::Replay
        }
    }
}

/// The ledger's answer to an [`AcceptRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// Newly recorded, durably.
    Accepted(PaymentRecord),
    /// Recorded before: the record as it stands now, and whether this submission is a
    /// [`Repeat::Retry`] or a [`Repeat::Replay`] of the one recorded.
    Duplicate(PaymentRecord, Repeat),
    /// Not recorded, for this reason.
    Refused { reason: Reason, message: String },
}

/// A verified payment to hold (see [`super::holds`]): the same checks as an acceptance,
/// then a reservation for `hold_ms` instead of a record.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub accept: AcceptRequest,
    pub hold_ms: u64,
}

/// The ledger's answer to a [`HoldRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Held (now, or already by a verification with the same idempotency key) until then
    /// (Unix ms).
    Held { expires_at_ms: u64 },
    /// Already recorded: the record, and how this verification relates to it.
    Recorded(PaymentRecord, Repeat),
    /// Neither held nor recorded, for this reason.
    Refused { reason: Reason, message: String },
}

/// On-chain evidence of a payment's inclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    pub tx_hash: B256,
    pub block_number: u64,
    pub block_hash: B256,
    pub block_time: u64,
    pub log_index: u64,
    /// The payment's share of the transaction's gas used and of its fee (wei).
    pub gas_share: u64,
    pub fee_share_wei: U256,
}

/// A lifecycle step for one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRequest {
    pub key: AuthKey,
    /// Apply only if the payment is still in this state (a decision made on an older read
    /// must not overtake a newer one).
    pub only_from: Option<Status>,
    pub to: Status,
    pub failure: Option<(Reason, String)>,
    pub batch_id: Option<String>,
    pub evidence: Option<Evidence>,
    /// Settled → settled: its block is final on chain (see [`super::LogEntry::Finalized`]).
    pub finalize: bool,
    pub now_ms: u64,
}

impl TransitionRequest {
    pub fn new(key: AuthKey, to: Status, now_ms: u64) -> Self {
        Self {
            key,
            only_from: None,
            to,
            failure: None,
            batch_id: None,
            evidence: None,
            finalize: false,
            now_ms,
        }
    }
}

/// A settlement step: transitions of payments and the batch record they belong to, written
/// in one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyRequest {
    pub transitions: Vec<TransitionRequest>,
    pub batch: Option<BatchRecord>,
    /// All transitions or none (the batch is written only with them).
    pub atomic: bool,
    /// Written only while this lease on the batch's settler account is held (fleet mode:
    /// a daemon that lost the account to another cannot write for it).
    pub fence: Option<Fence>,
}

/// A lease on a settler account, as held by one daemon: its owner and the epoch of its
/// holding (incremented whenever the account changes hands).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub chain_id: u64,
    pub settler: alloy::primitives::Address,
    pub owner: String,
    pub epoch: u64,
}

/// Each transition's result, in order.
pub type ApplyResults = Vec<Result<PaymentRecord, LedgerError>>;

/// A command with its reply channel.
#[derive(Debug)]
pub enum Command {
    Accept(AcceptRequest, oneshot::Sender<Result<AcceptOutcome, LedgerError>>),
    Hold(HoldRequest, oneshot::Sender<Result<HoldOutcome, LedgerError>>),
    Transition(TransitionRequest, oneshot::Sender<Result<PaymentRecord, LedgerError>>),
    Apply(ApplyRequest, oneshot::Sender<Result<ApplyResults, LedgerError>>),
}

impl Command {
    pub fn accept(req: AcceptRequest) -> (Command, oneshot::Receiver<Result<AcceptOutcome, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Accept(req, tx), rx)
    }

    pub fn hold(req: HoldRequest) -> (Command, oneshot::Receiver<Result<HoldOutcome, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Hold(req, tx), rx)
    }

    pub fn transition(
        req: TransitionRequest,
    ) -> (Command, oneshot::Receiver<Result<PaymentRecord, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Transition(req, tx), rx)
    }

    pub fn apply(req: ApplyRequest) -> (Command, oneshot::Receiver<Result<ApplyResults, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Apply(req, tx), rx)
    }

    /// Answers the command with what its group did.
    pub(super) fn reply(self, result: Result<Applied, LedgerError>) {
        // A dropped receiver (the client went away) changes nothing: the group is committed.
        match self {
            Command::Accept(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Accept(o) => o,
                    _ => unreachable!("an accept applies as an accept"),
                }));
            }
            Command::Hold(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Hold(o) => o,
                    _ => unreachable!("a hold applies as a hold"),
                }));
            }
            Command::Transition(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Transition(r) => r,
                    _ => unreachable!("a transition applies as a transition"),
                }));
            }
            Command::Apply(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Apply(r) => r,
                    _ => unreachable!("an apply applies as an apply"),
                }));
            }
        }
    }
}

/// What a command did.
#[derive(Debug, Clone)]
pub enum Applied {
    Accept(AcceptOutcome),
    Hold(HoldOutcome),
    Transition(PaymentRecord),
    Apply(Vec<Result<PaymentRecord, LedgerError>>),
}

impl Applied {
    /// Calls `f` on every record the answer carries.
    pub fn for_each_record(&mut self, mut f: impl FnMut(&mut PaymentRecord)) {
        match self {
            Applied::Accept(AcceptOutcome::Accepted(r) | AcceptOutcome::Duplicate(r, _))
            | Applied::Hold(HoldOutcome::Recorded(r, _))
            | Applied::Transition(r) => f(r),
            Applied::Apply(results) => results.iter_mut().flatten().for_each(f),
            Applied::Accept(AcceptOutcome::Refused { .. })
            | Applied::Hold(HoldOutcome::Held { .. } | HoldOutcome::Refused { .. }) => {}
        }
    }
}
