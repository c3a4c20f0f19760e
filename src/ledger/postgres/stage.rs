//! A group's reads, served from what its first round trip read, and its writes staged as
//! rows with provisional numbers.

use std::collections::HashMap;

use alloy::primitives::U256;

use super::decode::clamp;
use super::read::Prefetched;
use super::writes::{CounterWrite, HoldWrites, PaymentRows, Writes, latest_batches, unzip3};
use crate::ledger::batch::BatchRecord;
use crate::ledger::command::Fence;
use crate::ledger::error::LedgerError;
use crate::ledger::group::Stage;
use crate::ledger::record::{AuthKey, PayerKey, PaymentRecord};

/// Where a group numbers its changes and settlement log entries while deciding, before the
/// counters are locked: the server adds the counter's value less this (far above any real
/// number, so a record the group wrote is told from one it read).
pub(super) const PROVISIONAL: u64 = 1 << 62;

/// A group's reads (served from what was prefetched: everything its commands can ask for)
/// and its staged writes.
pub(super) struct PgStage {
    pub(super) read: Prefetched,
    /// Change feed entries, in order.
    pub(super) feed: Vec<(i64, Vec<u8>)>,
    /// Final (pending, watched) of each key whose flags the group set.
    pub(super) flags: HashMap<AuthKey, (bool, bool)>,
    pub(super) idem: Vec<(String, Vec<u8>)>,
    pub(super) exposures: HashMap<PayerKey, U256>,
    /// Settlement log entries: offset, record, its change's offset.
    pub(super) settlement: Vec<(i64, Vec<u8>, i64)>,
    pub(super) batches: Vec<BatchRecord>,
}

/// A provisional number's place among the group's ([`PROVISIONAL`]): 1 for the first.
pub(super) fn offset(provisional: u64) -> i64 {
    clamp(provisional.saturating_sub(PROVISIONAL))
}

/// A record as stored in the feed and the log: without its sequence number (the row's).
pub(super) fn encode_unnumbered(record: &PaymentRecord) -> Vec<u8> {
    record.encode_numbered(0)
}

impl PgStage {
    pub(super) fn new(read: Prefetched) -> PgStage {
        PgStage {
            read,
            feed: Vec::new(),
            flags: HashMap::new(),
            idem: Vec::new(),
            exposures: HashMap::new(),
            settlement: Vec::new(),
            batches: Vec::new(),
        }
    }

    pub(super) fn flags(&mut self, key: &AuthKey) -> &mut (bool, bool) {
        let committed = self.read.records.get(key).map(|(_, p, w)| (*p, *w)).unwrap_or_default();
        self.flags.entry(*key).or_insert(committed)
    }

    /// The statements that write what the group decided; `records`: every record it wrote;
    /// `counters`: what it adds to them.
    pub(super) fn into_writes(self, records: &[PaymentRecord], counters: [i64; 3]) -> Writes {
        let mut payments = PaymentRows::default();
        for r in records {
            let key = r.key();
            let (pending, watched) = match self.flags.get(&key) {
                Some(f) => *f,
                None => self.read.records.get(&key).map(|(_, p, w)| (*p, *w)).unwrap_or_default(),
            };
            payments.id.push(key.payment_id().0.to_vec());
            payments.key.push(key.as_bytes().to_vec());
            payments.seq.push(offset(r.seq));
            payments.pending.push(pending);
            payments.watched.push(watched);
        }
        let (zero, nonzero): (Vec<_>, Vec<_>) = self.exposures.into_iter().partition(|(_, v)| v.is_zero());
        Writes {
            payments,
            feed: self.feed.into_iter().unzip(),
            idem: self.idem.into_iter().unzip(),
            exposure: nonzero
                .iter()
                .map(|(p, v)| (p.as_bytes().to_vec(), v.to_be_bytes::<32>().to_vec()))
                .unzip(),
            exposure_cleared: zero.iter().map(|(p, _)| p.as_bytes().to_vec()).collect(),
            settlement: unzip3(self.settlement),
            batches: latest_batches(self.batches),
            counters: Some(CounterWrite::Add(counters)),
            holds: HoldWrites::default(),
        }
    }
}

impl Stage for PgStage {
    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        Ok(self.read.records.get(key).map(|(r, _, _)| r.clone()))
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        Ok(self.read.exposures.get(payer).copied().unwrap_or_default())
    }

    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        Ok(self.read.batches.get(&(chain_id, counter)).cloned())
    }

    fn holds_lease(&self, fence: &Fence) -> Result<bool, LedgerError> {
        let held = self.read.leases.get(&(fence.chain_id, fence.settler));
        Ok(held.is_some_and(|(owner, epoch)| *owner == fence.owner && *epoch == fence.epoch))
    }

    fn idem(&self, idem: &str) -> Result<Option<AuthKey>, LedgerError> {
        Ok(self.read.idem.get(idem).copied())
    }

    fn put_record(&mut self, record: &PaymentRecord) {
        self.feed.push((offset(record.seq), encode_unnumbered(record)));
    }

    fn put_id(&mut self, _key: &AuthKey) {
        // The id is a column of the payment's row.
    }

    fn put_idem(&mut self, idem: &str, key: &AuthKey) {
        self.idem.push((idem.to_owned(), key.as_bytes().to_vec()));
    }

    fn put_exposure(&mut self, payer: &PayerKey, value: U256) {
        self.exposures.insert(*payer, value);
    }

    fn set_pending(&mut self, key: &AuthKey, pending: bool) {
        self.flags(key).0 = pending;
    }

    fn set_watched(&mut self, key: &AuthKey, watched: bool) {
        self.flags(key).1 = watched;
    }

    fn put_settlement(&mut self, seq: u64, record: &PaymentRecord) {
        // The entry's record is one this group wrote (a log entry follows its change).
        self.settlement.push((offset(seq), encode_unnumbered(record), offset(record.seq)));
    }

    fn put_batch(&mut self, batch: &BatchRecord) {
        self.batches.push(batch.clone());
    }
}
