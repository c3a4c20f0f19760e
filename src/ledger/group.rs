//! One group of commands applied against a ledger backend: every rule of the ledger (the
//! double-spend guard, idempotency keys, the payer's cover with its holds, the lifecycle's
//! edges, the settlement log) decided in the writer's order, its writes staged in the
//! backend's [`Stage`] (a RocksDB `WriteBatch` committed with one fsync, or one PostgreSQL
//! transaction). The rules live here once, so every backend decides them the same way.

use std::collections::HashMap;

use alloy::primitives::U256;

use super::batch::BatchRecord;
use super::command::{
    AcceptOutcome, AcceptRequest, Applied, ApplyRequest, Command, Fence, HoldOutcome, HoldRequest, Repeat,
    TransitionRequest,
};
use super::error::LedgerError;
use super::holds::{Hold, Holds};
use super::record::{AuthKey, LogEntry, PayerKey, PaymentRecord, Status};
use crate::x402::Reason;

/// What a group needs from its backend: reads of the committed state, and somewhere to
/// stage its writes until the backend commits them all at once.
pub(super) trait Stage {
    /// The committed record under `key`.
    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError>;
    /// The payer's committed exposure.
    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError>;
    /// The payment a committed idempotency key names.
    fn idem(&self, idem: &str) -> Result<Option<AuthKey>, LedgerError>;
    /// The committed batch `counter` of `chain_id`.
    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError>;
    /// Whether the lease `fence` names is still held by its owner at its epoch.
    fn holds_lease(&self, fence: &Fence) -> Result<bool, LedgerError>;
    /// `record` under its key and under its sequence number (the change feed).
    fn put_record(&mut self, record: &PaymentRecord);
    /// The payment-id index of a new record.
    fn put_id(&mut self, key: &AuthKey);
    fn put_idem(&mut self, idem: &str, key: &AuthKey);
    /// The payer's exposure (zero: none).
    fn put_exposure(&mut self, payer: &PayerKey, value: U256);
    /// Whether the payment is not yet final.
    fn set_pending(&mut self, key: &AuthKey, pending: bool);
    /// Whether the settled payment is watched until its block is final.
    fn set_watched(&mut self, key: &AuthKey, watched: bool);
    /// A settlement log entry under `seq`.
    fn put_settlement(&mut self, seq: u64, record: &PaymentRecord);
    fn put_batch(&mut self, batch: &BatchRecord);
}

/// What a group decided, for its backend to commit.
pub(super) struct Decided<S> {
    pub stage: S,
    /// Every record the group wrote, as it stands after the group.
    pub records: Vec<PaymentRecord>,
    /// The newest sequence number and settlement log number once committed.
    pub last_seq: u64,
    pub last_settlement: u64,
    /// Change of the pending count.
    pub pending_delta: i64,
}

/// One group of commands: the store plus this group's uncommitted writes, so later
/// commands in the group see earlier ones (two submissions of one nonce in one group
/// conflict exactly as in two groups).
pub(super) struct Group<'a, S: Stage> {
    stage: S,
    holds: &'a mut Holds,
    records: HashMap<AuthKey, PaymentRecord>,
    /// Batches this group wrote, by chain id and counter.
    batches: HashMap<(u64, u64), BatchRecord>,
    exposures: HashMap<PayerKey, U256>,
    idem: HashMap<String, AuthKey>,
    next_seq: u64,
    /// Change of the pending count this group makes.
    pending_delta: i64,
    next_settlement: u64,
}

impl<'a, S: Stage> Group<'a, S> {
    /// A group over `stage` whose first change gets sequence number `last_seq + 1` and
    /// whose first settlement log entry `last_settlement + 1`.
    pub(super) fn new(stage: S, holds: &'a mut Holds, last_seq: u64, last_settlement: u64) -> Self {
        Self {
            stage,
            holds,
            records: HashMap::new(),
            batches: HashMap::new(),
            exposures: HashMap::new(),
            idem: HashMap::new(),
            next_seq: last_seq + 1,
            pending_delta: 0,
            next_settlement: last_settlement + 1,
        }
    }

