//! The single ledger writer: one OS thread drains a bounded queue of commands, applies
//! each drained group with [`LedgerStore::apply_group`] (one synced write), and
//! only then answers every command of the group. One writer means conflicts (a nonce used
//! twice, a payer's balance) are decided in one place, in one order; grouping means one
//! fsync (~90 µs) is shared by every payment that arrived while the previous one ran.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};

use super::command::{
    AcceptOutcome, AcceptRequest, ApplyRequest, ApplyResults, Command, HoldOutcome, HoldRequest,
    TransitionRequest,
};
use super::error::LedgerError;
use super::record::{AuthKey, PaymentRecord};
use super::store::LedgerStore;

/// Most commands committed in one write. Bounds the latency a group adds to its first
/// command; 512 puts in one synced WriteBatch cost a few ms on these disks.
pub const MAX_GROUP: usize = 512;

/// Capacity of the change notifications `WatchPayments` follows. A subscriber that falls
/// further behind re-reads the `seq` column family, so nothing is lost.
const CHANGE_CAPACITY: usize = 1024;

/// How often a daemon sharing its ledger looks for changes other daemons committed (for
/// `WatchPayments` and followers of single payments).
const SHARED_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Changes read per look.
const SHARED_PAGE: usize = 1024;

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
    ledger: Arc<dyn LedgerStore>,
    changes: broadcast::Sender<u64>,
    /// Set once, when a commit fails on the storage: why the writer stopped.
    failed: tokio::sync::watch::Receiver<Option<String>>,
    /// When the commit in progress started (ms after `epoch`, plus one); 0 when none is.
    commit_started: Arc<std::sync::atomic::AtomicU64>,
    epoch: std::time::Instant,
    /// Followers of single payments ([`LedgerHandle::follow`]).
    watchers: Arc<Watchers>,
    /// Payments that became `accepted` (new, or back from a batch), counted per chain.
    arrivals: watch::Receiver<Arrivals>,
}

/// Payments that became `accepted` so far, per chain id: what wakes a settlement engine
/// (a change of the count), and what its arrival rate is read from. In a fleet, a change
/// another daemon committed counts once under chain 0 (`ANY_CHAIN`): every engine looks.
pub type Arrivals = std::collections::BTreeMap<u64, u64>;

/// The key of [`Arrivals`] that counts changes other daemons of a fleet committed.
pub const ANY_CHAIN: u64 = 0;

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle").field("ledger", &self.ledger).finish()
    }
}

