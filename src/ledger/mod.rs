//! The durable nonce ledger: the double-spend guard, per-payer exposure, the holds of
//! verified payments, the lifecycle of every payment, the settlement log, and the ordered
//! change log `WatchPayments` and recovery read.
//!
//! The rest of the daemon reaches it through one seam, [`store`], which names no database:
//! [`LedgerStore`] (its reads, and one way to write: a group of [`Command`]s applied by the
//! single [`writer`]) and, for a ledger a fleet shares, [`Fleet`]. Each backend is a folder
//! carrying its name: [`rocks`] ([`RocksLedger`], the embedded default) and [`postgres`]
//! ([`PgLedger`], shared by a fleet); [`open`] opens the configured one. A new backend is a
//! new folder: ingest, settlement, export and the services do not change.
//!
//! - [`store`]: the seam (the traits, and what a group answers);
//! - [`command`]: what the ledger is asked (accept, hold, transition, a settlement step)
//!   and what it answers;
//! - [`record`]: keys, lifecycle states (with their fixed on-disk numbers), the payment
//!   record and its codec, the settlement log's entries and the books they fold into;
//! - [`batch`]: settlement batches (items, settler, signed attempts, inclusion);
//! - [`holds`]: verified payments reserved until their settlement claims them;
//! - [`group`]: the rules, applied to one group of commands over a backend's [`group::Stage`]
//!   (one code for every backend);
//! - [`rocks`]: the ledger on RocksDB: layout, opening, reads, one synced `WriteBatch` per
//!   group;
//! - [`postgres`]: the ledger on PostgreSQL: the same rules, one transaction per group;
//! - [`open`]: the configured backend, opened;
//! - [`writer`]: the single writer thread that drains its queue into group commits and
//!   answers each command only after its group is durable; followers of single payments;
//! - [`error`]: why an operation failed (a backend's own error kept as the cause).
//!
//! Layers, bottom up: `record`, `batch`, `holds`, `error` → `command` → `store`, `group` →
//! `rocks`, `postgres` → `open` → `writer`.

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

pub use batch::{Attempt, BatchRecord, BatchStatus, Inclusion};
pub use command::{
    AcceptOutcome, AcceptRequest, Applied, ApplyRequest, ApplyResults, Command, Evidence, Fence, HoldOutcome,
    HoldRequest, Refusal, Repeat, TransitionRequest,
};
pub use error::LedgerError;
pub use open::{open, open_read_only};
pub use postgres::{Imported, PgConnect, PgLedger};
pub use record::{AuthKey, LogEntry, PayerKey, PaymentId, PaymentRecord, Status, Submission, books};
pub use rocks::RocksLedger;
pub use store::{Fleet, GroupOutcome, LedgerStore};
pub use writer::{ANY_CHAIN, Arrivals, Follow, LedgerHandle};