    fn record(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        match self.records.get(key) {
            Some(r) => Ok(Some(r.clone())),
            None => self.stage.get(key),
        }
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        match self.exposures.get(payer) {
            Some(e) => Ok(*e),
            None => self.stage.exposure(payer),
        }
    }

    fn idem_key(&self, k: &str) -> Result<Option<AuthKey>, LedgerError> {
        match self.idem.get(k) {
            Some(key) => Ok(Some(*key)),
            None => self.stage.idem(k),
        }
    }

    pub(super) fn apply(&mut self, command: &Command) -> Result<Applied, LedgerError> {
        match command {
            Command::Accept(req, _) => self.accept(req).map(Applied::Accept),
            Command::Hold(req, _) => self.hold(req).map(Applied::Hold),
            Command::Transition(req, _) => self.transition(req).map(Applied::Transition),
            Command::Apply(req, _) => self.apply_request(req).map(Applied::Apply),
        }
    }

    /// A settlement step: payment transitions and the batch record they belong to. When
    /// `atomic`, either every transition is legal and all apply with the batch, or nothing
    /// does and the first refusal is the answer.
    fn apply_request(
        &mut self,
        req: &ApplyRequest,
    ) -> Result<Vec<Result<PaymentRecord, LedgerError>>, LedgerError> {
        // For a settler account: only by the daemon holding its lease, at its epoch.
        if let Some(f) = &req.fence
            && !self.stage.holds_lease(f)?
        {
            return Err(LedgerError::LeaseLost {
                chain_id: f.chain_id,
                settler: f.settler,
                owner: f.owner.clone(),
                epoch: f.epoch,
            });
        }
        // A batch is one batch: its number, once taken, names the same settler and items
        // (two daemons cutting batches at once may pick the same next number).
        if let Some(batch) = &req.batch {
            let key = (batch.chain_id, batch.counter);
            let stored = match self.batches.get(&key) {
                Some(b) => Some(b.clone()),
                None => self.stage.batch(batch.chain_id, batch.counter)?,
            };
            if let Some(stored) = stored
                && (stored.settler != batch.settler
                    || stored.items != batch.items
                    || stored.created_at_ms != batch.created_at_ms)
            {
                return Err(LedgerError::BatchTaken { chain_id: batch.chain_id, counter: batch.counter });
            }
        }
        if req.atomic {
            let mut seen = std::collections::HashSet::new();
            for t in &req.transitions {
                if !seen.insert(t.key) {
                    return Err(LedgerError::IllegalTransition {
                        id: t.key.payment_id(),
                        from: t.to,
                        to: t.to,
                    });
                }
                self.check_transition(t)?;
            }
        }
        let results = req.transitions.iter().map(|t| self.transition(t)).collect();
        if let Some(batch) = &req.batch {
            self.stage.put_batch(batch);
            self.batches.insert((batch.chain_id, batch.counter), batch.clone());
        }
        Ok(results)
    }

    fn check_transition(&self, req: &TransitionRequest) -> Result<PaymentRecord, LedgerError> {
        let record = self.record(&req.key)?.ok_or(LedgerError::NotFound(req.key.payment_id()))?;
        // Out of settled only as decided on a settled read (a reorg's correction or
        // reversal, or finality), and finality only of a settled payment.
        let from_settled = record.status == Status::Settled;
        if !record.can_move_to(req.to)
            || req.only_from.is_some_and(|s| s != record.status)
            || (from_settled && req.only_from != Some(Status::Settled))
            || (req.finalize && !(from_settled && req.to == Status::Settled))
            || (from_settled && req.to == Status::Settled && !req.finalize && req.evidence.is_none())
        {
            return Err(LedgerError::IllegalTransition {
                id: req.key.payment_id(),
                from: record.status,
                to: req.to,
            });
        }
        Ok(record)
    }

