//! The engine's loop: rounds every poll interval, each cut short if it hangs or panics and
//! resumed from the ledger; the ledger writes a round makes and the metrics they move; the
//! gauges read off each round's view.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use futures::FutureExt as _;
use tokio::sync::watch;

use super::LEADER;
use super::rpc::{Chain, Head};
use super::{ChainView, Engine, RoundReport, SettleError, TokenView};
use crate::chain::RpcError;
use crate::ledger::{
    ApplyRequest, ApplyResults, BatchRecord, BatchStatus, Fence, LedgerError, LogEntry, PaymentRecord, Status,
};
use crate::planner::{Costs, Fees};

/// Longest a round may take. A round is a few RPC calls per open batch plus one per cut;
/// an RPC that never answers must not stop settlement.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// Pending payments this close to their `validBefore` (chain time) count as near their
/// deadline in the metrics (and the alert built on it).
const NEAR_DEADLINE_SECS: u64 = 60;

impl<C: Chain> Engine<C> {
    /// Fleet mode: takes or renews the leases, then reads the open batches of every daemon
    /// back (an account taken over is resumed from what its last holder wrote: the restart
    /// recovery) and the next batch number.
    async fn take_leases(&mut self) -> Result<(), SettleError> {
        let Some(fleet) = &self.fleet else { return Ok(()) };
        let (owner, ttl_ms) = (fleet.owner.clone(), fleet.ttl_ms);
        let mut accounts: Vec<Address> = self.settlers.iter().map(|s| s.address).collect();
        accounts.push(LEADER);
        let ledger = Arc::clone(self.ledger.ledger());
        let chain_id = self.chain_id;
        let (held, open, last) = tokio::task::spawn_blocking(move || {
            let fleet = ledger.fleet().ok_or_else(|| {
                LedgerError::Config("fleet mode (settler leases) needs a ledger the fleet shares".into())
            })?;
            let held = fleet.acquire_leases(&owner, chain_id, &accounts, ttl_ms)?;
            let open = ledger.open_batches(chain_id)?;
            let last = ledger.last_batch_counter(chain_id)?;
            Ok::<_, LedgerError>((held, open, last))
        })
        .await
        .map_err(|_| SettleError::Scan { chain_id })??;
        let held: BTreeMap<Address, u64> = held.into_iter().collect();
        if let Some(fleet) = &mut self.fleet {
            for (account, epoch) in &held {
                if fleet.held.get(account) != Some(epoch) {
                    tracing::info!(chain_id, %account, epoch, "lease taken: acting for this account");
                }
            }
            for account in fleet.held.keys().filter(|a| !held.contains_key(*a)) {
                tracing::info!(chain_id, %account, "lease given up or lost: another daemon acts for this account");
            }
            for account in std::iter::once(LEADER).chain(self.settlers.iter().map(|s| s.address)) {
                self.metrics.lease_held(account, held.contains_key(&account));
            }
            fleet.held = held;
        }
        self.open = open.into_iter().map(|b| (b.counter, b)).collect();
        self.next_counter = self.next_counter.max(last + 1);
        Ok(())
    }

    /// Whether this engine acts for `settler` now (always, outside a fleet).
    pub(super) fn acts_for(&self, settler: Address) -> bool {
        self.fleet.as_ref().is_none_or(|f| f.held.contains_key(&settler))
    }

    /// Gives up this engine's leases (a clean stop) so others take over at once.
    fn release_leases(&self) {
        if let Some(fleet) = &self.fleet
            && let Some(shared) = self.ledger.ledger().fleet()
            && let Err(e) = shared.release_leases(&fleet.owner)
        {
            tracing::warn!(chain_id = self.chain_id, "could not release the leases: {e}");
        }
    }

