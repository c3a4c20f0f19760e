//! The ledger on RocksDB, the embedded default: its layout (column families, schema
//! version) and opening it (or reading it beside a running daemon); its reads are
//! [`read`], the seam's implementation [`store`] (the shared rules of
//! [`crate::ledger::group`], committed as one synced `WriteBatch`).
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
//! | `watch` | auth key of every settled payment whose block is not yet final | (empty) |
//! | `batch` | chain id ‖ batch counter (u64 BE each) | the batch record |
//! | `settlement` | log sequence number (u64 BE) | a payment's final record, once |
//! | `meta` | name | schema version, ... |

mod read;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::U256;
use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteOptions};

use super::error::LedgerError;
use super::holds::Holds;
use super::record::CorruptRecord;

pub const CF_AUTH: &str = "auth";
pub const CF_SEQ: &str = "seq";
pub const CF_ID: &str = "id";
pub const CF_IDEM: &str = "idem";
pub const CF_EXPOSURE: &str = "exposure";
pub const CF_META: &str = "meta";
/// Keys of payments not yet final, so the audit and recovery never scan the whole history.
pub const CF_PENDING: &str = "pending";
/// Settlement batches, under `chain_id ‖ counter`.
pub const CF_BATCH: &str = "batch";
/// The settlement log: append-only, under a u64 sequence of its own: one entry per payment
/// when it becomes final (settled, failed, expired), and for a settled one, later, one when
/// a reorg corrects or reverses it and one when its block is final on chain. What finance
/// exports.
pub const CF_SETTLEMENT: &str = "settlement";
/// Keys of settled payments whose block is not yet final on chain: watched for reorgs.
pub const CF_WATCH: &str = "watch";
const CFS: [&str; 10] =
    [CF_AUTH, CF_SEQ, CF_ID, CF_IDEM, CF_EXPOSURE, CF_META, CF_PENDING, CF_BATCH, CF_SETTLEMENT, CF_WATCH];

/// The layout this code reads and writes. Bumped by any change older code cannot read.
/// 2: the `batch` and `settlement` column families (a version 1 ledger is upgraded in
/// place by creating them; a version 1 daemon cannot open a version 2 ledger).
/// 3: the `watch` column family (settled payments followed to finality); payments settled
/// before it are not watched.
pub const SCHEMA_VERSION: u32 = 3;
const META_SCHEMA: &[u8] = b"schema_version";

/// Every ledger commit is synced: an acknowledged payment must survive a power cut.
pub fn synced_write_options() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// The open ledger. Reads are safe from any thread; writes go through
/// [`crate::ledger::LedgerStore::apply_group`], which only the writer thread calls.
pub struct RocksLedger {
    pub(super) db: DB,
    path: PathBuf,
    pub(super) last_seq: AtomicU64,
    /// Payments accepted and not final: counted once at open, then kept by each commit.
    pub(super) pending: AtomicU64,
    /// Sequence number of the newest settlement log entry.
    pub(super) last_settlement: AtomicU64,
    /// Verified payments held for their settlement (in memory only; see [`super::holds`]).
    /// Only the writer thread locks it.
    pub(super) holds: parking_lot::Mutex<Holds>,
}

impl std::fmt::Debug for RocksLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksLedger").field("path", &self.path).field("last_seq", &self.last_seq()).finish()
    }
}

