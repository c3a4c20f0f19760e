//! The RocksDB ledger behind the seam: [`LedgerStore`] for [`Ledger`], its reads from
//! [`super::rocks`] and its writes through [`super::group`], staged in one `WriteBatch`
//! that commits with one fsync.

use std::sync::atomic::Ordering;

use alloy::primitives::U256;
use rocksdb::WriteBatch;

use super::batch::BatchRecord;
use super::command::{Command, Fence};
use super::error::{LedgerError, db_err};
use super::group::{Decided, Group, Stage};
use super::record::{AuthKey, CorruptRecord, PayerKey, PaymentId, PaymentRecord};
use super::rocks::{
    CF_AUTH, CF_BATCH, CF_EXPOSURE, CF_ID, CF_IDEM, CF_PENDING, CF_SEQ, CF_SETTLEMENT, CF_WATCH, Ledger,
    synced_write_options,
};
use super::{GroupOutcome, LedgerStore};

impl LedgerStore for Ledger {
    fn location(&self) -> String {
        self.path().display().to_string()
    }

    fn last_seq(&self) -> u64 {
        Ledger::last_seq(self)
    }

    fn pending(&self) -> u64 {
        Ledger::pending(self)
    }

    fn holds(&self) -> usize {
        Ledger::holds(self)
    }

    fn last_settlement(&self) -> u64 {
        Ledger::last_settlement(self)
    }

    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        Ledger::get(self, key)
    }

    fn get_by_id(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, LedgerError> {
        Ledger::get_by_id(self, id)
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        Ledger::exposure(self, payer)
    }

    fn exposures(&self) -> Result<Vec<(PayerKey, U256)>, LedgerError> {
        Ledger::exposures(self)
    }

    fn pending_records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        Ledger::pending_records(self)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<PaymentRecord>, LedgerError> {
        Ledger::events_after(self, after, limit)
    }

    fn settlement_log(&self, after: u64, limit: usize) -> Result<Vec<(u64, PaymentRecord)>, LedgerError> {
        Ledger::settlement_log(self, after, limit)
    }

    fn watched(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        Ledger::watched(self)
    }

    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        Ledger::batch(self, chain_id, counter)
    }

    fn batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
        Ledger::batches(self, chain_id)
    }

    fn last_batch_counter(&self, chain_id: u64) -> Result<u64, LedgerError> {
        Ledger::last_batch_counter(self, chain_id)
    }

    fn records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        Ledger::records(self)
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

impl Ledger {
    /// Commits a group's `WriteBatch` with one fsync; returns the records it wrote.
    fn commit(&self, decided: Decided<RocksStage<'_>>) -> Result<Vec<PaymentRecord>, LedgerError> {
        let Decided { stage, records, last_seq, last_settlement, pending_delta } = decided;
        if stage.batch.is_empty() {
            return Ok(Vec::new());
        }
        self.db.write_opt(stage.batch, &synced_write_options()).map_err(db_err("write", "*"))?;
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
    ledger: &'a Ledger,
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