    /// Runs rounds every `poll_interval_ms`, and sooner when the planner asked to decide
    /// again (a linger ending), until `stop` turns true. A failed round is logged and the
    /// next one starts from what the ledger holds.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let early = wake_delay(self.wake_at_ms.take(), self.now_ms(), poll);
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep(early.unwrap_or(poll)), if early.is_some() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let started = self.clock.now_ms();
            // A round that hangs (an RPC without an answer) or panics is cut short; what it
            // wrote stands, and the open batches are read back from the ledger.
            let round = std::panic::AssertUnwindSafe(self.round()).catch_unwind();
            match tokio::time::timeout(ROUND_TIMEOUT, round).await {
                Ok(Ok(Ok(r))) if r != RoundReport::default() => {
                    tracing::debug!(chain_id = self.chain_id, ?r, "round")
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
        self.release_leases();
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

    /// One round: confirm, sweep, expire, plan and send.
    pub async fn round(&mut self) -> Result<RoundReport, SettleError> {
        let started = Instant::now();
        self.policy = self.policy_rx.borrow_and_update().clone();
        let mut report = RoundReport::default();
        self.take_leases().await?;
        let head = self.read(self.chain.head().await)?;
        let fees = self.fees().await?;
        self.metrics.head_block.set(head.number as f64);
        self.metrics.base_fee_wei.set(fees.base_fee as f64);
        let counters: Vec<u64> =
            self.open.iter().filter(|(_, b)| self.acts_for(b.settler)).map(|(c, _)| *c).collect();
        for counter in counters {
            self.advance(counter, &head, fees, &mut report).await?;
        }
        let pending = self.pending_records().await?;
        let pending_view = tally(&pending);
        self.pending_metrics(&pending, &pending_view, &head);
        // In a fleet, the chain-wide work is the leader's alone.
        if self.acts_for(LEADER) {
            self.sweep_included(&pending, &head, &mut report).await?;
            self.follow_settled(&head, &mut report).await?;
        }
        let accepted = pending.into_iter().filter(|r| r.status == Status::Accepted).collect();
        self.plan_and_send(accepted, &head, fees, &mut report).await?;
        self.settler_balances().await;
        self.publish(&head, fees, &pending_view);
        self.metrics.round_seconds.record(started.elapsed().as_secs_f64());
        self.metrics.last_round.set(self.clock.now_ms() as f64 / 1000.0);
        Ok(report)
    }

    /// What `token`'s settlements cost by what was learnt from receipts so far.
    pub fn costs(&self, token: Address) -> Costs {
        self.gas.costs(token, self.l1.get(&token).copied().unwrap_or_default())
    }

    /// Publishes what this round saw on the status board.
    fn publish(&self, head: &Head, fees: Fees, pending: &BTreeMap<Address, (u64, U256)>) {
        let tokens = pending
            .iter()
            .map(|(&token, &(count, value))| {
                let costs = self.costs(token);
                TokenView {
                    token,
                    pending: count,
                    pending_value: value,
                    l1_fees: costs.l1,
                    batch_gas: costs.batch,
                    direct_gas: costs.direct_gas,
                }
            })
            .collect();
        let settlers = self
            .settlers
            .iter()
            .map(|s| {
                let mut v = self.settler_views.get(&s.address).cloned().unwrap_or_default();
                v.address = s.address;
                let open = self.open.values().find(|b| {
                    b.settler == s.address && matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted)
                });
                v.open_batch = open.map(BatchRecord::id);
                v.open_tx = open.and_then(|b| b.attempts.last()).map(|a| a.tx_hash);
                v.pending_transactions = u64::from(open.is_some());
                v
            })
            .collect();
        self.board.publish(ChainView {
            chain_id: self.chain_id,
            head_block: head.number,
            head_time: head.timestamp,
            base_fee_wei: fees.base_fee,
            priority_fee_wei: fees.priority_fee,
            tokens,
            settlers,
            updated_at_ms: self.now_ms(),
        });
    }

    /// An RPC read's result, its failure counted per call.
    pub(super) fn read<T>(&self, result: Result<T, RpcError>) -> Result<T, SettleError> {
        result.map_err(|e| {
            self.metrics.rpc_error(e.call);
            e.into()
        })
    }

    /// The next block's base fee and a priority fee (the median tip of the last block, at
    /// least the configured minimum).
    async fn fees(&self) -> Result<Fees, SettleError> {
        let reading = self.read(self.chain.fees().await)?;
        Ok(Fees {
            base_fee: reading.base_fee,
            priority_fee: reading.median_tip.max(self.config.min_priority_fee_wei),
        })
    }

    /// The canonical block hash at `number` (`None` if the node has no such block).
    pub(super) async fn canonical_hash(
        &self,
        number: u64,
    ) -> Result<Option<alloy::primitives::B256>, SettleError> {
        Ok(self.read(self.chain.block_at(number).await)?.map(|(hash, _)| hash))
    }

    /// The time of block `number` (0 if the node has no such block any more).
    pub(super) async fn block_time(&self, number: u64) -> Result<u64, SettleError> {
        Ok(self.read(self.chain.block_at(number).await)?.map_or(0, |(_, time)| time))
    }

    /// Gauges read off this round's view: transactions awaiting inclusion, how deep the
    /// oldest unconfirmed inclusion is, pending value per token, payments near deadline.
    fn pending_metrics(
        &mut self,
        pending: &[PaymentRecord],
        by_token: &BTreeMap<Address, (u64, U256)>,
        head: &Head,
    ) {
        let m = &self.metrics;
        let waiting = self
            .open
            .values()
            .filter(|b| matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted))
            .count();
        m.transactions_pending.set(waiting as f64);
        let lag = self
            .open
            .values()
            .filter_map(|b| b.inclusion.filter(|_| b.status == BatchStatus::Included))
            .map(|i| head.number.saturating_sub(i.block_number) + 1)
            .max()
            .unwrap_or(0);
        m.confirmation_lag_blocks.set(lag as f64);
        let soon = U256::from(head.timestamp.saturating_add(NEAR_DEADLINE_SECS));
        let mut near = 0usize;
        for r in pending {
            if r.signed.authorization.valid_before <= soon {
                near += 1;
            }
        }
        // A token with nothing pending any more reads 0, not its last sum.
        for token in self.value_tokens.iter().filter(|t| !by_token.contains_key(*t)) {
            m.pending_value(*token, 0.0);
        }
        for (token, (_, sum)) in by_token {
            m.pending_value(*token, f64::from(*sum));
        }
        self.value_tokens = by_token.keys().copied().collect();
        m.near_deadline.set(near as f64);
    }