impl RocksLedger {
    /// Opens (or creates) the ledger at `path`, refusing one written by a newer schema.
    pub fn open(path: &Path) -> Result<RocksLedger, LedgerError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Every write is synced anyway; a larger WAL-backed memtable just batches flushes.
        opts.set_write_buffer_size(64 << 20);
        let cfs = CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n)));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(db_err("open", "*"))?;
        let ledger = RocksLedger::over(db, path);
        if let Some(found) = ledger.stored_schema()?
            && found > SCHEMA_VERSION
        {
            return Err(LedgerError::NewerSchema {
                path: path.display().to_string(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        // New or older: the missing column families were created at open; record the
        // version so an older daemon refuses this ledger with a clear message.
        ledger
            .db
            .put_cf_opt(
                ledger.cf(CF_META),
                META_SCHEMA,
                SCHEMA_VERSION.to_be_bytes(),
                &synced_write_options(),
            )
            .map_err(db_err("put", CF_META))?;
        ledger.count()?;
        Ok(ledger)
    }

    /// Opens an existing ledger for reading only, beside a daemon that has it open (finance
    /// exports, reconciliation). It sees every commit durable at the time it opens (the
    /// write-ahead log included) and never writes. A ledger of another schema is refused:
    /// the daemon upgrades an older one when it starts.
    pub fn open_read_only(path: &Path) -> Result<RocksLedger, LedgerError> {
        let opts = Options::default();
        let cfs = CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n)));
        let db = DB::open_cf_descriptors_read_only(&opts, path, cfs, false).map_err(db_err("open", "*"))?;
        let ledger = RocksLedger::over(db, path);
        match ledger.stored_schema()? {
            Some(SCHEMA_VERSION) => {}
            Some(found) if found > SCHEMA_VERSION => {
                return Err(LedgerError::NewerSchema {
                    path: path.display().to_string(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            found => {
                return Err(LedgerError::OlderSchema {
                    path: path.display().to_string(),
                    found: found.unwrap_or(0),
                });
            }
        }
        ledger.count()?;
        Ok(ledger)
    }

    fn stored_schema(&self) -> Result<Option<u32>, LedgerError> {
        let stored = self.db.get_cf(self.cf(CF_META), META_SCHEMA).map_err(db_err("get", CF_META))?;
        stored
            .map(|v| {
                <[u8; 4]>::try_from(v.as_slice()).map(u32::from_be_bytes).map_err(|_| LedgerError::Corrupt {
                    cf: CF_META,
                    source: CorruptRecord { field: "schema_version" },
                })
            })
            .transpose()
    }

    /// A ledger over an open database, its counters not yet read ([`Self::count`]).
    fn over(db: DB, path: &Path) -> RocksLedger {
        RocksLedger {
            db,
            path: path.to_owned(),
            last_seq: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            last_settlement: AtomicU64::new(0),
            holds: parking_lot::Mutex::new(Holds::default()),
        }
    }

    /// Reads the counters kept in memory: last sequence numbers and pending payments.
    fn count(&self) -> Result<(), LedgerError> {
        self.last_seq.store(self.last_seq_in(CF_SEQ)?, Ordering::SeqCst);
        self.last_settlement.store(self.last_seq_in(CF_SETTLEMENT)?, Ordering::SeqCst);
        let mut pending = 0u64;
        for kv in self.db.iterator_cf(self.cf(CF_PENDING), IteratorMode::Start) {
            kv.map_err(db_err("iterate", CF_PENDING))?;
            pending += 1;
        }
        self.pending.store(pending, Ordering::SeqCst);
        Ok(())
    }

    /// The highest sequence number keying `cf` (0 when it is empty).
    fn last_seq_in(&self, cf: &'static str) -> Result<u64, LedgerError> {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::End)
            .next()
            .transpose()
            .map_err(db_err("iterate", cf))?
            .map(|(k, _)| seq_from_key(&k))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("every column family is created at open")
    }
}

/// Per column family tuning. `auth` and `id` are looked up once per submission, almost
/// always for a key that does not exist yet; bloom filters (in the memtable and in the
/// table files) answer those misses without walking the skiplist or reading blocks. 10 bits
/// per key: ~1% false positives.
fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    if name == CF_AUTH || name == CF_ID {
        o.set_memtable_whole_key_filtering(true);
        o.set_memtable_prefix_bloom_ratio(0.1);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        o.set_block_based_table_factory(&table);
    }
    o
}

fn seq_from_key(k: &[u8]) -> Result<u64, LedgerError> {
    <[u8; 8]>::try_from(k)
        .map(u64::from_be_bytes)
        .map_err(|_| LedgerError::Corrupt { cf: CF_SEQ, source: CorruptRecord { field: "sequence key" } })
}

pub(super) fn decode_u256(v: &[u8]) -> Result<U256, LedgerError> {
    <[u8; 32]>::try_from(v)
        .map(U256::from_be_bytes)
        .map_err(|_| LedgerError::Corrupt { cf: CF_EXPOSURE, source: CorruptRecord { field: "exposure" } })
}

/// A RocksDB error as the ledger's, naming the operation and the column family.
fn db_err(op: &'static str, cf: &'static str) -> impl FnOnce(rocksdb::Error) -> LedgerError {
    move |source| LedgerError::Storage { op, place: cf, source: Arc::new(source) }
}
