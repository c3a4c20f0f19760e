//! The ledger's RocksDB store: layout, schema check, reads, and the group logic, which
//! applies a batch of commands against the store plus its own uncommitted writes and
//! commits them as one synced `WriteBatch`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::U256;
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use super::batch::{BatchRecord, batch_key};
use super::holds::{Hold, Holds};
use super::record::{AuthKey, CorruptRecord, PayerKey, PaymentId, PaymentRecord, Status};
use super::writer::{
    AcceptOutcome, AcceptRequest, ApplyRequest, Command, HoldOutcome, HoldRequest, Repeat, TransitionRequest,
};
use crate::x402::Reason;

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
/// The settlement log: append-only, one entry per payment when it becomes final (settled,
/// failed, expired), under a u64 sequence of its own. What finance exports.
pub const CF_SETTLEMENT: &str = "settlement";
const CFS: [&str; 9] =
    [CF_AUTH, CF_SEQ, CF_ID, CF_IDEM, CF_EXPOSURE, CF_META, CF_PENDING, CF_BATCH, CF_SETTLEMENT];

/// The layout this code reads and writes. Bumped by any change older code cannot read.
/// 2: the `batch` and `settlement` column families (a version 1 ledger is upgraded in
/// place by creating them; a version 1 daemon cannot open a version 2 ledger).
pub const SCHEMA_VERSION: u32 = 2;
const META_SCHEMA: &[u8] = b"schema_version";

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
        "ledger at {path} was written by schema version {found}; this daemon reads up to {SCHEMA_VERSION}: \
         run a newer x402-batcher"
    )]
    NewerSchema { path: String, found: u32 },
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
    #[error("ledger write queue is full")]
    QueueFull,
    #[error("ledger writer has stopped")]
    WriterStopped,
}

fn db_err(op: &'static str, cf: &'static str) -> impl FnOnce(rocksdb::Error) -> LedgerError {
    move |source| LedgerError::Db { op, cf, source }
}

/// Every ledger commit is synced: an acknowledged payment must survive a power cut.
pub fn synced_write_options() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// The open ledger. Reads are safe from any thread; writes go through
/// [`Ledger::apply_group`], which only the writer thread calls.
pub struct Ledger {
    db: DB,
    path: PathBuf,
    last_seq: AtomicU64,
    /// Payments accepted and not final: counted once at open, then kept by each commit.
    pending: AtomicU64,
    /// Sequence number of the newest settlement log entry.
    last_settlement: AtomicU64,
    /// Verified payments held for their settlement (in memory only; see [`super::holds`]).
    /// Only the writer thread locks it.
    holds: parking_lot::Mutex<Holds>,
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
            return Err(LedgerError::NewerSchema { path: path.display().to_string(), found });
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
                return Err(LedgerError::NewerSchema { path: path.display().to_string(), found });
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

    /// Verified payments held and not yet claimed or lapsed (as of the last group).
    pub fn holds(&self) -> usize {
        self.holds.lock().len()
    }

