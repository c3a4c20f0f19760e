//! The engine's loop: it wakes when a payment arrives, when it is time to look at the chain
//! (soon after a send, at the expected block, or at the poll interval when nothing is in
//! flight), and when a hold the planner asked for ends ([`super::pace`]). Each round is cut
//! short if it hangs or panics, and resumed from the ledger.

use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::watch;

use super::heads::FeedState;
use super::rpc::Chain;
use super::{Engine, RoundReport};
use crate::ledger::{ANY_CHAIN, Arrivals, BatchStatus};

/// Longest a round may take. A round is a few RPC calls per open batch plus one per cut;
/// an RPC that never answers must not stop settlement.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// What a round is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Look {
    /// Everything: the head read, every open batch followed, sweeps, finality, planning.
    Full,
    /// A look at the chain: the head read; everything only if it is new (or the poll
    /// interval passed since the last full round).
    Chain,
    /// Plan the payments waiting (an arrival, or a hold ended), with the head last read
    /// unless it is a poll interval old.
    Plan,
    /// On a chain whose preconfirmations count: the receipts of the transactions in
    /// flight, nothing else.
    Receipts,
}

impl<C: Chain> Engine<C> {
    /// Runs rounds until `stop` turns true: a full one first, then whenever the engine
    /// wakes (see the module). A failed round is logged and the next one starts from what
    /// the ledger holds.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut arrivals = self.arrivals.clone();
        self.arrivals_seen = self.count(&arrivals.borrow_and_update());
        let mut feed = self.feed.clone();
        let mut look = Look::Full;
        loop {
            self.step(look).await;
            look = loop {
                let (at_ms, next) = self.next_wake();
                let sleep = Duration::from_millis(at_ms.saturating_sub(self.now_ms()));
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => break next,
                    changed = arrivals.changed() => {
                        if changed.is_err() {
                            // The ledger's writer ended: only the timers wake the engine.
                            arrivals = watch::channel(Arrivals::new()).1;
                            continue;
                        }
                        let counted = self.count(&arrivals.borrow_and_update());
                        if self.arrived(counted) {
                            break Look::Plan;
                        }
                    }
                    state = pushed(&mut feed) => {
                        if self.on_push(state) {
                            break Look::Chain;
                        }
                    }
                    changed = stop.changed() => {
                        // Told to stop, or nobody can tell it any more.
                        if changed.is_err() || *stop.borrow() {
                            self.release_leases();
                            return;
                        }
                    }
                }
            };
        }
    }

    /// What the loop does at the engine clock's now, for a driver that keeps its own time
    /// (the deterministic simulation): plans if payments arrived that call for it, else
    /// runs the round that is due, if one is. `None`: nothing was due.
    pub async fn tick(&mut self) -> Result<Option<RoundReport>, super::SettleError> {
        let counted = arrivals_of(self.chain_id, &self.arrivals.borrow_and_update());
        let look = if self.arrived(counted) {
            Look::Plan
        } else {
            let (at_ms, look) = self.next_wake();
            if at_ms > self.now_ms() {
                return Ok(None);
            }
            look
        };
        self.look(look).await.map(Some)
    }

    /// One round of `look`'s kind, cut short if it hangs or panics.
    async fn step(&mut self, look: Look) {
        let started = self.clock.now_ms();
        // A round that hangs (an RPC without an answer) or panics is cut short; what it
        // wrote stands, and the open batches are read back from the ledger.
        let round = std::panic::AssertUnwindSafe(self.look(look)).catch_unwind();
        match tokio::time::timeout(ROUND_TIMEOUT, round).await {
            Ok(Ok(Ok(r))) if r != RoundReport::default() => {
                tracing::debug!(chain_id = self.chain_id, ?look, ?r, "round")
            }
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(chain_id = self.chain_id, "settlement round failed: {e}"),
            Ok(Err(_)) => {
                tracing::error!(
                    chain_id = self.chain_id,
                    "settlement round panicked; resuming from the ledger"
                );
                self.reload();
            }
            Err(_) => {
                tracing::error!(
                    chain_id = self.chain_id,
                    "settlement round took over {ROUND_TIMEOUT:?}; resuming from the ledger"
                );
                self.reload();
            }
        }
        // A round longer than the leases (a hung node) may have let them go: the next
        // round takes them again, or learns who has them.
        if self.fleet.as_ref().is_some_and(|f| self.clock.now_ms().saturating_sub(started) > f.ttl_ms) {
            tracing::warn!(chain_id = self.chain_id, "a settlement round outlasted its leases");
        }
    }

    /// Reads the open batches back from the ledger (after a round was cut short between a
    /// ledger write and the in-memory update that follows it).
    fn reload(&mut self) {
        match self.ledger.ledger().batches(self.chain_id) {
            Ok(all) => {
                self.next_counter = self.next_counter.max(all.last().map_or(0, |b| b.counter) + 1);
                self.open =
                    all.into_iter().filter(|b| !b.status.is_final()).map(|b| (b.counter, b)).collect();
            }
            Err(e) => tracing::error!(chain_id = self.chain_id, "cannot read batches back: {e}"),
        }
    }

    /// When to wake next (engine clock) and for what: the planner's hold ending, or a look
    /// at the chain (soon while a transaction is in flight, else at the poll interval).
    pub(super) fn next_wake(&self) -> (u64, Look) {
        let now = self.now_ms();
        let poll = self.config.poll_interval_ms;
        // Never looked (a new engine): at once.
        let polled = self.last_head.as_ref().map_or(0, |(_, at)| *at);
        let in_flight = self.in_flight();
        let block_twice = self.pace.block_ms().unwrap_or(0) * 2;
        let look_at = match self.pace.next_look_ms(now, polled, in_flight) {
            // Heads come pushed: a safety look only, at the poll interval in a fleet (its
            // leases), else two blocks or the poll with a transaction in flight, ten polls idle.
            _ if self.feed_live() => {
                polled
                    + match (self.fleet.is_some(), in_flight) {
                        (true, _) => poll,
                        (false, true) => poll.max(block_twice),
                        (false, false) => (poll * 10).max(block_twice),
                    }
            }
            Some(at) => at.min(polled + poll),
            // Idle on a chain with a cadence: once per block (a fleet keeps the poll: its
            // leases are renewed every round).
            None if !in_flight && self.fleet.is_none() => {
                self.pace.idle_look_ms(polled).unwrap_or(polled + poll)
            }
            None => polled + poll,
        };
        let mut next = (look_at, Look::Chain);
        if let Some(plan_at) = self.wake_at_ms.filter(|at| *at < next.0) {
            next = (plan_at, Look::Plan);
        }
        if let Some(receipts_at) = self.next_receipts_look_ms(in_flight).filter(|at| *at < next.0) {
            next = (receipts_at, Look::Receipts);
        }
        (next.0.max(now), next.1)
    }

    /// With preconfirmations and a transaction in flight: a quarter of a flashblock after
    /// the last look for receipts (or the send), so a preconfirmation is seen an eighth of
    /// a flashblock after it was made, on average.
    fn next_receipts_look_ms(&self, in_flight: bool) -> Option<u64> {
        let flash_ms = self.preconfirm_ms.filter(|_| in_flight)?;
        Some(self.receipts_at_ms.unwrap_or(0) + (flash_ms / 4).max(1))
    }

    /// The head feed changed to `state`: whether it brought a head to look at (one the
    /// engine has not seen).
    pub(super) fn on_push(&mut self, state: FeedState) -> bool {
        self.feed_up = state.live;
        let Some(head) = state.head.filter(|_| state.live) else { return false };
        // The feed is alive whether or not a look found this head first.
        self.pushed_at_ms = self.now_ms();
        if self.last_head.is_some_and(|(seen, _)| seen.hash == head.hash) {
            return false;
        }
        self.pushed = Some(head);
        true
    }

    /// Whether heads come pushed now: the feed is subscribed and, on a chain with a
    /// cadence, a head came within two blocks and a second (a subscription that went
    /// silent without closing is polled around).
    pub(super) fn feed_live(&self) -> bool {
        self.feed_up
            && self
                .pace
                .block_ms()
                .is_none_or(|block| self.now_ms().saturating_sub(self.pushed_at_ms) <= 2 * block + 1_000)
    }

    /// Whether a transaction of this engine is sent and not yet seen included.
    pub(super) fn in_flight(&self) -> bool {
        self.open.values().any(|b| {
            matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted) && self.acts_for(b.settler)
        })
    }

    /// This chain's count in the ledger's [`Arrivals`] (with a fleet's other daemons').
    fn count(&self, all: &Arrivals) -> u64 {
        arrivals_of(self.chain_id, all)
    }

    /// Payments arrived (the count moved to `counted`): learns the rate, and says whether
    /// to plan now: a settler is idle and no hold is running, or the payments waiting fill
    /// a batch.
    pub(super) fn arrived(&mut self, counted: u64) -> bool {
        let n = counted.wrapping_sub(self.arrivals_seen);
        self.arrivals_seen = counted;
        if n == 0 {
            return false;
        }
        let now = self.now_ms();
        let waiting = self.waiting > 0 || self.in_flight();
        self.pace.arrived(n, now, waiting);
        self.waiting = self.waiting.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
        let idle =
            super::cut::idle_settlers(&self.settlers, &self.open, 0).iter().any(|s| self.acts_for(s.address));
        let holding = self.wake_at_ms.is_some_and(|at| at > now);
        idle && (!holding || self.waiting >= self.policy.max_batch_size)
    }
}

/// The head feed's next state: not live once its follower is gone (and nothing more
/// after that); never, without a feed.
async fn pushed(feed: &mut Option<watch::Receiver<FeedState>>) -> FeedState {
    match feed {
        Some(rx) => match rx.changed().await {
            Ok(()) => *rx.borrow_and_update(),
            Err(_) => {
                *feed = None;
                FeedState::default()
            }
        },
        None => std::future::pending().await,
    }
}

/// `chain_id`'s count in the ledger's [`Arrivals`] (with a fleet's other daemons').
pub(super) fn arrivals_of(chain_id: u64, all: &Arrivals) -> u64 {
    let of = |chain| all.get(&chain).copied().unwrap_or(0);
    of(chain_id).wrapping_add(of(ANY_CHAIN))
}
