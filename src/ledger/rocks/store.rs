//! The RocksDB ledger behind the seam: [`LedgerStore`] for [`RocksLedger`], its reads from
//! [`super::read`] and its writes through [`crate::ledger::group`], staged in one
//! `WriteBatch` that commits with one fsync.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use alloy::primitives::U256;
use rocksdb::WriteBatch;

use super::{
    CF_AUTH, CF_BATCH, CF_EXPOSURE, CF_ID, CF_IDEM, CF_PENDING, CF_SEQ, CF_SETTLEMENT, CF_WATCH, RocksLedger,
    db_err, synced_write_options,
};
use crate::ledger::batch::BatchRecord;
use crate::ledger::command::{Command, Fence};
use crate::ledger::error::LedgerError;
use crate::ledger::group::{Decided, Group, Stage};
use crate::ledger::record::{AuthKey, CorruptRecord, PayerKey, PaymentId, PaymentRecord};
use crate::ledger::store::{Fleet, GroupOutcome, LedgerStore};

impl LedgerStore for RocksLedger {
    fn location(&self) -> String {
        self.path().display().to_string()
    }

    fn fleet(&self) -> Option<&dyn Fleet> {
        // One daemon's ledger: nothing to share.
        None
    }

    fn last_seq(&self) -> u64 {
        RocksLedger::last_seq(self)
    }

    fn pending(&self) -> u64 {
        RocksLedger::pending(self)
    }

    fn holds(&self) -> usize {
        RocksLedger::holds(self)
    }

    fn last_settlement(&self) -> u64 {
        RocksLedger::last_settlement(self)
    }

    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        RocksLedger::get(self, key)
    }

    fn get_by_id(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, LedgerError> {
        RocksLedger::get_by_id(self, id)
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        RocksLedger::exposure(self, payer)
    }

    fn exposures(&self) -> Result<Vec<(PayerKey, U256)>, LedgerError> {
        RocksLedger::exposures(self)
    }

    fn pending_records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        RocksLedger::pending_records(self)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<PaymentRecord>, LedgerError> {
        RocksLedger::events_after(self, after, limit)
    }

    fn settlement_log(&self, after: u64, limit: usize) -> Result<Vec<(u64, PaymentRecord)>, LedgerError> {
        RocksLedger::settlement_log(self, after, limit)
    }

    fn watched(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        RocksLedger::watched(self)
    }

    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        RocksLedger::batch(self, chain_id, counter)
    }

    fn batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
        RocksLedger::batches(self, chain_id)
    }

    fn last_batch_counter(&self, chain_id: u64) -> Result<u64, LedgerError> {
        RocksLedger::last_batch_counter(self, chain_id)
    }

    fn records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        RocksLedger::records(self)
    }

    fn apply_group(&self, commands: &[Command]) -> GroupOutcome {
        // A failed commit stops the writer (the storage refuses writes from then on), so
        // the in-memory holds this group changed need no undoing.
        let mut holds = self.holds.lock();
        let stage = RocksStage { ledger: self, batch: WriteBatch::default() };
        let before = self.last_seq();
        let mut group = Group::new(stage, &mut holds, before, self.last_settlement());
        let results: Vec<_> = commands.iter().map(|c| group.apply(c)).collect();
        match self.commit(group.decided()) {
            Ok(changed) => {
                let after = self.last_seq();
                GroupOutcome { results, changed, seqs: (after > before).then_some((before + 1, after)) }
            }
            Err(e) => GroupOutcome {
                results: results.into_iter().map(|_| Err(e.clone())).collect(),
                changed: Vec::new(),
                seqs: None,
            },
        }
    }
}

