//! Why a ledger operation failed: one error type for every backend and the writer.

use super::record::{CorruptRecord, PaymentId, Status};

/// Why a ledger operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("RocksDB {op} on column family {cf} failed")]
    Db {
        op: &'static str,
        cf: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    #[error(
        "ledger at {path} was written by schema version {found}; this daemon reads up to {supported}: \
         run a newer x402-batcher"
    )]
    NewerSchema { path: String, found: u32, supported: u32 },
    #[error("ledger column family {cf} holds a corrupt entry")]
    Corrupt {
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
    #[error("PostgreSQL {op} failed")]
    Postgres {
        op: &'static str,
        #[source]
        source: std::sync::Arc<tokio_postgres::Error>,
    },
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

    /// A PostgreSQL group that lost a race to a committed group its locks do not keep out (a
    /// unique key it inserted meanwhile), or was chosen to break a deadlock: nothing of it is
    /// committed, and deciding it again sees what the other took.
    pub fn lost_race(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            LedgerError::Postgres { source, .. } => source
                .code()
                .is_some_and(|c| *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::T_R_DEADLOCK_DETECTED),
            _ => false,
        }
    }
}

pub(super) fn db_err(op: &'static str, cf: &'static str) -> impl FnOnce(rocksdb::Error) -> LedgerError {
    move |source| LedgerError::Db { op, cf, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_with_causes_names_each_of_them() {
        let e = LedgerError::Corrupt { cf: "payments", source: CorruptRecord { field: "status" } };
        assert_eq!(
            e.with_causes(),
            "ledger column family payments holds a corrupt entry: ledger record field status is corrupt"
        );
        assert_eq!(LedgerError::QueueFull.with_causes(), "ledger write queue is full");
    }
}