    /// Payments accepted and not yet settled, failed or expired.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("every column family is created at open")
    }

    /// The sequence number of the newest committed change (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::SeqCst)
    }

    pub fn get(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        self.db
            .get_pinned_cf(self.cf(CF_AUTH), key.as_bytes())
            .map_err(db_err("get", CF_AUTH))?
            .map(|v| PaymentRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_AUTH, source }))
            .transpose()
    }

    pub fn get_by_id(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, LedgerError> {
        let Some(key) = self.db.get_pinned_cf(self.cf(CF_ID), id.0).map_err(db_err("get", CF_ID))? else {
            return Ok(None);
        };
        let key = AuthKey::from_bytes(&key)
            .ok_or(LedgerError::Corrupt { cf: CF_ID, source: CorruptRecord { field: "auth key" } })?;
        self.get(&key)
    }

    /// The payer's exposure: values accepted and not yet final.
    pub fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        self.db
            .get_pinned_cf(self.cf(CF_EXPOSURE), payer.as_bytes())
            .map_err(db_err("get", CF_EXPOSURE))?
            .map(|v| decode_u256(&v))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Every payer's exposure (for tests and status).
    pub fn exposures(&self) -> Result<Vec<(PayerKey, U256)>, LedgerError> {
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
    pub fn pending_records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
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
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<PaymentRecord>, LedgerError> {
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

    /// The sequence number of the newest settlement log entry (0: none yet).
    pub fn last_settlement(&self) -> u64 {
        self.last_settlement.load(Ordering::SeqCst)
    }

    /// Up to `limit` settlement log entries after `after`, with their sequence numbers: each
    /// payment's final record, once, in the order they became final.
    pub fn settlement_log(&self, after: u64, limit: usize) -> Result<Vec<(u64, PaymentRecord)>, LedgerError> {
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

    pub fn batch(&self, chain_id: u64, counter: u64) -> Result<Option<BatchRecord>, LedgerError> {
        self.db
            .get_pinned_cf(self.cf(CF_BATCH), batch_key(chain_id, counter))
            .map_err(db_err("get", CF_BATCH))?
            .map(|v| BatchRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_BATCH, source }))
            .transpose()
    }

    /// Every batch of `chain_id`, oldest first.
    pub fn batches(&self, chain_id: u64) -> Result<Vec<BatchRecord>, LedgerError> {
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
    pub fn last_batch_counter(&self, chain_id: u64) -> Result<u64, LedgerError> {
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
    pub fn records(&self) -> Result<Vec<PaymentRecord>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_AUTH), IteratorMode::Start) {
            let (_, v) = kv.map_err(db_err("iterate", CF_AUTH))?;
            out.push(
                PaymentRecord::decode(&v).map_err(|source| LedgerError::Corrupt { cf: CF_AUTH, source })?,
            );
        }
        Ok(out)
    }

    /// Applies `commands` in order as one group and commits them in one synced write.
    /// Each command gets its own result; if the commit fails, every command fails with the
    /// commit's error and nothing of the group is visible.
    pub fn apply_group(&self, commands: &[Command]) -> Vec<Result<Applied, LedgerError>> {
        self.apply_group_changes(commands).0
    }

    /// [`Ledger::apply_group`], also returning every record the group wrote (each as it
    /// stands after the group), for the writer to tell followers once it is durable.
    /// A failed commit stops the writer (the storage refuses writes from then on), so the
    /// in-memory holds this group changed need no undoing.
    pub fn apply_group_changes(
        &self,
        commands: &[Command],
    ) -> (Vec<Result<Applied, LedgerError>>, Vec<PaymentRecord>) {
        let mut holds = self.holds.lock();
        let mut group = Group::new(self, &mut holds);
        let results: Vec<_> = commands.iter().map(|c| group.apply(c)).collect();
        match group.commit() {
            Ok(changed) => (results, changed),
            Err(e) => (results.into_iter().map(|_| Err(e.clone())).collect(), Vec::new()),
        }
    }
}

/// What a command did.
#[derive(Debug, Clone)]
pub enum Applied {
    Accept(AcceptOutcome),
    Hold(HoldOutcome),
    Transition(PaymentRecord),
    Apply(Vec<Result<PaymentRecord, LedgerError>>),
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

fn decode_u256(v: &[u8]) -> Result<U256, LedgerError> {
    <[u8; 32]>::try_from(v)
        .map(U256::from_be_bytes)
        .map_err(|_| LedgerError::Corrupt { cf: CF_EXPOSURE, source: CorruptRecord { field: "exposure" } })
}

/// One group of commands: the store plus this group's uncommitted writes, so later
/// commands in the group see earlier ones (two submissions of one nonce in one group
/// conflict exactly as in two groups).
struct Group<'a> {
    ledger: &'a Ledger,
    holds: &'a mut Holds,
    batch: WriteBatch,
    records: HashMap<AuthKey, PaymentRecord>,
    exposures: HashMap<PayerKey, U256>,
    idem: HashMap<String, AuthKey>,
    next_seq: u64,
    /// Change of the pending count this group makes.
    pending_delta: i64,
    next_settlement: u64,
}

impl<'a> Group<'a> {
    fn new(ledger: &'a Ledger, holds: &'a mut Holds) -> Self {
        Self {
            ledger,
            holds,
            batch: WriteBatch::default(),
            records: HashMap::new(),
            exposures: HashMap::new(),
            idem: HashMap::new(),
            next_seq: ledger.last_seq() + 1,
            pending_delta: 0,
            next_settlement: ledger.last_settlement() + 1,
        }
    }

    fn record(&self, key: &AuthKey) -> Result<Option<PaymentRecord>, LedgerError> {
        match self.records.get(key) {
            Some(r) => Ok(Some(r.clone())),
            None => self.ledger.get(key),
        }
    }

