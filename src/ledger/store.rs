//! The seam: the ledger as the rest of the daemon sees it, whatever stores it. Nothing here
//! names a database; each backend is a folder of its own ([`super::rocks`],
//! [`super::postgres`]) implementing these traits.
//!
//! - [`LedgerStore`]: every ledger's reads, and its one way to write (a group of commands);
//! - [`Fleet`]: what only a ledger that several daemons share can do (leases on settler
//!   accounts, turns at fleet-wide periodic tasks, reading the newest change anyone
//!   committed), reached through [`LedgerStore::fleet`].

use alloy::primitives::{Address, U256};

use super::batch::BatchRecord;
use super::command::{Applied, Command};
use super::error::LedgerError;
use super::record::{AuthKey, PayerKey, PaymentId, PaymentRecord};

/// What one group of commands did: each command's result, in order, and every record the
/// group wrote (as it stands after the group).
#[derive(Debug)]
pub struct GroupOutcome {
    pub results: Vec<Result<Applied, LedgerError>>,
    pub changed: Vec<PaymentRecord>,
    /// The sequence numbers the group's changes took (first, last), if it made any.
    pub seqs: Option<(u64, u64)>,
}

/// The ledger as the rest of the daemon sees it: its reads, and the one way to write.
/// Reads are safe from any thread. Implementations decide every rule of [`Command`] the
/// same way (the property tests in `tests/it/ledger_props.rs` pin them).
pub trait LedgerStore: Send + Sync + std::fmt::Debug {
    /// Where it lives, for logs.
    fn location(&self) -> String;

    /// The sequence number of the newest committed change (0: none yet).
    fn last_seq(&self) -> u64;

    /// Payments accepted and not yet settled, failed or expired.
    fn pending(&self) -> u64;

    /// Verified payments held and not yet claimed or lapsed (as of the last group).
    fn holds(&self) -> usize;

    /// The sequence number of the newest settlement log entry (0: none yet).
    fn last_settlement(&self) -> u64;

    fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError>;

    fn get_by_id(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, LedgerError>;

    /// The payer's exposure: values accepted and not yet final.
    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError>;

    /// Every payer's exposure (for tests and status).
    fn exposures(&self) -> Result<Vec<(PayerKey, U256)>, LedgerError>;

    /// Every payment not yet final, in key order.
    fn pending_records(&self) -> Result<Vec<PaymentRecord>, LedgerError>;

    /// Up to `limit` changes with a sequence number above `after`, in order.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<PaymentRecord>, LedgerError>;

    /// Settled payments whose block is not yet final on chain (watched for reorgs).
    fn watched(&self) -> Result<Vec<PaymentRecord>, LedgerError>;

    /// Up to `limit` settlement log entries after `after`, with their sequence numbers, in
    /// the order they were logged: each payment's outcome once, and for a settled one any
    /// correction, reversal and its finality (see [`LogEntry`]).
    fn settlement_log(&self, after: u64, limit: usize) -> Result<Vec<(u64, PaymentRecord)>, LedgerError>;

    fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError>;

    /// Every batch of `chain_id`, oldest first.
    fn batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError>;

    /// The highest batch counter used on `chain_id` (0: none yet).
    fn last_batch_counter(&self, chain_id: u64) -> Result<u64, LedgerError>;

    /// Every payment record, in key order (for recovery, tests and checks).
    fn records(&self) -> Result<Vec<PaymentRecord>, LedgerError>;

    /// What a fleet sharing this ledger needs of it; `None` for a ledger only this daemon
    /// writes (its settler accounts are all its own, its changes all its commits).
    fn fleet(&self) -> Option<&dyn Fleet>;

    /// Every batch of `chain_id` not yet done or abandoned, oldest first.
    fn open_batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
        Ok(self.batches(chain_id)?.into_iter().filter(|b| !b.status.is_final()).collect())
    }

    /// Applies `commands` in order as one group and commits them atomically and durably
    /// before returning. If the commit fails, every command fails with its error and
    /// nothing of the group is visible. Only the writer calls this.
    fn apply_group(&self, commands: &[Command]) -> GroupOutcome;
}

/// What a ledger shared by a fleet of daemons offers beyond [`LedgerStore`]: settler
/// accounts divided by leases, periodic tasks taken in turns, and the newest change committed
/// by any daemon (changes may come from elsewhere).
pub trait Fleet: Send + Sync {
    /// The sequence number of the newest change committed by anyone sharing the ledger,
    /// read from the storage ([`LedgerStore::last_seq`] counts this process's commits).
    fn committed_seq(&self) -> Result<u64, LedgerError>;

    /// Whether this daemon takes the turn at the periodic task `task` now: of the daemons
    /// sharing the ledger, one takes each turn, at most one per `every_ms` (on the storage's
    /// clock).
    fn claim_turn(&self, task: &str, every_ms: u64) -> Result<bool, LedgerError>;

    /// Takes, or renews, a lease of `ttl_ms` on each of `settlers` of `chain_id` for
    /// `owner` where it is free, expired or already `owner`'s; returns the ones `owner`
    /// holds, with their epochs.
    fn acquire_leases(
        &self,
        owner: &str,
        chain_id: u64,
        settlers: &[Address],
        ttl_ms: u64,
    ) -> Result<Vec<(Address, u64)>, LedgerError>;

    /// Gives up `owner`'s leases at once (a clean stop), so other daemons take over without
    /// waiting for them to expire.
    fn release_leases(&self, owner: &str) -> Result<(), LedgerError>;
}
