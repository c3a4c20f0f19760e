//! A round of the engine: leases, the head, every open batch followed, sweeps, finality,
//! planning; the ledger writes a round makes and the metrics they move; the gauges read off
//! each round's view. A round started by an arrival or the end of a hold only plans; one
//! that finds no new head before the poll interval does nothing more.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use alloy::primitives::{Address, U256};

use super::LEADER;
use super::rpc::{Chain, Head};
use super::wake::Look;
use super::{ChainView, Engine, RoundReport, SettleError, TokenView};
use crate::chain::RpcError;
use crate::ledger::{
    ApplyRequest, ApplyResults, BatchRecord, BatchStatus, Fence, LedgerError, LogEntry, PaymentRecord, Status,
};
use crate::planner::{Costs, Fees};

/// A fee reading (`eth_feeHistory`) serves the heads after it for this many blocks and
/// milliseconds, each with its own base fee when higher: a transaction's fee cap is twice
/// the base fee, so a reading a few blocks old still prices it, and the tip moves slowly.
const FEES_REUSED_FOR_BLOCKS: u64 = 8;
const FEES_REUSED_FOR_MS: u64 = 4_000;

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
    pub(super) fn release_leases(&self) {
        if let Some(fleet) = &self.fleet
            && let Some(shared) = self.ledger.ledger().fleet()
            && let Err(e) = shared.release_leases(&fleet.owner)
        {
            tracing::warn!(chain_id = self.chain_id, "could not release the leases: {e}");
        }
    }

    /// One full round: confirm, sweep, expire, plan and send. The loop runs one when a new
    /// head came or the poll interval passed; tests and the simulation call it directly.
    pub async fn round(&mut self) -> Result<RoundReport, SettleError> {
        self.look(Look::Full).await
    }

    /// A round of `look`'s kind (see [`Look`]).
    pub(super) async fn look(&mut self, look: Look) -> Result<RoundReport, SettleError> {
        let started = Instant::now();
        self.policy = self.policy_rx.borrow_and_update().clone();
        let mut report = RoundReport::default();
        let now_ms = self.now_ms();
        self.look_at_ms = now_ms;
        if look == Look::Receipts {
            self.receipts_at_ms = Some(now_ms);
            self.follow_in_flight(&mut report).await?;
            return Ok(report);
        }
        let poll_ms = self.config.poll_interval_ms;
        // With heads pushed, the last one is the chain's head however old.
        let live = self.feed_live();
        let fresh = |at: u64| now_ms.saturating_sub(at) < poll_ms || live;
        let (head, new_head) = match (self.pushed.take(), &self.last_head) {
            (Some(head), _) => {
                let new = self.pace.saw_head(&head, now_ms);
                self.last_head = Some((head, now_ms));
                (head, new)
            }
            (None, Some((head, at))) if look == Look::Plan && fresh(*at) => (*head, false),
            _ => {
                let head = self.read(self.chain.head().await)?;
                let new = self.pace.saw_head(&head, now_ms);
                self.last_head = Some((head, now_ms));
                (head, new)
            }
        };
        let full = look == Look::Full
            || new_head
            || self.full_round_at_ms.is_none_or(|t| now_ms.saturating_sub(t) >= poll_ms);
        if full {
            self.full_round_at_ms = Some(now_ms);
            self.follow_chain(&head, &mut report).await?;
        } else if look == Look::Plan {
            let accepted = self.pending_records().await?.into_iter().filter(|r| r.status == Status::Accepted);
            let fees = self.fees_for(&head).await?;
            self.plan_and_send(accepted.collect(), &head, fees, &mut report).await?;
        }
        if full || report != RoundReport::default() {
            self.metrics.round_seconds.record(started.elapsed().as_secs_f64());
            self.metrics.last_round.set(self.clock.now_ms() as f64 / 1000.0);
        }
        Ok(report)
    }

    /// Everything a new head (or the poll) calls for: leases, every open batch followed,
    /// sweeps, finality, expiry, planning, the view published.
    async fn follow_chain(&mut self, head: &Head, report: &mut RoundReport) -> Result<(), SettleError> {
        self.take_leases().await?;
        self.metrics.head_block.set(head.number as f64);
        // Batches waiting for their receipt first: payments waiting to be answered `included`
        // are not kept behind the writes of batches reaching their confirmation depth.
        let mut counters: Vec<(bool, u64)> = self
            .open
            .iter()
            .filter(|(_, b)| self.acts_for(b.settler))
            .map(|(c, b)| (b.status == BatchStatus::Included, *c))
            .collect();
        counters.sort_unstable();
        if !counters.is_empty() {
            let fees = self.fees_for(head).await?;
            for (_, counter) in counters {
                self.advance(counter, head, fees, report).await?;
            }
        }
        let pending = self.pending_records().await?;
        let pending_view = tally(&pending);
        self.pending_metrics(&pending, &pending_view, head);
        // In a fleet, the chain-wide work is the leader's alone.
        if self.acts_for(LEADER) {
            self.sweep_included(&pending, head, report).await?;
            self.follow_settled(head, report).await?;
        }
        let accepted: Vec<PaymentRecord> =
            pending.into_iter().filter(|r| r.status == Status::Accepted).collect();
        if accepted.is_empty() {
            self.waiting = 0;
            self.wake_at_ms = None;
        } else {
            let fees = self.fees_for(head).await?;
            // A cut's work is counted from here: not the open batches' follow-up above.
            self.look_at_ms = self.now_ms();
            self.plan_and_send(accepted, head, fees, report).await?;
        }
        self.settler_balances().await;
        let fees = self.fees_at.map(|(_, f)| f).unwrap_or(Fees { base_fee: 0, priority_fee: 0 });
        self.publish(head, fees, &pending_view);
        Ok(())
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
    /// least the configured minimum): worked out once per head, read at most every few
    /// blocks ([`FEES_REUSED_FOR_BLOCKS`]).
    pub(super) async fn fees_for(&mut self, head: &Head) -> Result<Fees, SettleError> {
        if let Some((number, fees)) = self.fees_at
            && number == head.number
        {
            return Ok(fees);
        }
        let now_ms = self.now_ms();
        let fees = match (self.fee_reading, head.base_fee) {
            // A recent reading, and the base fee the new head carries: its tip stands, its
            // base fee unless the head's is higher (a rise is taken at once).
            (Some((block, at_ms, read)), Some(base_fee))
                if head.number > block
                    && head.number - block <= FEES_REUSED_FOR_BLOCKS
                    && now_ms.saturating_sub(at_ms) <= FEES_REUSED_FOR_MS =>
            {
                Fees { base_fee: read.base_fee.max(base_fee), ..read }
            }
            _ => {
                let reading = self.read(self.chain.fees().await)?;
                let read = Fees {
                    base_fee: reading.base_fee,
                    priority_fee: reading.median_tip.max(self.config.min_priority_fee_wei),
                };
                self.fee_reading = Some((head.number, now_ms, read));
                read
            }
        };
        self.metrics.base_fee_wei.set(fees.base_fee as f64);
        self.fees_at = Some((head.number, fees));
        Ok(fees)
    }

    /// The canonical block hash at `number` (`None` if the node has no such block).
    pub(super) async fn canonical_hash(
        &self,
        number: u64,
    ) -> Result<Option<alloy::primitives::B256>, SettleError> {
        Ok(self.canonical_block(number).await?.map(|(hash, _)| hash))
    }

    /// The canonical block at `number`, hash and time (the head last read's without a
    /// read, when it is that block).
    pub(super) async fn canonical_block(
        &self,
        number: u64,
    ) -> Result<Option<(alloy::primitives::B256, u64)>, SettleError> {
        if let Some((head, _)) = &self.last_head
            && head.number == number
        {
            return Ok(Some((head.hash, head.timestamp)));
        }
        self.read(self.chain.block_at(number).await)
    }

    /// The time of block `number` whose hash a receipt named `hash`: 0 if the node has no
    /// such block any more; for a preconfirmed block above the head, not sealed yet, the
    /// engine clock's second (at least the head's next), corrected once it is sealed.
    pub(super) async fn block_time(
        &self,
        number: u64,
        hash: alloy::primitives::B256,
    ) -> Result<u64, SettleError> {
        if let Some((head, _)) = &self.last_head
            && head.number == number
            && head.hash == hash
        {
            return Ok(head.timestamp);
        }
        if let Some((_, time)) = self.read(self.chain.block_at(number).await)? {
            return Ok(time);
        }
        Ok(match &self.last_head {
            Some((head, _)) if number > head.number => (head.timestamp + 1).max(self.now_ms() / 1000),
            _ => 0,
        })
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
    /// status), every ~30 s.
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::record;
    use super::*;

    #[test]
    fn the_tally_counts_and_sums_per_token() {
        let records = [record(1, Status::Accepted, 0), record(2, Status::Batched, 0)];
        let t = tally(&records);
        let value: U256 = records.iter().map(PaymentRecord::value).sum();
        assert_eq!(t.into_iter().collect::<Vec<_>>(), vec![(records[0].signed.token, (2, value))]);
    }
}