    fn exposure(&self, payer: &PayerKey) -> Result<U256, LedgerError> {
        match self.exposures.get(payer) {
            Some(e) => Ok(*e),
            None => self.ledger.exposure(payer),
        }
    }

    fn idem_key(&self, k: &str) -> Result<Option<AuthKey>, LedgerError> {
        if let Some(key) = self.idem.get(k) {
            return Ok(Some(*key));
        }
        let stored = self
            .ledger
            .db
            .get_pinned_cf(self.ledger.cf(CF_IDEM), k.as_bytes())
            .map_err(db_err("get", CF_IDEM))?;
        stored
            .map(|v| {
                AuthKey::from_bytes(&v)
                    .ok_or(LedgerError::Corrupt { cf: CF_IDEM, source: CorruptRecord { field: "auth key" } })
            })
            .transpose()
    }

    fn apply(&mut self, command: &Command) -> Result<Applied, LedgerError> {
        match command {
            Command::Accept(req, _) => self.accept(req).map(Applied::Accept),
            Command::Hold(req, _) => self.hold(req).map(Applied::Hold),
            Command::Transition(req, _) => self.transition(req).map(Applied::Transition),
            Command::Apply(req, _) => self.apply_request(req).map(Applied::Apply),
        }
    }

    /// A settlement step: payment transitions and the batch record they belong to. When
    /// `atomic`, either every transition is legal and all apply with the batch, or nothing
    /// does and the first refusal is the answer.
    fn apply_request(
        &mut self,
        req: &ApplyRequest,
    ) -> Result<Vec<Result<PaymentRecord, LedgerError>>, LedgerError> {
        if req.atomic {
            let mut seen = std::collections::HashSet::new();
            for t in &req.transitions {
                if !seen.insert(t.key) {
                    return Err(LedgerError::IllegalTransition {
                        id: t.key.payment_id(),
                        from: t.to,
                        to: t.to,
                    });
                }
                self.check_transition(t)?;
            }
        }
        let results = req.transitions.iter().map(|t| self.transition(t)).collect();
        if let Some(batch) = &req.batch {
            self.batch.put_cf(self.ledger.cf(CF_BATCH), batch.key(), batch.encode());
        }
        Ok(results)
    }

    fn check_transition(&self, req: &TransitionRequest) -> Result<PaymentRecord, LedgerError> {
        let record = self.record(&req.key)?.ok_or(LedgerError::NotFound(req.key.payment_id()))?;
        if !record.status.can_move_to(req.to) || req.only_from.is_some_and(|s| s != record.status) {
            return Err(LedgerError::IllegalTransition {
                id: req.key.payment_id(),
                from: record.status,
                to: req.to,
            });
        }
        Ok(record)
    }

    /// What every acceptance and hold checks first, in this order: the idempotency key, a
    /// record of the authorization, a hold on it. `Err` is the answer; `Ok` carries the live
    /// hold on the key, if any, for the caller to judge.
    fn precheck(&mut self, req: &AcceptRequest) -> Result<Result<Option<Hold>, Prechecked>, LedgerError> {
        self.holds.lapse(req.now_ms);
        let key = AuthKey::of(&req.signed);
        let idem = &req.submission.idempotency_key;
        if !idem.is_empty()
            && let Some(named) = self.idem_key(idem)?
            && named != key
        {
            return Ok(Err(Prechecked::Refused {
                reason: Reason::InvalidPayload,
                message: format!("idempotency key {idem:?} already names payment {}", named.payment_id()),
            }));
        }
        if let Some(existing) = self.record(&key)? {
            // The same transfer again (a retry, a replay, a second API server) is the same
            // payment, whatever signature bytes carry it; a different transfer under a used
            // nonce is a double spend.
            let (a, b) = (&existing.signed.authorization, &req.signed.authorization);
            return Ok(Err(if a == b {
                let repeat = Repeat::of(&existing, idem);
                Prechecked::Recorded(existing, repeat)
            } else {
                Prechecked::Refused {
                    reason: Reason::NonceAlreadyUsed,
                    message: format!(
                        "nonce {} of {} is already used by payment {}",
                        b.nonce,
                        b.from,
                        existing.payment_id()
                    ),
                }
            }));
        }
        Ok(Ok(self.holds.get(&key, req.now_ms).cloned()))
    }

