//! Why a ledger operation failed: one error type for every backend and the writer. It names
//! no database: a backend's own error is kept as the cause ([`Cause`]), and the variant
//! says what the failure means for the caller (retry the group, reconnect, stop writing).

use std::sync::Arc;

use super::record::{CorruptRecord, PaymentId, Status};

/// A backend's own error, kept as the cause (shared: [`LedgerError`] is cloned into the
/// answer of every command of a failed group).
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why a ledger operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The storage failed one operation (a read, a statement); the next may succeed.
    #[error("ledger storage: {op} on {place} failed")]
    Storage {
        op: &'static str,
        /// Where: a column family, a table, the database.
        place: &'static str,
        #[source]
        source: Cause,
    },
    /// The storage cannot be reached (connecting failed, or the connection is gone): the
    /// next operation connects again.
    #[error("ledger storage: {op} could not reach {place}")]
    Unreachable {
        op: &'static str,
        place: &'static str,
        #[source]
        source: Cause,
    },
    /// A group lost a race to another daemon's committed group that its locks do not keep
    /// out (a unique key, a deadlock broken): nothing of it is committed, and deciding it
    /// again sees what the other took.
    #[error("ledger storage: {op} lost a race to another daemon's commit")]
    LostRace {
        op: &'static str,
        #[source]
        source: Cause,
    },
    /// The storage refused a commit and refuses every later write until it is reopened
    /// (RocksDB after a failed write): the writer stops.
    #[error("ledger storage refused a commit; it takes no more writes until reopened")]
    WritesRefused {
        #[source]
        source: Cause,
    },
    #[error(
        "ledger at {path} was written by schema version {found}; this daemon reads up to {supported}: \
         run a newer x402-batcher"
    )]
    NewerSchema { path: String, found: u32, supported: u32 },
    #[error("ledger {cf} holds a corrupt entry")]
    Corrupt {
        /// The column family or table.
        cf: &'static str,
        #[source]
        source: CorruptRecord,
    },
    #[error("payment {0} is not in the ledger")]
    NotFound(PaymentId),
    #[error("payment {id} cannot move from {from:?} to {to:?}")]
    IllegalTransition { id: PaymentId, from: Status, to: Status },
    #[error(
        "ledger at {path} has schema version {found}, older than this build's: start the daemon once to upgrade it"
    )]
    OlderSchema { path: String, found: u32 },
    #[error("ledger configuration: {0}")]
    Config(String),
    #[error(
        "the lease of {owner} (epoch {epoch}) on settler {settler} of chain {chain_id} is no longer held: \
         another daemon took the account over"
    )]
    LeaseLost { chain_id: u64, settler: alloy::primitives::Address, owner: String, epoch: u64 },
    #[error("batch {chain_id}-{counter} is already recorded with other items (another daemon cut it)")]
    BatchTaken { chain_id: u64, counter: u64 },
    #[error("ledger write queue is full")]
    QueueFull,
    #[error("ledger writer has stopped")]
    WriterStopped,
}

impl LedgerError {
    /// This error and its causes, each after a colon: for the daemon's log (a database's
    /// own reason, such as PostgreSQL's "out of shared memory" and its hint). Not for
    /// replies to API servers: a database's detail can name another client's values.
    pub fn with_causes(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_with_causes_names_each_of_them() {
        let e = LedgerError::Corrupt { cf: "payments", source: CorruptRecord { field: "status" } };
        assert_eq!(
            e.with_causes(),
            "ledger payments holds a corrupt entry: ledger record field status is corrupt"
        );
        assert_eq!(LedgerError::QueueFull.with_causes(), "ledger write queue is full");
    }
}
