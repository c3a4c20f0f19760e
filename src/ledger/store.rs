//! The RocksDB ledger behind the seam: [`LedgerStore`] for [`Ledger`], its reads from
//! [`super::rocks`] and its writes through [`super::group`].

use alloy::primitives::U256;

use super::batch::BatchRecord;
use super::command::Command;
use super::error::LedgerError;
use super::group::Group;
use super::record::{AuthKey, PayerKey, PaymentId, PaymentRecord};
use super::rocks::Ledger;
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
        let mut group = Group::new(self, &mut holds);
        let results: Vec<_> = commands.iter().map(|c| group.apply(c)).collect();
        match group.commit() {
            Ok(changed) => GroupOutcome { results, changed },
            Err(e) => GroupOutcome {
                results: results.into_iter().map(|_| Err(e.clone())).collect(),
                changed: Vec::new(),
            },
        }
    }
}