    /// What every acceptance and hold checks first, in this order: the idempotency key, a
    /// record of the authorization, a hold on it. `Err` is the answer; `Ok` carries the live
    /// hold on the key, if any, for the caller to judge.
    fn precheck(&mut self, req: &AcceptRequest) -> Result<Result<Option<Hold>, Prechecked>, LedgerError> {
        self.holds.lapse(req.now_ms);
        let key = AuthKey::of(&req.signed);
        let idem = &req.submission.idempotency_key;
        if !idem.is_empty()
            && let Some(named) = self.idem_key(idem)?
            && named != key
        {
            return Ok(Err(Prechecked::Refused {
                reason: Reason::InvalidPayload,
                message: format!("idempotency key {idem:?} already names payment {}", named.payment_id()),
            }));
        }
        if let Some(existing) = self.record(&key)? {
            // The same transfer again (a retry, a replay, a second API server) is the same
            // payment, whatever signature bytes carry it; a different transfer under a used
            // nonce is a double spend.
            let (a, b) = (&existing.signed.authorization, &req.signed.authorization);
            return Ok(Err(if a == b {
                let repeat = Repeat::of(&existing, idem);
                Prechecked::Recorded(existing, repeat)
            } else {
                Prechecked::Refused {
                    reason: Reason::NonceAlreadyUsed,
                    message: format!(
                        "nonce {} of {} is already used by payment {}",
                        b.nonce,
                        b.from,
                        existing.payment_id()
                    ),
                }
            }));
        }
        Ok(Ok(self.holds.get(&key, req.now_ms).cloned()))
    }

    /// The window, then the payer's cover: what is pending, what is held, and this
    /// payment. `Ok` with the payer's exposure once this payment is recorded.
    fn cover(&mut self, req: &AcceptRequest) -> Result<Result<U256, (Reason, String)>, LedgerError> {
        if let Err(refusal) = &req.window {
            return Ok(Err((refusal.reason, refusal.message.clone())));
        }
        let payer = AuthKey::of(&req.signed).payer();
        let exposure = self.exposure(&payer)?;
        let held = self.holds.held(&payer);
        let value = req.signed.authorization.value;
        let needed = exposure.saturating_add(value);
        if needed.saturating_add(held) > req.balance {
            let held =
                if held.is_zero() { String::new() } else { format!(", {held} held for verified payments") };
            return Ok(Err((
                Reason::InsufficientFunds,
                format!(
                    "balance {} of {} does not cover {} already pending{held} plus {}",
                    req.balance, req.signed.authorization.from, exposure, value
                ),
            )));
        }
        Ok(Ok(needed))
    }

    /// Holds a verified payment: refused or answered like an acceptance, but nothing is
    /// written; the payment is reserved until it is claimed or lapses.
    fn hold(&mut self, req: &HoldRequest) -> Result<HoldOutcome, LedgerError> {
        let accept = &req.accept;
        let key = AuthKey::of(&accept.signed);
        let live = match self.precheck(accept)? {
            Err(Prechecked::Recorded(record, repeat)) => return Ok(HoldOutcome::Recorded(record, repeat)),
            Err(Prechecked::Refused { reason, message }) => {
                return Ok(HoldOutcome::Refused { reason, message });
            }
            Ok(live) => live,
        };
        if let Some(hold) = live {
            let idem = &accept.submission.idempotency_key;
            // The same verification again, named by its payment-identifier: the first answer.
            if hold.authorization == accept.signed.authorization
                && !idem.is_empty()
                && hold.idempotency_key == *idem
            {
                return Ok(HoldOutcome::Held { expires_at_ms: hold.expires_at_ms });
            }
            return Ok(HoldOutcome::Refused {
                reason: Reason::NonceAlreadyUsed,
                message: format!(
                    "nonce {} of {} is held by a verification in progress (payment {}): a payment is \
                     verified once",
                    accept.signed.authorization.nonce,
                    accept.signed.authorization.from,
                    key.payment_id()
                ),
            });
        }
        if let Err((reason, message)) = self.cover(accept)? {
            return Ok(HoldOutcome::Refused { reason, message });
        }
        let expires_at_ms = accept.now_ms.saturating_add(req.hold_ms);
        self.holds.insert(
            key,
            Hold {
                authorization: accept.signed.authorization.clone(),
                idempotency_key: accept.submission.idempotency_key.clone(),
                expires_at_ms,
            },
        );
        Ok(HoldOutcome::Held { expires_at_ms })
    }