    /// Each settler's native balance (for the low-balance alert) and next nonce (for
    /// status), every ~10 s.
    async fn settler_balances(&mut self) {
        // The engine's clock, not the machine's: a simulated world decides when (its seed
        // must replay the same calls however fast the machine runs it).
        let now_ms = self.clock.now_ms();
        if self.balances_read_at_ms.is_some_and(|t| now_ms.saturating_sub(t) < self.settler_reads_every_ms) {
            return;
        }
        self.balances_read_at_ms = Some(now_ms);
        for s in &self.settlers {
            let view = self.settler_views.entry(s.address).or_default();
            if let Ok(wei) =
                self.chain.native_balance(s.address).await.inspect_err(|e| self.metrics.rpc_error(e.call))
            {
                self.metrics.settler_balance(s.address, f64::from(wei));
                view.native_balance_wei = Some(wei);
            }
            if let Ok(nonce) =
                self.chain.nonce(s.address).await.inspect_err(|e| self.metrics.rpc_error(e.call))
            {
                view.next_nonce = Some(nonce);
            }
        }
    }

    /// Writes a settlement step, and counts the payments it made final (settled ones with
    /// their accept-to-settled time).
    pub(super) async fn apply(&self, mut req: ApplyRequest) -> Result<ApplyResults, LedgerError> {
        // In a fleet, a batch's step is written only under its settler's lease.
        if let (Some(fleet), Some(batch)) = (&self.fleet, &req.batch) {
            let lost = || LedgerError::LeaseLost {
                chain_id: self.chain_id,
                settler: batch.settler,
                owner: fleet.owner.clone(),
                epoch: 0,
            };
            let epoch = *fleet.held.get(&batch.settler).ok_or_else(lost)?;
            req.fence = Some(Fence {
                chain_id: self.chain_id,
                settler: batch.settler,
                owner: fleet.owner.clone(),
                epoch,
            });
        }
        let results = self.ledger.apply(req).await?;
        let mut finals: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
        // Outcomes only: a settled payment's later entries (corrected, finalized) are not
        // new outcomes; a reversal's expiry is.
        for r in results.iter().flatten().filter(|r| r.log_entry == LogEntry::Outcome) {
            let status = match r.status {
                Status::Settled => {
                    let secs = r.updated_at_ms.saturating_sub(r.accepted_at_ms) as f64 / 1000.0;
                    self.metrics.accept_to_settled_seconds.record(secs);
                    "settled"
                }
                Status::Failed => "failed",
                Status::Expired => "expired",
                _ => continue,
            };
            *finals.entry((status, r.failure_reason.clone())).or_default() += 1;
        }
        for ((status, reason), n) in finals {
            self.metrics.finals(status, &reason, n);
        }
        Ok(results)
    }