    /// The window, then the payer's cover: what is pending, what is held, and this
    /// payment. `Ok` with the payer's exposure once this payment is recorded.
    fn cover(&mut self, req: &AcceptRequest) -> Result<Result<U256, (Reason, String)>, LedgerError> {
        if let Err(e) = &req.window {
            return Ok(Err((e.reason(), e.to_string())));
        }
        let payer = AuthKey::of(&req.signed).payer();
        let exposure = self.exposure(&payer)?;
        let held = self.holds.held(&payer);
        let value = req.signed.authorization.value;
        let needed = exposure.saturating_add(value);
        if needed.saturating_add(held) > req.balance {
            let held =
                if held.is_zero() { String::new() } else { format!(", {held} held for verified payments") };
            return Ok(Err((
                Reason::InsufficientFunds,
                format!(
                    "balance {} of {} does not cover {} already pending{held} plus {}",
                    req.balance, req.signed.authorization.from, exposure, value
                ),
            )));
        }
        Ok(Ok(needed))
    }

    /// Holds a verified payment: refused or answered like an acceptance, but nothing is
    /// written; the payment is reserved until it is claimed or lapses.
    fn hold(&mut self, req: &HoldRequest) -> Result<HoldOutcome, LedgerError> {
        let accept = &req.accept;
        let key = AuthKey::of(&accept.signed);
        let live = match self.precheck(accept)? {
            Err(Prechecked::Recorded(record, repeat)) => return Ok(HoldOutcome::Recorded(record, repeat)),
            Err(Prechecked::Refused { reason, message }) => {
                return Ok(HoldOutcome::Refused { reason, message });
            }
            Ok(live) => live,
        };
        if let Some(hold) = live {
            let idem = &accept.submission.idempotency_key;
            // The same verification again, named by its payment-identifier: the first answer.
            if hold.authorization == accept.signed.authorization
                && !idem.is_empty()
                && hold.idempotency_key == *idem
            {
                return Ok(HoldOutcome::Held { expires_at_ms: hold.expires_at_ms });
            }
            return Ok(HoldOutcome::Refused {
                reason: Reason::NonceAlreadyUsed,
                message: format!(
                    "nonce {} of {} is held by a verification in progress (payment {}): a payment is \
                     verified once",
                    accept.signed.authorization.nonce,
                    accept.signed.authorization.from,
                    key.payment_id()
                ),
            });
        }
        if let Err((reason, message)) = self.cover(accept)? {
            return Ok(HoldOutcome::Refused { reason, message });
        }
        let expires_at_ms = accept.now_ms.saturating_add(req.hold_ms);
        self.holds.insert(
            key,
            Hold {
                authorization: accept.signed.authorization.clone(),
                idempotency_key: accept.submission.idempotency_key.clone(),
                expires_at_ms,
            },
        );
        Ok(HoldOutcome::Held { expires_at_ms })
    }

    fn accept(&mut self, req: &AcceptRequest) -> Result<AcceptOutcome, LedgerError> {
        let key = AuthKey::of(&req.signed);
        let live = match self.precheck(req)? {
            Err(Prechecked::Recorded(record, repeat)) => return Ok(AcceptOutcome::Duplicate(record, repeat)),
            Err(Prechecked::Refused { reason, message }) => {
                return Ok(AcceptOutcome::Refused { reason, message });
            }
            Ok(live) => live,
        };
        if let Some(hold) = live {
            if hold.authorization != req.signed.authorization {
                return Ok(AcceptOutcome::Refused {
                    reason: Reason::NonceAlreadyUsed,
                    message: format!(
                        "nonce {} of {} is held by a verification of another authorization",
                        req.signed.authorization.nonce, req.signed.authorization.from
                    ),
                });
            }
            // The acceptance claims the hold: its value moves from held to pending below
            // (or, refused, is released: a claim is made once).
            self.holds.remove(&key);
        }
        let needed = match self.cover(req)? {
            Ok(needed) => needed,
            Err((reason, message)) => return Ok(AcceptOutcome::Refused { reason, message }),
        };
        let payer = key.payer();

        let record = PaymentRecord {
            status: Status::Accepted,
            signed: req.signed.clone(),
            submission: req.submission.clone(),
            accepted_at_ms: req.now_ms,
            updated_at_ms: req.now_ms,
            seq: 0,
            failure_reason: String::new(),
            failure_message: String::new(),
            batch_id: String::new(),
            tx_hash: None,
            block_number: 0,
            block_hash: None,
            block_time: 0,
            log_index: 0,
            gas_share: 0,
            fee_share_wei: U256::ZERO,
        };
        let record = self.write(record);
        self.batch.put_cf(self.ledger.cf(CF_ID), key.payment_id().0, key.as_bytes());
        if !req.submission.idempotency_key.is_empty() {
            self.batch.put_cf(
                self.ledger.cf(CF_IDEM),
                req.submission.idempotency_key.as_bytes(),
                key.as_bytes(),
            );
            self.idem.insert(req.submission.idempotency_key.clone(), key);
        }
        self.set_exposure(payer, needed);
        self.batch.put_cf(self.ledger.cf(CF_PENDING), key.as_bytes(), []);
        self.pending_delta += 1;
        Ok(AcceptOutcome::Accepted(record))
    }

