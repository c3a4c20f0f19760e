//! The single ledger writer: one OS thread drains a bounded queue of commands, applies
//! each drained group with [`Ledger::apply_group`], commits it with one synced write, and
//! only then answers every command of the group. One writer means conflicts (a nonce used
//! twice, a payer's balance) are decided in one place, in one order; grouping means one
//! fsync (~90 µs) is shared by every payment that arrived while the previous one ran.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use alloy::primitives::{B256, U256};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use tokio::sync::{broadcast, oneshot, watch};

use super::batch::BatchRecord;
use super::record::{AuthKey, PaymentRecord, Status, Submission};
use super::store::{Applied, Ledger, LedgerError};
use crate::admission::AdmissionError;
use crate::x402::{Reason, SignedAuthorization};

/// Most commands committed in one write. Bounds the latency a group adds to its first
/// command; 512 puts in one synced WriteBatch cost a few ms on these disks.
pub const MAX_GROUP: usize = 512;

/// Capacity of the change notifications `WatchPayments` follows. A subscriber that falls
/// further behind re-reads the `seq` column family, so nothing is lost.
const CHANGE_CAPACITY: usize = 1024;

/// A verified payment to record.
#[derive(Debug, Clone)]
pub struct AcceptRequest {
    pub signed: SignedAuthorization,
    pub submission: Submission,
    /// The payer's on-chain balance as last read; must cover exposure plus this payment.
    pub balance: U256,
    /// The validity-window check, made by the caller against its clock. Judged by the
    /// writer so that a retry of an already recorded payment is answered as a duplicate
    /// even once its window has closed.
    pub window: Result<(), AdmissionError>,
    pub now_ms: u64,
}

/// How a submission relates to what the ledger holds for its authorization, and so
/// whether the API server may serve for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repeat {
    /// Recorded now: the first acceptance. Serve.
    New,
    /// Recorded before under the same, non-empty idempotency key (an x402
    /// `payment-identifier`): the same submission again, one payment. Serve the same
    /// answer again.
    Retry,
    /// Recorded before, and this submission does not carry the key it was recorded with
    /// (a resent header, a second API server): do not serve for it.
    Replay,
}

impl Repeat {
    /// Judges a resubmission of `existing` carrying `idempotency_key`.
    pub fn of(existing: &PaymentRecord, idempotency_key: &str) -> Repeat {
        if !idempotency_key.is_empty() && existing.submission.idempotency_key == idempotency_key {
            Repeat::Retry
        } else {
            Repeat::Replay
        }
    }
}

/// The ledger's answer to an [`AcceptRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// Newly recorded, durably.
    Accepted(PaymentRecord),
    /// Recorded before: the record as it stands now, and whether this submission is a
    /// [`Repeat::Retry`] or a [`Repeat::Replay`] of the one recorded.
    Duplicate(PaymentRecord, Repeat),
    /// Not recorded, for this reason.
    Refused { reason: Reason, message: String },
}

/// A verified payment to hold (see [`super::holds`]): the same checks as an acceptance,
/// then a reservation for `hold_ms` instead of a record.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub accept: AcceptRequest,
    pub hold_ms: u64,
}

/// The ledger's answer to a [`HoldRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Held (now, or already by a verification with the same idempotency key) until then
    /// (Unix ms).
    Held { expires_at_ms: u64 },
    /// Already recorded: the record, and how this verification relates to it.
    Recorded(PaymentRecord, Repeat),
    /// Neither held nor recorded, for this reason.
    Refused { reason: Reason, message: String },
}

/// On-chain evidence of a payment's inclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    pub tx_hash: B256,
    pub block_number: u64,
    pub block_hash: B256,
    pub block_time: u64,
    pub log_index: u64,
    /// The payment's share of the transaction's gas used and of its fee (wei).
    pub gas_share: u64,
    pub fee_share_wei: U256,
}

/// A lifecycle step for one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRequest {
    pub key: AuthKey,
    /// Apply only if the payment is still in this state (a decision made on an older read
    /// must not overtake a newer one).
    pub only_from: Option<Status>,
    pub to: Status,
    pub failure: Option<(Reason, String)>,
    pub batch_id: Option<String>,
    pub evidence: Option<Evidence>,
    pub now_ms: u64,
}