impl RocksLedger {
    /// Commits a group's `WriteBatch` with one fsync; returns the records it wrote.
    fn commit(&self, decided: Decided<RocksStage<'_>>) -> Result<Vec<PaymentRecord>, LedgerError> {
        let Decided { stage, records, last_seq, last_settlement, pending_delta } = decided;
        if stage.batch.is_empty() {
            return Ok(Vec::new());
        }
        self.db
            .write_opt(stage.batch, &synced_write_options())
            .map_err(|source| LedgerError::WritesRefused { source: Arc::new(source) })?;
        self.last_seq.store(last_seq, Ordering::SeqCst);
        self.last_settlement.store(last_settlement, Ordering::SeqCst);
        // Only the writer commits, so this read-modify-write does not race.
        let pending = self.pending().saturating_add_signed(pending_delta);
        self.pending.store(pending, Ordering::SeqCst);
        Ok(records)
    }
}

/// A group's writes on RocksDB: one `WriteBatch` over the column families.
struct RocksStage<'a> {
    ledger: &'a RocksLedger,
    batch: WriteBatch,
}

impl Stage for RocksStage<'_> {
    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        self.ledger.get(key)
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        self.ledger.exposure(payer)
    }

    fn idem(&self, idem: &str) -> Result<Option<AuthKey>, LedgerError> {
        let stored = self
            .ledger
            .db
            .get_pinned_cf(self.ledger.cf(CF_IDEM), idem.as_bytes())
            .map_err(db_err("get", CF_IDEM))?;
        stored
            .map(|v| {
                AuthKey::from_bytes(&v)
                    .ok_or(LedgerError::Corrupt { cf: CF_IDEM, source: CorruptRecord { field: "auth key" } })
            })
            .transpose()
    }

    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        self.ledger.batch(chain_id, counter)
    }

    fn holds_lease(&self, _fence: &Fence) -> Result<bool, LedgerError> {
        // One daemon has a RocksDB ledger: every lease is its own.
        Ok(true)
    }

    fn put_record(&mut self, record: &PaymentRecord) {
        let bytes = record.encode();
        self.batch.put_cf(self.ledger.cf(CF_SEQ), record.seq.to_be_bytes(), &bytes);
        self.batch.put_cf(self.ledger.cf(CF_AUTH), record.key().as_bytes(), bytes);
    }

    fn put_id(&mut self, key: &AuthKey) {
        self.batch.put_cf(self.ledger.cf(CF_ID), key.payment_id().0, key.as_bytes());
    }

    fn put_idem(&mut self, idem: &str, key: &AuthKey) {
        self.batch.put_cf(self.ledger.cf(CF_IDEM), idem.as_bytes(), key.as_bytes());
    }

    fn put_exposure(&mut self, payer: &PayerKey, value: U256) {
        if value.is_zero() {
            self.batch.delete_cf(self.ledger.cf(CF_EXPOSURE), payer.as_bytes());
        } else {
            self.batch.put_cf(self.ledger.cf(CF_EXPOSURE), payer.as_bytes(), value.to_be_bytes::<32>());
        }
    }

    fn set_pending(&mut self, key: &AuthKey, pending: bool) {
        self.flag(CF_PENDING, key, pending);
    }

    fn set_watched(&mut self, key: &AuthKey, watched: bool) {
        self.flag(CF_WATCH, key, watched);
    }

    fn put_settlement(&mut self, seq: u64, record: &PaymentRecord) {
        self.batch.put_cf(self.ledger.cf(CF_SETTLEMENT), seq.to_be_bytes(), record.encode());
    }

    fn put_batch(&mut self, batch: &BatchRecord) {
        self.batch.put_cf(self.ledger.cf(CF_BATCH), batch.key(), batch.encode());
    }
}

impl RocksStage<'_> {
    /// Membership of `key` in an index column family (`pending`, `watch`).
    fn flag(&mut self, cf: &'static str, key: &AuthKey, on: bool) {
        if on {
            self.batch.put_cf(self.ledger.cf(cf), key.as_bytes(), []);
        } else {
            self.batch.delete_cf(self.ledger.cf(cf), key.as_bytes());
        }
    }
}
