//! The RocksDB ledger's reads: by key, by id, by sequence number, the pending and watched
//! indexes, the settlement log and the batches.

use std::sync::atomic::Ordering;

use alloy::primitives::U256;
use rocksdb::{Direction, IteratorMode};

use super::{
    CF_AUTH, CF_BATCH, CF_EXPOSURE, CF_ID, CF_PENDING, CF_SEQ, CF_SETTLEMENT, CF_WATCH, RocksLedger, db_err,
    decode_u256, seq_from_key,
};
use crate::ledger::batch::{BatchRecord, batch_key};
use crate::ledger::error::LedgerError;
use crate::ledger::record::{AuthKey, CorruptRecord, PayerKey, PaymentId, PaymentRecord};

/// Reads: the [`LedgerStore`] implementation ([`super::store`]) and the group logic use them.
impl RocksLedger {
    /// Verified payments held and not yet claimed or lapsed (as of the last group).
    pub(super) fn holds(&self) -> usize {
        self.holds.lock().len()
    }

    /// Payments accepted and not yet settled, failed or expired.
    pub(super) fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    /// The sequence number of the newest committed change (0: none yet).
    pub(super) fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::SeqCst)
    }

    pub(super) fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        self.db
            .get_pinned_cf(self.cf(CF_AUTH), key.as_bytes())
            .map_err(db_err("get", CF_AUTH))?
            .map(|v| PaymentRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_AUTH, source }))
            .transpose()
    }

    pub(super) fn get_by_id(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, LedgerError> {
        let Some(key) = self.db.get_pinned_cf(self.cf(CF_ID), id.0).map_err(db_err("get", CF_ID))? else {
            return Ok(None);
        };
        let key = AuthKey::from_bytes(&key)
            .ok_or(LedgerError::Corrupt { cf: CF_ID, source: CorruptRecord { field: "auth key" } })?;
        self.get(&key)
    }

    /// The payer's exposure: values accepted and not yet final.
    pub(super) fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        self.db
            .get_pinned_cf(self.cf(CF_EXPOSURE), payer.as_bytes())
            .map_err(db_err("get", CF_EXPOSURE))?
            .map(|v| decode_u256(&v))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Every payer's exposure (for tests and status).
    pub(super) fn exposures(&self) -> Result<Vec<(PayerKey, U256)>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_EXPOSURE), IteratorMode::Start) {
            let (k, v) = kv.map_err(db_err("iterate", CF_EXPOSURE))?;
            let payer = AuthKey::from_bytes(&[k.as_ref(), &[0u8; 32]].concat())
                .ok_or(LedgerError::Corrupt { cf: CF_EXPOSURE, source: CorruptRecord { field: "key" } })?
                .payer();
            out.push((payer, decode_u256(&v)?));
        }
        Ok(out)
    }

    /// Every payment not yet final, in key order: read through the `pending` index, so the
    /// cost follows what is in flight, not the whole history.
    pub(super) fn pending_records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_PENDING), IteratorMode::Start) {
            let (k, _) = kv.map_err(db_err("iterate", CF_PENDING))?;
            let key = AuthKey::from_bytes(&k).ok_or(LedgerError::Corrupt {
                cf: CF_PENDING,
                source: CorruptRecord { field: "auth key" },
            })?;
            let record = self
                .get(&key)?
                .ok_or(LedgerError::Corrupt { cf: CF_PENDING, source: CorruptRecord { field: "record" } })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Up to `limit` changes with a sequence number above `after`, in order.
    pub(super) fn events_after(&self, after: u64, limit: usize) -> Result<Vec<PaymentRecord>, LedgerError> {
        let start = (after.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        for kv in
            self.db.iterator_cf(self.cf(CF_SEQ), IteratorMode::From(&start, Direction::Forward)).take(limit)
        {
            let (_, v) = kv.map_err(db_err("iterate", CF_SEQ))?;
            out.push(
                PaymentRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_SEQ, source })?,
            );
        }
        Ok(out)
    }

    /// Settled payments whose block is not yet final on chain.
    pub(super) fn watched(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_WATCH), IteratorMode::Start) {
            let (k, _) = kv.map_err(db_err("iterate", CF_WATCH))?;
            let key = AuthKey::from_bytes(&k)
                .ok_or(LedgerError::Corrupt { cf: CF_WATCH, source: CorruptRecord { field: "auth key" } })?;
            let record = self
                .get(&key)?
                .ok_or(LedgerError::Corrupt { cf: CF_WATCH, source: CorruptRecord { field: "record" } })?;
            out.push(record);
        }
        Ok(out)
    }

    /// The sequence number of the newest settlement log entry (0: none yet).
    pub(super) fn last_settlement(&self) -> u64 {
        self.last_settlement.load(Ordering::SeqCst)
    }

    /// Up to `limit` settlement log entries after `after`, with their sequence numbers: each
    /// payment's final record, once, in the order they became final.
    pub(super) fn settlement_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, PaymentRecord)>, LedgerError> {
        let start = (after.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_SETTLEMENT), IteratorMode::From(&start, Direction::Forward))
            .take(limit)
        {
            let (k, v) = kv.map_err(db_err("iterate", CF_SETTLEMENT))?;
            let record = PaymentRecord::decode(&v)
                .map_err(|source| LedgerError::Corrupt { cf: CF_SETTLEMENT, source })?;
            out.push((seq_from_key(&k)?, record));
        }
        Ok(out)
    }

    pub(super) fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        self.db
            .get_pinned_cf(self.cf(CF_BATCH), batch_key(chain_id, counter))
            .map_err(db_err("get", CF_BATCH))?
            .map(|v| BatchRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_BATCH, source }))
            .transpose()
    }

    /// Every batch of `chain_id`, oldest first.
    pub(super) fn batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
        let start = batch_key(chain_id, 0);
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_BATCH), IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = kv.map_err(db_err("iterate", CF_BATCH))?;
            if !k.starts_with(&chain_id.to_be_bytes()) {
                break;
            }
            out.push(
                BatchRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_BATCH, source })?,
            );
        }
        Ok(out)
    }

    /// The highest batch counter used on `chain_id` (0: none yet).
    pub(super) fn last_batch_counter(&self, chain_id: u64) -> Result<u64, LedgerError> {
        let end = batch_key(chain_id, u64::MAX);
        let last = self
            .db
            .iterator_cf(self.cf(CF_BATCH), IteratorMode::From(&end, Direction::Reverse))
            .next()
            .transpose()
            .map_err(db_err("iterate", CF_BATCH))?;
        Ok(match last {
            Some((k, _)) if k.starts_with(&chain_id.to_be_bytes()) && k.len() == 16 => {
                u64::from_be_bytes(k[8..].try_into().expect("16-byte key"))
            }
            _ => 0,
        })
    }

    /// Every payment record, in key order (for recovery, tests and checks).
    pub(super) fn records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_AUTH), IteratorMode::Start) {
            let (_, v) = kv.map_err(db_err("iterate", CF_AUTH))?;
            out.push(
                PaymentRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_AUTH, source })?,
            );
        }
        Ok(out)
    }
}