    fn accept(&mut self, req: &AcceptRequest) -> Result<AcceptOutcome, LedgerError> {
        let key = AuthKey::of(&req.signed);
        let live = match self.precheck(req)? {
            Err(Prechecked::Recorded(record, repeat)) => return Ok(AcceptOutcome::Duplicate(record, repeat)),
            Err(Prechecked::Refused { reason, message }) => {
                return Ok(AcceptOutcome::Refused { reason, message });
            }
            Ok(live) => live,
        };
        if let Some(hold) = live {
            if hold.authorization != req.signed.authorization {
                return Ok(AcceptOutcome::Refused {
                    reason: Reason::NonceAlreadyUsed,
                    message: format!(
                        "nonce {} of {} is held by a verification of another authorization",
                        req.signed.authorization.nonce, req.signed.authorization.from
                    ),
                });
            }
            // The acceptance claims the hold: its value moves from held to pending below
            // (or, refused, is released: a claim is made once).
            self.holds.remove(&key);
        }
        let needed = match self.cover(req)? {
            Ok(needed) => needed,
            Err((reason, message)) => return Ok(AcceptOutcome::Refused { reason, message }),
        };
        let payer = key.payer();

        let record = PaymentRecord {
            status: Status::Accepted,
            signed: req.signed.clone(),
            submission: req.submission.clone(),
            accepted_at_ms: req.now_ms,
            updated_at_ms: req.now_ms,
            seq: 0,
            failure_reason: String::new(),
            failure_message: String::new(),
            batch_id: String::new(),
            tx_hash: None,
            block_number: 0,
            block_hash: None,
            block_time: 0,
            log_index: 0,
            gas_share: 0,
            fee_share_wei: U256::ZERO,
            finalized_at_ms: 0,
            log_entry: LogEntry::Outcome,
            change_entry: None,
        };
        let record = self.write(record);
        self.stage.put_id(&key);
        if !req.submission.idempotency_key.is_empty() {
            self.stage.put_idem(&req.submission.idempotency_key, &key);
            self.idem.insert(req.submission.idempotency_key.clone(), key);
        }
        self.set_exposure(payer, needed);
        self.stage.set_pending(&key, true);
        self.pending_delta += 1;
        Ok(AcceptOutcome::Accepted(record))
    }