impl TransitionRequest {
    pub fn new(key: AuthKey, to: Status, now_ms: u64) -> Self {
        Self { key, only_from: None, to, failure: None, batch_id: None, evidence: None, now_ms }
    }
}

/// A settlement step: transitions of payments and the batch record they belong to, written
/// in one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyRequest {
    pub transitions: Vec<TransitionRequest>,
    pub batch: Option<BatchRecord>,
    /// All transitions or none (the batch is written only with them).
    pub atomic: bool,
}

/// Each transition's result, in order.
pub type ApplyResults = Vec<Result<PaymentRecord, LedgerError>>;

/// A command with its reply channel.
#[derive(Debug)]
pub enum Command {
    Accept(AcceptRequest, oneshot::Sender<Result<AcceptOutcome, LedgerError>>),
    Hold(HoldRequest, oneshot::Sender<Result<HoldOutcome, LedgerError>>),
    Transition(TransitionRequest, oneshot::Sender<Result<PaymentRecord, LedgerError>>),
    Apply(ApplyRequest, oneshot::Sender<Result<ApplyResults, LedgerError>>),
}

impl Command {
    pub fn accept(req: AcceptRequest) -> (Command, oneshot::Receiver<Result<AcceptOutcome, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Accept(req, tx), rx)
    }

    pub fn hold(req: HoldRequest) -> (Command, oneshot::Receiver<Result<HoldOutcome, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Hold(req, tx), rx)
    }

    pub fn transition(
        req: TransitionRequest,
    ) -> (Command, oneshot::Receiver<Result<PaymentRecord, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Transition(req, tx), rx)
    }

    pub fn apply(req: ApplyRequest) -> (Command, oneshot::Receiver<Result<ApplyResults, LedgerError>>) {
        let (tx, rx) = oneshot::channel();
        (Command::Apply(req, tx), rx)
    }

    fn reply(self, result: Result<Applied, LedgerError>) {
        // A dropped receiver (the client went away) changes nothing: the group is committed.
        match self {
            Command::Accept(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Accept(o) => o,
                    _ => unreachable!("an accept applies as an accept"),
                }));
            }
            Command::Hold(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Hold(o) => o,
                    _ => unreachable!("a hold applies as a hold"),
                }));
            }
            Command::Transition(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Transition(r) => r,
                    _ => unreachable!("a transition applies as a transition"),
                }));
            }
            Command::Apply(_, tx) => {
                let _ = tx.send(result.map(|a| match a {
                    Applied::Apply(r) => r,
                    _ => unreachable!("an apply applies as an apply"),
                }));
            }
        }
    }
}

/// What travels on the writer's queue.
enum Msg {
    Command(Command),
    /// Commit everything queued before this, then stop.
    Stop,
}

/// A handle to the writer. Cloning shares the writer; the writer thread ends on
/// [`LedgerHandle::stop`] or when the last handle is dropped, after committing what is
/// queued before.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: Sender<Msg>,
    ledger: Arc<Ledger>,
    changes: broadcast::Sender<u64>,
    /// Set once, when a commit fails on the storage: why the writer stopped.
    failed: tokio::sync::watch::Receiver<Option<String>>,
    /// When the commit in progress started (ms after `epoch`, plus one); 0 when none is.
    commit_started: Arc<std::sync::atomic::AtomicU64>,
    epoch: std::time::Instant,
    /// Followers of single payments ([`LedgerHandle::follow`]).
    watchers: Arc<Watchers>,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle").field("ledger", &self.ledger).finish()
    }
}

impl LedgerHandle {
    /// Starts the writer thread over `ledger` with a queue of `queue_capacity` commands.
    pub fn start(
        ledger: Arc<Ledger>,
        queue_capacity: usize,
    ) -> std::io::Result<(LedgerHandle, JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::bounded(queue_capacity.max(1));
        let (changes, _) = broadcast::channel(CHANGE_CAPACITY);
        let (failed_tx, failed) = tokio::sync::watch::channel(None);
        let commit_started = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let epoch = std::time::Instant::now();
        let watchers = Arc::new(Watchers::default());
        let thread = {
            let ledger = Arc::clone(&ledger);
            let notify = Notify { changes: changes.clone(), watchers: Arc::clone(&watchers) };
            let timer = CommitTimer { started: Arc::clone(&commit_started), epoch };
            std::thread::Builder::new()
                .name("ledger-writer".into())
                .spawn(move || run(&ledger, &rx, &notify, &failed_tx, &timer))?
        };
        Ok((LedgerHandle { tx, ledger, changes, failed, commit_started, epoch, watchers }, thread))
    }