    /// This chain's payments not yet final, read off the async threads.
    async fn pending_records(&self) -> Result<Vec<PaymentRecord>, SettleError> {
        let ledger = Arc::clone(self.ledger.ledger());
        let chain_id = self.chain_id;
        Ok(tokio::task::spawn_blocking(move || ledger.pending_records())
            .await
            .map_err(|_| SettleError::Scan { chain_id })??
            .into_iter()
            .filter(|r| r.signed.chain_id == chain_id)
            .collect())
    }

    /// The records of a batch's items, in the batch's order.
    pub(super) fn records_of(&self, batch: &BatchRecord) -> Result<Vec<PaymentRecord>, SettleError> {
        let ledger = self.ledger.ledger();
        let mut out = Vec::with_capacity(batch.items.len());
        for k in &batch.items {
            match ledger.get(k)? {
                Some(r) => out.push(r),
                None => return Err(LedgerError::NotFound(k.payment_id()).into()),
            }
        }
        Ok(out)
    }

    /// The gas limit a settlement of `items` of `token` is sent (and simulated) with.
    pub(super) fn gas_limit(&self, token: Address, items: usize) -> u64 {
        self.config.gas_limit(&self.gas.learner(token, items), items)
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// Payments not yet final per token: how many, and their value.
fn tally(pending: &[PaymentRecord]) -> BTreeMap<Address, (u64, U256)> {
    let mut out: BTreeMap<Address, (u64, U256)> = BTreeMap::new();
    for r in pending {
        let e = out.entry(r.signed.token).or_default();
        e.0 += 1;
        e.1 += r.value();
    }
    out
}

/// How long to sleep before deciding again when the planner asked for `wake_at_ms`: `None`
/// when the regular poll comes first (or nothing was asked). Never less than a few
/// milliseconds, so a wake-up that is already due cannot spin.
fn wake_delay(wake_at_ms: Option<u64>, now_ms: u64, poll: Duration) -> Option<Duration> {
    const MIN: Duration = Duration::from_millis(5);
    let delay = Duration::from_millis(wake_at_ms?.saturating_sub(now_ms)).max(MIN);
    (delay < poll).then_some(delay)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::record;
    use super::*;

    #[test]
    fn an_early_wake_up_only_when_it_comes_before_the_poll_and_never_a_spin() {
        let poll = Duration::from_millis(1_000);
        assert_eq!(wake_delay(None, 5_000, poll), None, "nothing asked");
        assert_eq!(wake_delay(Some(5_250), 5_000, poll), Some(Duration::from_millis(250)));
        assert_eq!(
            wake_delay(Some(4_000), 5_000, poll),
            Some(Duration::from_millis(5)),
            "overdue: soon, not at once"
        );
        assert_eq!(wake_delay(Some(7_000), 5_000, poll), None, "the poll comes first");
    }

    #[test]
    fn the_tally_counts_and_sums_per_token() {
        let records = [record(1, Status::Accepted, 0), record(2, Status::Batched, 0)];
        let t = tally(&records);
        let value: U256 = records.iter().map(PaymentRecord::value).sum();
        assert_eq!(t.into_iter().collect::<Vec<_>>(), vec![(records[0].signed.token, (2, value))]);
    }
}