impl LedgerHandle {
    /// Starts the writer thread over `ledger` with a queue of `queue_capacity` commands.
    pub fn start(
        ledger: Arc<dyn LedgerStore>,
        queue_capacity: usize,
    ) -> std::io::Result<(LedgerHandle, JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::bounded(queue_capacity.max(1));
        let (changes, _) = broadcast::channel(CHANGE_CAPACITY);
        let (failed_tx, failed) = tokio::sync::watch::channel(None);
        let commit_started = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let epoch = std::time::Instant::now();
        let watchers = Arc::new(Watchers::default());
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let own = ledger.fleet().is_some().then(|| Arc::new(Mutex::new(std::collections::BTreeMap::new())));
        let (arrivals_tx, arrivals) = watch::channel(Arrivals::new());
        let arrivals_tx = Arc::new(arrivals_tx);
        let thread = {
            let ledger = Arc::clone(&ledger);
            let notify = Notify {
                changes: changes.clone(),
                watchers: Arc::clone(&watchers),
                own: own.clone(),
                arrivals: Arc::clone(&arrivals_tx),
            };
            let timer = CommitTimer { started: Arc::clone(&commit_started), epoch };
            let ended = Arc::clone(&ended);
            std::thread::Builder::new().name("ledger-writer".into()).spawn(move || {
                run(&*ledger, &rx, &notify, &failed_tx, &timer);
                ended.store(true, std::sync::atomic::Ordering::SeqCst);
            })?
        };
        if ledger.fleet().is_some() {
            let ledger = Arc::clone(&ledger);
            let notify = Notify {
                changes: changes.clone(),
                watchers: Arc::clone(&watchers),
                own,
                arrivals: arrivals_tx,
            };
            std::thread::Builder::new()
                .name("ledger-follower".into())
                .spawn(move || follow_shared(&*ledger, &notify, &ended))?;
        }
        Ok((LedgerHandle { tx, ledger, changes, failed, commit_started, epoch, watchers, arrivals }, thread))
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

    /// The ledger's reads (writes go through this handle's commands).
    pub fn ledger(&self) -> &Arc<dyn LedgerStore> {
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

    /// The payments that became `accepted` so far, per chain ([`Arrivals`]): changes when a
    /// commit accepted one, so a settlement engine decides on arrival, not on a poll.
    pub fn arrivals(&self) -> watch::Receiver<Arrivals> {
        self.arrivals.clone()
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
    /// A shared ledger: the sequence numbers this writer's groups took (first → last), so
    /// the follower of other daemons' changes skips them.
    own: Option<Arc<Mutex<std::collections::BTreeMap<u64, u64>>>>,
    arrivals: Arc<watch::Sender<Arrivals>>,
}

impl Notify {
    /// Counts the records of a commit that became `accepted`, per chain.
    fn arrived(&self, changed: &[PaymentRecord]) {
        let mut per_chain: Arrivals = Arrivals::new();
        for r in changed.iter().filter(|r| r.status == super::record::Status::Accepted) {
            *per_chain.entry(r.signed.chain_id).or_default() += 1;
        }
        if !per_chain.is_empty() {
            self.count(per_chain);
        }
    }

    fn count(&self, per_chain: Arrivals) {
        self.arrivals.send_modify(|all| {
            for (chain, n) in per_chain {
                let e = all.entry(chain).or_default();
                *e = e.wrapping_add(n);
            }
        });
    }
}

/// Marks the commit in progress for [`LedgerHandle::commit_running_for`].
struct CommitTimer {
    started: Arc<std::sync::atomic::AtomicU64>,
    epoch: std::time::Instant,
}

/// A ledger other daemons write too: their changes, read in sequence order every
/// [`SHARED_POLL`], are announced as this writer's own are (to `WatchPayments` and the
/// followers of single payments), until the writer ends. The writer's own changes (it
/// announced them at its commit) are skipped, not read back.
fn follow_shared(ledger: &dyn LedgerStore, notify: &Notify, ended: &std::sync::atomic::AtomicBool) {
    let Some(fleet) = ledger.fleet() else { return };
    let mut seen = ledger.last_seq();
    while !ended.load(std::sync::atomic::Ordering::SeqCst) {
        // Past our own ranges that start here; read at most up to the next one.
        let mut page = SHARED_PAGE;
        if let Some(own) = &notify.own {
            let mut own = own.lock();
            while let Some((&first, &last)) = own.first_key_value() {
                if first > seen + 1 {
                    page = page.min(usize::try_from(first - seen - 1).unwrap_or(usize::MAX));
                    break;
                }
                seen = seen.max(last);
                own.pop_first();
            }
        }
        // Nobody follows a single payment: the newest number is all `WatchPayments` needs
        // (it reads the changes itself), not the records. Read before looking, so a
        // follower that registers meanwhile reads its record after this number.
        let newest = fleet.committed_seq();
        if notify.watchers.is_empty() {
            match newest {
                Ok(newest) if newest > seen => {
                    seen = newest;
                    let _ = notify.changes.send(seen);
                    notify.count(Arrivals::from([(ANY_CHAIN, 1)]));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reading the shared ledger's newest change: {e}"),
            }
            std::thread::sleep(SHARED_POLL);
            continue;
        }
        match ledger.events_after(seen, page) {
            Ok(changes) if !changes.is_empty() => {
                if !notify.watchers.is_empty() {
                    for record in &changes {
                        notify.watchers.offer(record);
                    }
                }
                seen = changes.last().map_or(seen, |r| r.seq);
                let _ = notify.changes.send(seen);
                notify.arrived(&changes);
                if changes.len() == page {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("reading the shared ledger's changes: {e}"),
        }
        std::thread::sleep(SHARED_POLL);
    }
}

fn run(
    ledger: &dyn LedgerStore,
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
        let super::store::GroupOutcome { results, changed, seqs } = ledger.apply_group(&group);
        if let (Some(own), Some((first, last))) = (&notify.own, seqs) {
            own.lock().insert(first, last);
        }
        timer.started.store(0, std::sync::atomic::Ordering::SeqCst);
        m.commit_seconds.record(started.elapsed().as_secs_f64());
        m.commit_group_size.record(group.len() as f64);
        m.pending_payments.set(ledger.pending() as f64);
        m.holds.set(ledger.holds() as f64);
        let committed = results.iter().any(|r| r.is_ok());
        // A commit the storage refused (nothing of the group is durable, so nothing of it
        // was acknowledged) and will refuse every later write until it is reopened: stop,
        // so the daemon exits and its supervisor restarts it once the cause is fixed.
        let storage_error = results.iter().find_map(|r| match r {
            Err(e @ LedgerError::WritesRefused { .. }) => Some(e.clone()),
            _ => None,
        });
        for (cmd, result) in group.into_iter().zip(results) {
            cmd.reply(result);
        }
        if let Some(e) = storage_error {
            let cause = e.with_causes();
            tracing::error!("ledger commit failed, the writer stops: {cause}");
            failed.send_replace(Some(cause));
            break;
        }
        if committed {
            // No subscriber is not an error.
            let _ = notify.changes.send(ledger.last_seq());
            notify.arrived(&changed);
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