    fn transition(&mut self, req: &TransitionRequest) -> Result<PaymentRecord, LedgerError> {
        let mut record = self.check_transition(req)?;
        let payer = req.key.payer();
        let from_settled = record.status == Status::Settled;
        if from_settled {
            // A settled payment moves on only after a reorg, or when its block is final:
            // either way it is watched no more; a reversal logs the settlement it undoes.
            self.stage.set_watched(&req.key, false);
            if req.to != Status::Settled {
                let mut reversed = record.clone();
                reversed.log_entry = LogEntry::Reversed;
                reversed.change_entry = Some(LogEntry::Reversed);
                reversed.updated_at_ms = req.now_ms;
                self.log(&reversed);
                record.log_entry = LogEntry::Reversed;
                // Pending again: the payer owes it until it settles anew.
                let exposure = self.exposure(&payer)?;
                self.set_exposure(payer, exposure.saturating_add(record.value()));
                self.stage.set_pending(&req.key, true);
                self.pending_delta += 1;
            }
        }
        if req.to.is_final() && !(from_settled && req.to == Status::Settled) {
            let exposure = self.exposure(&payer)?;
            self.set_exposure(payer, exposure.saturating_sub(record.value()));
            self.stage.set_pending(&req.key, false);
            self.pending_delta -= 1;
        }
        record.status = req.to;
        record.updated_at_ms = req.now_ms;
        if let Some((reason, message)) = &req.failure {
            record.failure_reason = reason.code().to_owned();
            record.failure_message = message.clone();
        }
        if let Some(batch_id) = &req.batch_id {
            record.batch_id = batch_id.clone();
        }
        if req.to == Status::Accepted {
            // Back to accepted: in no transaction any more (a later one brings its own
            // evidence; a stale one would count this payment in a fee it has no share of).
            (record.tx_hash, record.block_hash) = (None, None);
            (record.block_number, record.block_time, record.log_index) = (0, 0, 0);
            (record.gas_share, record.fee_share_wei) = (0, U256::ZERO);
        }
        if let Some(ev) = &req.evidence {
            record.tx_hash = Some(ev.tx_hash);
            record.block_number = ev.block_number;
            record.block_hash = Some(ev.block_hash);
            record.block_time = ev.block_time;
            record.log_index = ev.log_index;
            record.gas_share = ev.gas_share;
            record.fee_share_wei = ev.fee_share_wei;
        }
        // What the settlement log says of this step: an outcome (settled, failed, expired),
        // a corrected settlement, a settlement's finality; nothing for the steps between.
        let entry = match (from_settled, req.to) {
            (true, Status::Settled) if req.finalize => Some(LogEntry::Finalized),
            (true, Status::Settled) => Some(LogEntry::Corrected),
            (_, to) if to.is_final() => Some(LogEntry::Outcome),
            _ => None,
        };
        if req.finalize {
            record.finalized_at_ms = req.now_ms;
        }
        if let Some(entry) = entry {
            record.log_entry = entry;
        }
        // What this change is to a change feed consumer: the entry it logged, the reversal
        // (logged above), or nothing.
        let reversal = from_settled && req.to != Status::Settled;
        record.change_entry = if reversal { Some(LogEntry::Reversed) } else { entry };
        let record = self.write(record);
        if let Some(entry) = entry {
            self.log(&record);
            if record.status == Status::Settled && entry != LogEntry::Finalized {
                // Watched until its block is final on chain (a reorg may still move it).
                self.stage.set_watched(&req.key, true);
            }
        }
        Ok(record)
    }

    /// Appends `record` to the settlement log.
    fn log(&mut self, record: &PaymentRecord) {
        self.stage.put_settlement(self.next_settlement, record);
        self.next_settlement += 1;
    }

    /// Stamps the next sequence number on `record` and writes it under its key and its seq.
    fn write(&mut self, mut record: PaymentRecord) -> PaymentRecord {
        record.seq = self.next_seq;
        self.next_seq += 1;
        self.stage.put_record(&record);
        self.records.insert(record.key(), record.clone());
        record
    }

    fn set_exposure(&mut self, payer: PayerKey, value: U256) {
        self.stage.put_exposure(&payer, value);
        self.exposures.insert(payer, value);
    }

    /// What the group decided, for the backend to commit.
    pub(super) fn decided(self) -> Decided<S> {
        Decided {
            stage: self.stage,
            records: self.records.into_values().collect(),
            last_seq: self.next_seq - 1,
            last_settlement: self.next_settlement - 1,
            pending_delta: self.pending_delta,
        }
    }
}

/// An answer the checks shared by acceptances and holds reached early.
enum Prechecked {
    Recorded(PaymentRecord, Repeat),
    Refused { reason: Reason, message: String },
}
