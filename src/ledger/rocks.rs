//! The ledger on RocksDB: its layout (column families, schema version), opening it (or
//! reading it beside a running daemon), and its reads. The group logic that turns commands
//! into one synced `WriteBatch` is [`super::group`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::U256;
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteOptions};

use super::batch::{BatchRecord, batch_key};
use super::error::{LedgerError, db_err};
use super::holds::Holds;
use super::record::{AuthKey, CorruptRecord, PayerKey, PaymentId, PaymentRecord};

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
/// [`super::LedgerStore::apply_group`], which only the writer thread calls.
pub struct Ledger {
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

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).field("last_seq", &self.last_seq()).finish()
    }
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`, refusing one written by a newer schema.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Every write is synced anyway; a larger WAL-backed memtable just batches flushes.
        opts.set_write_buffer_size(64 << 20);
        let cfs = CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n)));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(db_err("open", "*"))?;
        let ledger = Ledger::over(db, path);
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
    pub fn open_read_only(path: &Path) -> Result<Ledger, LedgerError> {
        let opts = Options::default();
        let cfs = CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n)));
        let db = DB::open_cf_descriptors_read_only(&opts, path, cfs, false).map_err(db_err("open", "*"))?;
        let ledger = Ledger::over(db, path);
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
    fn over(db: DB, path: &Path) -> Ledger {
        Ledger {
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

/// Reads: the [`LedgerStore`] implementation ([`super::store`]) and the group logic use them.
impl Ledger {
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
