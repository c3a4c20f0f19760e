//! The durable nonce ledger (RocksDB): the double-spend guard, per-payer exposure, the
//! lifecycle of every payment, and the ordered change log `WatchPayments` and recovery read.
//!
//! - [`batch`]: settlement batches (items, settler, signed attempts, inclusion);
//! - [`holds`]: verified payments reserved (in memory) until their settlement claims them;
//! - [`record`]: keys, lifecycle states, the payment record and its on-disk codec;
//! - [`store`]: the RocksDB layout, schema check, reads, and the group logic that turns a
//!   batch of commands into one atomic `WriteBatch`;
//! - [`writer`]: the single writer thread that drains its queue into synced group commits
//!   and answers each command only after its group is on disk.
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
pub mod holds;
pub mod record;
pub mod store;
pub mod writer;

pub use batch::{Attempt, BatchRecord, BatchStatus, Inclusion};
pub use record::{AuthKey, PayerKey, PaymentId, PaymentRecord, Status, Submission};
pub use store::{Ledger, LedgerError};
pub use writer::{
    AcceptOutcome, AcceptRequest, ApplyRequest, ApplyResults, Command, Evidence, Follow, HoldOutcome,
    HoldRequest, LedgerHandle, Repeat, TransitionRequest,
};