    /// How long the commit in progress has been running, if one is. A commit that does
    /// not return (storage that blocks instead of failing) shows here.
    pub fn commit_running_for(&self) -> Option<std::time::Duration> {
        match self.commit_started.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            at => Some(self.epoch.elapsed().saturating_sub(std::time::Duration::from_millis(at - 1))),
        }
    }

    /// Resolves with the cause once a commit failed on the storage (a full disk, an I/O
    /// error): the writer has stopped, and every later command gets WriterStopped.
    pub async fn failure(&self) -> String {
        let mut failed = self.failed.clone();
        let cause = failed.wait_for(Option::is_some).await.map(|c| c.clone().unwrap_or_default());
        match cause {
            Ok(cause) => cause,
            // The writer ended without failing (a clean stop): never resolves.
            Err(_) => std::future::pending().await,
        }
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Commands waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    /// Notifications of the newest committed sequence number.
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Asks the writer to commit what is queued and stop; later commands get
    /// [`LedgerError::WriterStopped`]. Blocks while the queue is full.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }

    /// Records a verified payment; answers once the decision is on disk.
    pub async fn accept(&self, req: AcceptRequest) -> Result<AcceptOutcome, LedgerError> {
        let (cmd, rx) = Command::accept(req);
        self.send(cmd)?;
        rx.await.map_err(|_| LedgerError::WriterStopped)?
    }

    /// Holds a verified payment for `req.hold_ms` (nothing is written to disk).
    pub async fn hold(&self, req: HoldRequest) -> Result<HoldOutcome, LedgerError> {
        let (cmd, rx) = Command::hold(req);
        self.send(cmd)?;
        rx.await.map_err(|_| LedgerError::WriterStopped)?
    }

    /// Follows one payment: the returned [`Follow`] sees every committed change of its
    /// record from now on, starting with the record as it stands.
    pub fn follow(&self, key: AuthKey) -> Result<Follow, LedgerError> {
        let rx = self.watchers.register(key);
        let follow = Follow { key, rx, watchers: Arc::clone(&self.watchers) };
        // Registered before this read: a change committed after it is both read here or
        // sent by the writer, and the newer of the two (by seq) is kept.
        if let Some(record) = self.ledger.get(&key)? {
            self.watchers.offer(&record);
        }
        Ok(follow)
    }

    /// Moves a payment along its lifecycle; answers once the change is on disk.
    pub async fn transition(&self, req: TransitionRequest) -> Result<PaymentRecord, LedgerError> {
        let (cmd, rx) = Command::transition(req);
        self.send(cmd)?;
        rx.await.map_err(|_| LedgerError::WriterStopped)?
    }

    /// Writes a settlement step; answers once it is on disk.
    pub async fn apply(&self, req: ApplyRequest) -> Result<ApplyResults, LedgerError> {
        let (cmd, rx) = Command::apply(req);
        self.send(cmd)?;
        rx.await.map_err(|_| LedgerError::WriterStopped)?
    }

    fn send(&self, cmd: Command) -> Result<(), LedgerError> {
        self.tx.try_send(Msg::Command(cmd)).map_err(|e| match e {
            TrySendError::Full(_) => LedgerError::QueueFull,
            TrySendError::Disconnected(_) => LedgerError::WriterStopped,
        })
    }
}

/// Followers of single payments, by key: each holds the newest committed record.
#[derive(Default)]
struct Watchers(Mutex<HashMap<AuthKey, watch::Sender<Option<PaymentRecord>>>>);

impl Watchers {
    fn register(&self, key: AuthKey) -> watch::Receiver<Option<PaymentRecord>> {
        self.0.lock().entry(key).or_insert_with(|| watch::channel(None).0).subscribe()
    }

