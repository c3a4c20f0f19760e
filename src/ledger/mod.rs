//! The durable nonce ledger: the double-spend guard, per-payer exposure, the holds of
//! verified payments, the lifecycle of every payment, the settlement log, and the ordered
//! change log `WatchPayments` and recovery read.
//!
//! The rest of the daemon reaches it through one seam, [`LedgerStore`] (its reads, and one
//! way to write: a group of [`Command`]s applied by the single [`writer`]), so a second
//! backend can be added without touching ingest, settlement, export or the services.
//! RocksDB ([`rocks`]) is the embedded default; PostgreSQL ([`postgres`]) the shared one,
//! for a fleet. [`open`] opens the configured one.
//!
//! - [`command`]: what the ledger is asked (accept, hold, transition, a settlement step)
//!   and what it answers;
//! - [`record`]: keys, lifecycle states (with their fixed on-disk numbers), the payment
//!   record and its codec;
//! - [`batch`]: settlement batches (items, settler, signed attempts, inclusion);
//! - [`holds`]: verified payments reserved (in memory) until their settlement claims them;
//! - [`rocks`]: the RocksDB layout, schema check, opening, reads;
//! - [`group`]: the rules, applied to one group of commands and committed as one synced
//!   `WriteBatch`;
//! - [`store`]: the RocksDB ledger as a [`LedgerStore`] (reads from `rocks`, writes
//!   through `group`);
//! - [`postgres`]: the ledger on PostgreSQL (the same rules through `group`, one
//!   transaction per group);
//! - [`open`]: the configured backend, opened;
//! - [`writer`]: the single writer thread that drains its queue into group commits and
//!   answers each command only after its group is on disk; followers of single payments;
//! - [`error`]: why an operation failed.
//!
//! Layers, bottom up: `record`, `batch`, `holds`, `error` → `command` → `group` → `rocks`
//! and `store`, `postgres` → `open` → `writer`.
//!
//! Column families:
//!
//! | cf | key | value |
//! |---|---|---|
//! | `auth` | chain id ‖ token ‖ from ‖ nonce (80 B) | the payment record |
//! | `seq` | sequence number (u64 BE) | the record as of that change |
//! | `id` | payment id (16 B) | auth key |
//! | `idem` | idempotency key | auth key |
//! | `exposure` | chain id ‖ token ‖ from (48 B) | sum of values accepted, not final (32 B BE) |
//! | `pending` | auth key of every payment not yet final | (empty) |
//! | `batch` | chain id ‖ batch counter (u64 BE each) | the batch record |
//! | `settlement` | log sequence number (u64 BE) | a payment's final record, once |
//! | `meta` | name | schema version, ... |

pub mod batch;
pub mod command;
pub mod error;
pub mod group;
pub mod holds;
pub mod open;
pub mod postgres;
pub mod record;
pub mod rocks;
pub mod store;
pub mod writer;

use alloy::primitives::U256;

pub use batch::{Attempt, BatchRecord, BatchStatus, Inclusion};
pub use command::{
    AcceptOutcome, AcceptRequest, Applied, ApplyRequest, ApplyResults, Command, Evidence, Fence, HoldOutcome,
    HoldRequest, Refusal, Repeat, TransitionRequest,
};
pub use error::LedgerError;
pub use open::{open, open_read_only};
pub use postgres::{Imported, PgConnect, PgLedger};
pub use record::{AuthKey, LogEntry, PayerKey, PaymentId, PaymentRecord, Status, Submission};
pub use rocks::Ledger;
pub use writer::{Follow, LedgerHandle};

/// The settlement log folded into each payment's standing outcome, in the order outcomes
/// were first logged: an outcome entry adds the payment, a reversal takes its settlement
/// back out, a correction or its finality replaces it with the newer snapshot. A payment
/// listed twice had two outcomes without a reversal between: a double count.
pub fn books(log: impl IntoIterator<Item = PaymentRecord>) -> Vec<PaymentRecord> {
    let mut rows: Vec<Option<PaymentRecord>> = Vec::new();
    let mut at: std::collections::HashMap<PaymentId, Vec<usize>> = std::collections::HashMap::new();
    for r in log {
        let id = r.payment_id();
        match r.log_entry {
            LogEntry::Outcome => {
                at.entry(id).or_default().push(rows.len());
                rows.push(Some(r));
            }
            LogEntry::Reversed => {
                if let Some(i) = at.get_mut(&id).and_then(Vec::pop) {
                    rows[i] = None;
                }
            }
            LogEntry::Corrected | LogEntry::Finalized => {
                if let Some(&i) = at.get(&id).and_then(|v| v.last()) {
                    rows[i] = Some(r);
                }
            }
        }
    }
    rows.into_iter().flatten().collect()
}

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
/// same way (the property tests in `tests/ledger_props.rs` pin them).
pub trait LedgerStore: Send + Sync + std::fmt::Debug {
    /// Where it lives, for logs.
    fn location(&self) -> String;

    /// The sequence number of the newest committed change (0: none yet).
    fn last_seq(&self) -> u64;

    /// The sequence number of the newest change committed by anyone sharing the ledger,
    /// read from the storage ([`Self::last_seq`] counts this process's commits).
    fn committed_seq(&self) -> Result<u64, LedgerError> {
        Ok(self.last_seq())
    }

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

    /// Whether this daemon takes the turn at the periodic task `task` now: of the daemons
    /// sharing the ledger, one takes each turn, at most one per `every_ms` (on the
    /// database's clock). A ledger of one daemon: always.
    fn claim_turn(&self, task: &str, every_ms: u64) -> Result<bool, LedgerError> {
        let _ = (task, every_ms);
        Ok(true)
    }

    /// Whether other daemons may share this ledger: settler accounts are then divided by
    /// leases ([`Self::acquire_leases`]) and changes may come from elsewhere.
    fn shared(&self) -> bool {
        false
    }

    /// Takes, or renews, a lease of `ttl_ms` on each of `settlers` of `chain_id` for
    /// `owner` where it is free, expired or already `owner`'s; returns the ones `owner`
    /// holds, with their epochs. A ledger nobody shares grants every one (epoch 1).
    fn acquire_leases(
        &self,
        owner: &str,
        chain_id: u64,
        settlers: &[alloy::primitives::Address],
        ttl_ms: u64,
    ) -> Result<Vec<(alloy::primitives::Address, u64)>, LedgerError> {
        let _ = (owner, chain_id, ttl_ms);
        Ok(settlers.iter().map(|s| (*s, 1)).collect())
    }

    /// Gives up `owner`'s leases at once (a clean stop), so other daemons take over without
    /// waiting for them to expire.
    fn release_leases(&self, owner: &str) -> Result<(), LedgerError> {
        let _ = owner;
        Ok(())
    }

    /// Every batch of `chain_id` not yet done or abandoned, oldest first.
    fn open_batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
        Ok(self.batches(chain_id)?.into_iter().filter(|b| !b.status.is_final()).collect())
    }

    /// Applies `commands` in order as one group and commits them atomically and durably
    /// before returning. If the commit fails, every command fails with its error and
    /// nothing of the group is visible. Only the writer calls this.
    fn apply_group(&self, commands: &[Command]) -> GroupOutcome;
}