    fn transition(&mut self, req: &TransitionRequest) -> Result<PaymentRecord, LedgerError> {
        let mut record = self.check_transition(req)?;
        if req.to.is_final() {
            let payer = req.key.payer();
            let exposure = self.exposure(&payer)?;
            self.set_exposure(payer, exposure.saturating_sub(record.value()));
            self.batch.delete_cf(self.ledger.cf(CF_PENDING), req.key.as_bytes());
            self.pending_delta -= 1;
        }
        record.status = req.to;
        record.updated_at_ms = req.now_ms;
        if let Some((reason, message)) = &req.failure {
            record.failure_reason = reason.code().to_owned();
            record.failure_message = message.clone();
        }
        if let Some(batch_id) = &req.batch_id {
            record.batch_id = batch_id.clone();
        }
        if let Some(ev) = &req.evidence {
            record.tx_hash = Some(ev.tx_hash);
            record.block_number = ev.block_number;
            record.block_hash = Some(ev.block_hash);
            record.block_time = ev.block_time;
            record.log_index = ev.log_index;
            record.gas_share = ev.gas_share;
            record.fee_share_wei = ev.fee_share_wei;
        }
        let record = self.write(record);
        if record.status.is_final() {
            // Final states have no way out, so this runs once per payment.
            self.batch.put_cf(
                self.ledger.cf(CF_SETTLEMENT),
                self.next_settlement.to_be_bytes(),
                record.encode(),
            );
            self.next_settlement += 1;
        }
        Ok(record)
    }

    /// Stamps the next sequence number on `record` and writes it under its key and its seq.
    fn write(&mut self, mut record: PaymentRecord) -> PaymentRecord {
        record.seq = self.next_seq;
        self.next_seq += 1;
        let key = record.key();
        let bytes = record.encode();
        self.batch.put_cf(self.ledger.cf(CF_SEQ), record.seq.to_be_bytes(), &bytes);
        self.batch.put_cf(self.ledger.cf(CF_AUTH), key.as_bytes(), bytes);
        self.records.insert(key, record.clone());
        record
    }

    fn set_exposure(&mut self, payer: PayerKey, value: U256) {
        if value.is_zero() {
            self.batch.delete_cf(self.ledger.cf(CF_EXPOSURE), payer.as_bytes());
        } else {
            self.batch.put_cf(self.ledger.cf(CF_EXPOSURE), payer.as_bytes(), value.to_be_bytes::<32>());
        }
        self.exposures.insert(payer, value);
    }

    /// Commits the group; returns the records it wrote.
    fn commit(self) -> Result<Vec<PaymentRecord>, LedgerError> {
        if self.batch.is_empty() {
            return Ok(Vec::new());
        }
        self.ledger.db.write_opt(self.batch, &synced_write_options()).map_err(db_err("write", "*"))?;
        self.ledger.last_seq.store(self.next_seq - 1, Ordering::SeqCst);
        self.ledger.last_settlement.store(self.next_settlement - 1, Ordering::SeqCst);
        // Only the writer commits, so this read-modify-write does not race.
        let pending = self.ledger.pending().saturating_add_signed(self.pending_delta);
        self.ledger.pending.store(pending, Ordering::SeqCst);
        Ok(self.records.into_values().collect())
    }
}

/// An answer the checks shared by acceptances and holds reached early.
enum Prechecked {
    Recorded(PaymentRecord, Repeat),
    Refused { reason: Reason, message: String },
}