    /// Publishes `record` to its followers, if any, unless they hold a newer one.
    fn offer(&self, record: &PaymentRecord) {
        if let Some(tx) = self.0.lock().get(&record.key()) {
            tx.send_if_modified(|current| {
                let newer = current.as_ref().is_none_or(|c| c.seq < record.seq);
                if newer {
                    *current = Some(record.clone());
                }
                newer
            });
        }
    }

    /// After one follower of `key` went: forgets the key when it was the last.
    fn release(&self, key: &AuthKey) {
        let mut map = self.0.lock();
        if map.get(key).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(key);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }
}

/// One payment followed through its lifecycle ([`LedgerHandle::follow`]).
pub struct Follow {
    key: AuthKey,
    rx: watch::Receiver<Option<PaymentRecord>>,
    watchers: Arc<Watchers>,
}

impl Follow {
    /// The record as last committed (`None` while the payment is not in the ledger).
    pub fn current(&self) -> Option<PaymentRecord> {
        self.rx.borrow().clone()
    }

    /// Waits until the record satisfies `done`, and returns it (`None` only if the ledger
    /// went away). A writer that stops leaves this waiting: callers bound it with a timeout.
    pub async fn until(&mut self, mut done: impl FnMut(&PaymentRecord) -> bool) -> Option<PaymentRecord> {
        let found = self.rx.wait_for(|r| r.as_ref().is_some_and(&mut done)).await.ok()?;
        found.clone()
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        // The receiver is dropped after this body: replace it first so the count is right.
        let (_, closed) = watch::channel(None);
        drop(std::mem::replace(&mut self.rx, closed));
        self.watchers.release(&self.key);
    }
}

/// What the writer tells after each commit: the newest sequence number to change-feed
/// subscribers, and each changed record to its followers.
struct Notify {
    changes: broadcast::Sender<u64>,
    watchers: Arc<Watchers>,
}

/// Marks the commit in progress for [`LedgerHandle::commit_running_for`].
struct CommitTimer {
    started: Arc<std::sync::atomic::AtomicU64>,
    epoch: std::time::Instant,
}

fn run(
    ledger: &Ledger,
    rx: &Receiver<Msg>,
    notify: &Notify,
    failed: &tokio::sync::watch::Sender<Option<String>>,
    timer: &CommitTimer,
) {
    let mut stopping = false;
    while !stopping {
        let Ok(first) = rx.recv() else { break };
        let mut group = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Command(cmd) => group.push(cmd),
                Msg::Stop => {
                    stopping = true;
                    break;
                }
            }
            if group.len() < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
        let m = crate::telemetry::hot();
        let started = std::time::Instant::now();
        let since_epoch = started.duration_since(timer.epoch).as_millis() as u64;
        timer.started.store(since_epoch + 1, std::sync::atomic::Ordering::SeqCst);
        let (results, changed) = ledger.apply_group_changes(&group);
        timer.started.store(0, std::sync::atomic::Ordering::SeqCst);
        m.commit_seconds.record(started.elapsed().as_secs_f64());
        m.commit_group_size.record(group.len() as f64);
        m.pending_payments.set(ledger.pending() as f64);
        m.holds.set(ledger.holds() as f64);
        let committed = results.iter().any(|r| r.is_ok());
        // A commit the storage refused (nothing of the group is durable, so nothing of it
        // was acknowledged). RocksDB refuses every later write until it is reopened: stop,
        // so the daemon exits and its supervisor restarts it once the cause is fixed.
        let storage_error = results.iter().find_map(|r| match r {
            Err(e @ LedgerError::Db { op: "write", .. }) => Some(e.clone()),
            _ => None,
        });
        for (cmd, result) in group.into_iter().zip(results) {
            cmd.reply(result);
        }
        if let Some(e) = storage_error {
            let cause = match std::error::Error::source(&e) {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            };
            tracing::error!("ledger commit failed, the writer stops: {cause}");
            failed.send_replace(Some(cause));
            break;
        }
        if committed {
            // No subscriber is not an error.
            let _ = notify.changes.send(ledger.last_seq());
            if !notify.watchers.is_empty() {
                for record in &changed {
                    notify.watchers.offer(record);
                }
            }
        }
    }
    // Dropping the receiver makes later sends fail with WriterStopped; commands already
    // queued behind the stop are dropped, and their callers see WriterStopped too.
}
