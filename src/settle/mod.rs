//! The settlement engine: takes accepted payments from the ledger to the chain and back.
//!
//! One engine per chain runs a loop of rounds. Each round reads the head block and the fee
//! history, then:
//!
//! 1. **confirms** every open batch: a `Signed` batch is broadcast; a `Submitted` one is
//!    looked for by every signed attempt's receipt, replaced with a higher fee after
//!    `replace_after_blocks` blocks (or when the base fee rose above its cap), rebroadcast
//!    if the node no longer knows it, re-signed at the account's nonce if a gap opened, and
//!    abandoned if its nonce was consumed by something else; an `Included` one is checked
//!    against the canonical block hash at its height (a reorg: its transaction is looked
//!    for again, else its payments go back to accepted or expire) and settled once
//!    `confirmations` blocks deep;
//! 2. **sweeps** included payments no open batch follows (their evidence is another
//!    transaction of ours, found when their nonce turned out used): each is settled at
//!    depth on its own block, or back to accepted if that block was reorged away;
//! 3. **expires** accepted payments whose `validBefore` the chain has passed;
//! 4. **plans** the accepted payments of each token ([`crate::planner::plan`]) and, for
//!    each cut, pre-simulates the batch ([`crate::simulate`]), fails the items the token
//!    would refuse, signs the transaction for an idle settler account, records the batch
//!    with its raw signed bytes, and only then broadcasts it.
//!
//! Every decision is written to the ledger before it is acted on, with `only_from` the
//! state it was decided on, so a crash at any point leaves a state the next round (or the
//! next process) resumes from: a signed batch is broadcast again (same bytes, same hash),
//! a submitted one is found by its receipts. Each settler account has at most one batch
//! not yet included, so its nonces never gap; several accounts settle in parallel.
//!
//! An item's outcome comes from its own `AuthorizationUsed` log in the receipt (settled
//! once deep enough), or from its absence: the item is simulated again alone and fails
//! with the token's reason, expires, or returns to accepted if it would now succeed.

mod keys;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use alloy::consensus::Transaction as _;
use alloy::eips::{BlockId, BlockNumberOrTag, Encodable2718};
use alloy::network::{Ethereum, EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolEvent};
use futures::FutureExt as _;
use tokio::sync::watch;

pub use keys::{KeyError, load as load_keys, loose_mode, write_file as write_key_file};

use crate::balance::BalanceCache;
use crate::chain::{self, IEip3009, IMulticall3, MULTICALL3, RpcEndpoint};
use crate::clock::Clock;
use crate::config::SettlementConfig;
use crate::ledger::{
    ApplyRequest, Attempt, BatchRecord, BatchStatus, Evidence, Inclusion, LedgerError, LedgerHandle,
    PaymentRecord, Status, TransitionRequest,
};
use crate::planner::{self, Caps, CutReason, Fees, GasLearner, GasModel, Pending, Policy};
use crate::policy::SettlementPolicy;
use crate::simulate;
use crate::telemetry::ChainMetrics;
use crate::x402::Reason;

/// Longest a round may take. A round is a few RPC calls per open batch plus one per cut;
/// an RPC that never answers must not stop settlement.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// Receipts the gas model learns from (the most recent ones).
const GAS_WINDOW: usize = 32;

/// How far back an `AuthorizationUsed` log is looked for when a nonce turns out used:
/// ~5.5 hours of 2-second blocks, within most nodes' `eth_getLogs` range limits.
const LOG_LOOKBACK_BLOCKS: u64 = 10_000;

/// Pending payments this close to their `validBefore` (chain time) count as near their
/// deadline in the metrics (and the alert built on it).
const NEAR_DEADLINE_SECS: u64 = 60;

/// How often settler balances are read for the metrics.
const SETTLER_BALANCE_EVERY: Duration = Duration::from_secs(10);

/// Why a round stopped early. Nothing half-done is left: every step is written first.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("chain {chain_id}: RPC {call} failed: {detail}")]
    Rpc { chain_id: u64, call: &'static str, detail: String },
    #[error("chain {chain_id}: {detail}")]
    Chain { chain_id: u64, detail: String },
    #[error("could not sign a batch transaction: {0}")]
    Sign(String),
}

/// The head block as a round sees it.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub number: u64,
    pub hash: B256,
    pub timestamp: u64,
    pub gas_limit: u64,
}

/// What a round did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    pub batches_sent: usize,
    pub included: usize,
    pub settled: usize,
    pub failed: usize,
    pub expired: usize,
    pub replaced: usize,
    pub rebroadcast: usize,
    pub requeued: usize,
}

/// A settler account.
#[derive(Clone)]
struct Settler {
    address: Address,
    wallet: EthereumWallet,
}

/// The engine of one chain.
pub struct Engine {
    chain_id: u64,
    endpoint: RpcEndpoint,
    ledger: LedgerHandle,
    clock: Arc<dyn Clock>,
    balances: Option<BalanceCache>,
    settlers: Vec<Settler>,
    config: SettlementConfig,
    learner: GasLearner,
    /// Batches not yet done or abandoned, by counter.
    open: BTreeMap<u64, BatchRecord>,
    next_counter: u64,
    /// Round-robin start among settlers, so every account takes its share of batches.
    next_settler: usize,
    /// Batches whose nonce was seen consumed without a receipt of ours, with the head then.
    consumed: HashMap<u64, u64>,
    /// The operators' runtime policy, and the copy this round uses.
    policy_rx: watch::Receiver<SettlementPolicy>,
    policy: SettlementPolicy,
    metrics: ChainMetrics,
    /// When settler balances were last read for the metrics.
    balances_read_at: Option<std::time::Instant>,
    /// Tokens whose pending value the metrics last showed.
    value_tokens: Vec<Address>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("chain_id", &self.chain_id)
            .field("settlers", &self.settlers.iter().map(|s| s.address).collect::<Vec<_>>())
            .field("open", &self.open.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over `endpoint`'s chain, resuming the open batches the ledger holds.
    pub fn new(
        endpoint: RpcEndpoint,
        ledger: LedgerHandle,
        clock: Arc<dyn Clock>,
        balances: Option<BalanceCache>,
        signers: &[PrivateKeySigner],
        config: SettlementConfig,
        policy_rx: watch::Receiver<SettlementPolicy>,
    ) -> Result<Engine, SettleError> {
        let chain_id = endpoint.chain_id;
        let open = ledger
            .ledger()
            .batches(chain_id)?
            .into_iter()
            .filter(|b| !b.status.is_final())
            .map(|b| (b.counter, b))
            .collect::<BTreeMap<_, _>>();
        let next_counter = ledger.ledger().last_batch_counter(chain_id)? + 1;
        let settlers = signers
            .iter()
            .map(|s| Settler { address: s.address(), wallet: EthereumWallet::from(s.clone()) })
            .collect();
        let seed = GasModel { fixed: config.fixed_gas, per_item: config.item_gas };
        if !open.is_empty() {
            tracing::info!(chain_id, open = open.len(), "resuming open settlement batches");
        }
        let policy = policy_rx.borrow().clone();
        Ok(Engine {
            chain_id,
            endpoint,
            ledger,
            clock,
            balances,
            settlers,
            config,
            learner: GasLearner::new(seed, GAS_WINDOW),
            open,
            next_counter,
            next_settler: 0,
            consumed: HashMap::new(),
            policy,
            policy_rx,
            metrics: ChainMetrics::new(chain_id),
            balances_read_at: None,
            value_tokens: Vec::new(),
        })
    }

    /// Runs rounds every `poll_interval_ms` until `stop` turns true. A failed round is
    /// logged and the next one starts from what the ledger holds.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.poll_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
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
        }
    }

    /// An RPC failure, with the endpoint's URL (and any key in it) redacted.
    fn rpc_err(&self, call: &'static str, e: impl std::fmt::Display) -> SettleError {
        self.metrics.rpc_error(call);
        SettleError::Rpc { chain_id: self.chain_id, call, detail: self.endpoint.redact(&e.to_string()) }
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
        let started = std::time::Instant::now();
        self.policy = self.policy_rx.borrow_and_update().clone();
        let mut report = RoundReport::default();
        let head = self.head().await?;
        let fees = self.fees().await?;
        self.metrics.head_block.set(head.number as f64);
        self.metrics.base_fee_wei.set(fees.base_fee as f64);
        let counters: Vec<u64> = self.open.keys().copied().collect();
        for counter in counters {
            self.advance(counter, &head, fees, &mut report).await?;
        }
        let pending = self.pending_records().await?;
        self.pending_metrics(&pending, &head);
        self.sweep_included(&pending, &head, &mut report).await?;
        let accepted = pending.into_iter().filter(|r| r.status == Status::Accepted).collect();
        self.plan_and_send(accepted, &head, fees, &mut report).await?;
        self.settler_balances().await;
        self.metrics.round_seconds.record(started.elapsed().as_secs_f64());
        self.metrics.last_round.set(self.clock.now_ms() as f64 / 1000.0);
        Ok(report)
    }

    /// Gauges read off this round's view: transactions awaiting inclusion, how deep the
    /// oldest unconfirmed inclusion is, pending value per token, payments near deadline.
    fn pending_metrics(&mut self, pending: &[PaymentRecord], head: &Head) {
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
        let mut by_token: BTreeMap<Address, U256> = BTreeMap::new();
        let soon = U256::from(head.timestamp.saturating_add(NEAR_DEADLINE_SECS));
        let mut near = 0usize;
        for r in pending {
            *by_token.entry(r.signed.token).or_default() += r.value();
            if r.signed.authorization.valid_before <= soon {
                near += 1;
            }
        }
        // A token with nothing pending any more reads 0, not its last sum.
        for token in self.value_tokens.iter().filter(|t| !by_token.contains_key(*t)) {
            m.pending_value(*token, 0.0);
        }
        for (token, sum) in &by_token {
            m.pending_value(*token, f64::from(*sum));
        }
        self.value_tokens = by_token.into_keys().collect();
        m.near_deadline.set(near as f64);
    }

    /// Each settler's native balance, for the low-balance alert (every ~10 s).
    async fn settler_balances(&mut self) {
        if self.balances_read_at.is_some_and(|t| t.elapsed() < SETTLER_BALANCE_EVERY) {
            return;
        }
        self.balances_read_at = Some(std::time::Instant::now());
        for s in &self.settlers {
            match self.endpoint.provider.get_balance(s.address).await {
                Ok(wei) => self.metrics.settler_balance(s.address, f64::from(wei)),
                Err(_) => self.metrics.rpc_error("eth_getBalance"),
            }
        }
    }

    /// Writes a settlement step, and counts the payments it made final (settled ones with
    /// their accept-to-settled time).
    async fn apply(&self, req: ApplyRequest) -> Result<crate::ledger::ApplyResults, LedgerError> {
        let results = self.ledger.apply(req).await?;
        let mut finals: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
        for r in results.iter().flatten() {
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
            .map_err(|_| SettleError::Chain { chain_id, detail: "ledger scan task failed".into() })??
            .into_iter()
            .filter(|r| r.signed.chain_id == chain_id)
            .collect())
    }

    /// The gas model as learned from receipts so far.
    pub fn gas_model(&self) -> GasModel {
        self.learner.model()
    }

    // ---- chain reads --------------------------------------------------------------------

    async fn head(&self) -> Result<Head, SettleError> {
        let block = self
            .endpoint
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .map_err(|e| self.rpc_err("eth_getBlockByNumber", e))?
            .ok_or(SettleError::Chain { chain_id: self.chain_id, detail: "no latest block".into() })?;
        Ok(Head {
            number: block.header.number,
            hash: block.header.hash,
            timestamp: block.header.timestamp,
            gas_limit: block.header.gas_limit,
        })
    }

    async fn block_at(&self, number: u64) -> Result<Option<(B256, u64)>, SettleError> {
        Ok(self
            .endpoint
            .provider
            .get_block_by_number(BlockNumberOrTag::Number(number))
            .await
            .map_err(|e| self.rpc_err("eth_getBlockByNumber", e))?
            .map(|b| (b.header.hash, b.header.timestamp)))
    }

    /// The next block's base fee and a priority fee (the median tip of the last block, at
    /// least the configured minimum).
    async fn fees(&self) -> Result<Fees, SettleError> {
        let history = self
            .endpoint
            .provider
            .get_fee_history(1, BlockNumberOrTag::Latest, &[50.0])
            .await
            .map_err(|e| self.rpc_err("eth_feeHistory", e))?;
        let base_fee = history.base_fee_per_gas.last().copied().unwrap_or_default();
        let tip = history
            .reward
            .as_ref()
            .and_then(|r| r.last())
            .and_then(|r| r.first())
            .copied()
            .unwrap_or_default();
        Ok(Fees { base_fee, priority_fee: tip.max(self.config.min_priority_fee_wei) })
    }

    async fn account_nonce(&self, who: Address) -> Result<u64, SettleError> {
        self.endpoint
            .provider
            .get_transaction_count(who)
            .block_id(BlockId::latest())
            .await
            .map_err(|e| self.rpc_err("eth_getTransactionCount", e))
    }

    async fn receipt_of(&self, batch: &BatchRecord) -> Result<Option<TransactionReceipt>, SettleError> {
        for a in batch.attempts.iter().rev() {
            let r = self.receipt_by_hash(a.tx_hash).await?;
            if r.is_some() {
                return Ok(r);
            }
        }
        Ok(None)
    }

    async fn broadcast(&self, raw: &Bytes) -> Result<(), String> {
        self.endpoint
            .provider
            .send_raw_transaction(raw)
            .await
            .map(|_| ())
            .map_err(|e| self.endpoint.redact(&e.to_string()))
    }

    // ---- open batches -------------------------------------------------------------------

    async fn advance(
        &mut self,
        counter: u64,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let Some(batch) = self.open.get(&counter).cloned() else { return Ok(()) };
        match batch.status {
            BatchStatus::Signed => {
                // Recorded before it was sent: send it (again). A node that already has it
                // answers "already known" or "nonce too low"; the receipt decides later.
                for a in &batch.attempts {
                    if let Err(e) = self.broadcast(&a.raw).await {
                        tracing::debug!(batch = %batch.id(), "rebroadcast of a signed attempt: {e}");
                    }
                }
                self.mark_submitted(batch).await?;
            }
            BatchStatus::Submitted => self.follow_submitted(batch, head, fees, report).await?,
            BatchStatus::Included => self.follow_included(batch, head, report).await?,
            BatchStatus::Done | BatchStatus::Abandoned => {
                self.open.remove(&counter);
            }
        }
        Ok(())
    }

    async fn mark_submitted(&mut self, mut batch: BatchRecord) -> Result<(), SettleError> {
        let now_ms = self.now_ms();
        let transitions = batch
            .items
            .iter()
            .map(|k| {
                let mut t = TransitionRequest::new(*k, Status::Submitted, now_ms);
                t.only_from = Some(Status::Batched);
                t
            })
            .collect();
        batch.status = BatchStatus::Submitted;
        batch.updated_at_ms = now_ms;
        // Not atomic: an item already moved on (a restart after a partial round) keeps its state.
        self.apply(ApplyRequest { transitions, batch: Some(batch.clone()), atomic: false }).await?;
        self.open.insert(batch.counter, batch);
        Ok(())
    }

    async fn follow_submitted(
        &mut self,
        batch: BatchRecord,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        if let Some(receipt) = self.receipt_of(&batch).await? {
            return self.on_included(batch, receipt, report).await;
        }
        let Some(last) = batch.attempts.last().cloned() else {
            return self.abandon(batch, head, "batch has no signed transaction", report).await;
        };
        let chain_nonce = self.account_nonce(batch.settler).await?;
        if chain_nonce > last.tx_nonce {
            // The nonce was consumed. Look once more (it may have been mined just now).
            if let Some(receipt) = self.receipt_of(&batch).await? {
                return self.on_included(batch, receipt, report).await;
            }
            // A node may count the nonce before it serves the receipt: abandon only when a
            // later block still shows no receipt of ours.
            let first_seen = *self.consumed.entry(batch.counter).or_insert(head.number);
            if head.number <= first_seen {
                return Ok(());
            }
            self.consumed.remove(&batch.counter);
            return self
                .abandon(batch, head, "its account nonce was used by another transaction", report)
                .await;
        }
        if chain_nonce < last.tx_nonce && !self.lower_nonce_pending(&batch, chain_nonce) {
            // A gap (an earlier transaction of this account vanished in a reorg): re-sign
            // at the account's nonce, or this one can never be mined.
            let attempt = self.sign(&batch, chain_nonce, fees, None, head).await?;
            return self.add_attempt(batch, attempt, report, false).await;
        }
        let stuck = head.number.saturating_sub(last.signed_at_block) >= self.config.replace_after_blocks;
        let priced_out = last.max_fee_per_gas < fees.base_fee;
        if stuck || priced_out {
            match self.sign(&batch, last.tx_nonce, fees, Some(&last), head).await {
                Ok(attempt) => return self.add_attempt(batch, attempt, report, true).await,
                Err(SettleError::Chain { detail, .. }) => {
                    tracing::warn!(batch = %batch.id(), "cannot replace a stuck transaction: {detail}");
                }
                Err(e) => return Err(e),
            }
            return Ok(());
        }
        // Not found, not stuck: is it still known to the node? If not, it was dropped.
        let known = self
            .endpoint
            .provider
            .get_transaction_by_hash(last.tx_hash)
            .await
            .map_err(|e| self.rpc_err("eth_getTransactionByHash", e))?
            .is_some();
        if !known {
            self.metrics.transactions_dropped.increment(1);
            match self.broadcast(&last.raw).await {
                Ok(()) => {
                    report.rebroadcast += 1;
                    tracing::info!(batch = %batch.id(), tx = %last.tx_hash, "dropped transaction resubmitted");
                }
                Err(e) => {
                    tracing::info!(batch = %batch.id(), "resubmission refused ({e}); re-signing");
                    if let Ok(attempt) = self.sign(&batch, last.tx_nonce, fees, Some(&last), head).await {
                        self.add_attempt(batch, attempt, report, true).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether another open batch of the same settler holds a nonce in `[from, batch's)`.
    fn lower_nonce_pending(&self, batch: &BatchRecord, from: u64) -> bool {
        let mine = batch.tx_nonce().unwrap_or(0);
        self.open.values().any(|b| {
            b.counter != batch.counter
                && b.settler == batch.settler
                && matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted | BatchStatus::Included)
                && b.tx_nonce().is_some_and(|n| n >= from && n < mine)
        })
    }

    /// Records a new signed attempt, then broadcasts it.
    async fn add_attempt(
        &mut self,
        mut batch: BatchRecord,
        attempt: Attempt,
        report: &mut RoundReport,
        replacement: bool,
    ) -> Result<(), SettleError> {
        let raw = attempt.raw.clone();
        tracing::info!(
            batch = %batch.id(),
            tx = %attempt.tx_hash,
            nonce = attempt.tx_nonce,
            max_fee_per_gas = attempt.max_fee_per_gas,
            replacement,
            "new transaction for a batch"
        );
        batch.attempts.push(attempt);
        batch.updated_at_ms = self.now_ms();
        self.ledger
            .apply(ApplyRequest { transitions: Vec::new(), batch: Some(batch.clone()), atomic: false })
            .await?;
        self.open.insert(batch.counter, batch.clone());
        if let Err(e) = self.broadcast(&raw).await {
            tracing::warn!(batch = %batch.id(), "broadcast refused: {e}");
        }
        report.replaced += 1;
        if replacement {
            self.metrics.transactions_replaced.increment(1);
        }
        Ok(())
    }

    async fn on_included(
        &mut self,
        mut batch: BatchRecord,
        receipt: TransactionReceipt,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let (Some(block_number), Some(block_hash)) = (receipt.block_number, receipt.block_hash) else {
            return Ok(()); // a pending receipt: look again next round
        };
        let block_time = self.block_at(block_number).await?.map(|(_, t)| t).unwrap_or_default();
        let records = self.records_of(&batch)?;
        let n = batch.items.len().max(1) as u64;
        let gas_used = receipt.gas_used;
        let price = receipt.effective_gas_price;
        let gas_share = gas_used / n;
        let fee_share = U256::from(gas_used) * U256::from(price) / U256::from(n);
        let used: HashMap<(Address, B256), u64> = chain::authorization_logs(&receipt, batch.token)
            .into_iter()
            .map(|(from, nonce, index)| ((from, nonce), index))
            .collect();
        let now_ms = self.now_ms();
        let mut transitions = Vec::new();
        let mut settled_items = 0u32;
        let mut learn_ok = true;
        for record in records.iter().filter(|r| !included_elsewhere(r, &batch)) {
            let a = &record.signed.authorization;
            let mut t = TransitionRequest::new(record.key(), Status::Included, now_ms);
            t.only_from = Some(record.status);
            if let Some(&log_index) = used.get(&(a.from, a.nonce)) {
                t.evidence = Some(Evidence {
                    tx_hash: receipt.transaction_hash,
                    block_number,
                    block_hash,
                    block_time,
                    log_index,
                    gas_share,
                    fee_share_wei: fee_share,
                });
                settled_items += 1;
                transitions.push(t);
                continue;
            }
            if record.status == Status::Included {
                // A reorg re-mined the transaction and this item no longer settled in it.
                t.to = Status::Accepted;
                transitions.push(t);
                continue;
            }
            learn_ok = false;
            let mut outcome = self.judge_unsettled(record, now_ms).await?;
            if outcome.to == Status::Failed || outcome.to == Status::Expired {
                outcome.evidence = Some(Evidence {
                    tx_hash: receipt.transaction_hash,
                    block_number,
                    block_hash,
                    block_time,
                    log_index: 0,
                    gas_share,
                    fee_share_wei: fee_share,
                });
            }
            transitions.push(outcome);
        }
        for t in &transitions {
            match t.to {
                Status::Failed => report.failed += 1,
                Status::Expired => report.expired += 1,
                Status::Accepted => report.requeued += 1,
                _ => {}
            }
        }
        if learn_ok && receipt.status() {
            self.learner.observe(batch.items.len(), gas_used);
            self.metrics.batch_gas_per_payment.record(gas_share as f64);
        }
        batch.status = BatchStatus::Included;
        batch.updated_at_ms = now_ms;
        batch.inclusion = Some(Inclusion {
            tx_hash: receipt.transaction_hash,
            block_number,
            block_hash,
            block_time,
            gas_used,
            effective_gas_price: price,
            settled_items,
        });
        let failed_before = transitions.iter().filter(|t| t.to.is_final()).count();
        let results =
            self.apply(ApplyRequest { transitions, batch: Some(batch.clone()), atomic: false }).await?;
        let moved = results.iter().filter(|r| r.is_ok()).count();
        tracing::info!(
            batch = %batch.id(),
            tx = %receipt.transaction_hash,
            block = block_number,
            items = batch.items.len(),
            settled_items,
            failed = failed_before,
            moved,
            gas_used,
            "batch included"
        );
        report.included += 1;
        self.open.insert(batch.counter, batch);
        Ok(())
    }

    /// The outcome of an item that did not settle in its transaction: simulated again alone.
    async fn judge_unsettled(
        &self,
        record: &PaymentRecord,
        now_ms: u64,
    ) -> Result<TransitionRequest, SettleError> {
        let mut t = TransitionRequest::new(record.key(), Status::Accepted, now_ms);
        t.only_from = Some(record.status);
        let gas = self.batch_gas_limit(1);
        let sim = simulate::simulate(&self.endpoint, std::slice::from_ref(&record.signed), gas)
            .await
            .map_err(|e| SettleError::Chain { chain_id: self.chain_id, detail: e.to_string() })?;
        match sim.into_iter().next() {
            None | Some(Ok(())) => {
                // It would settle now (it ran short of gas, or the payer's balance came
                // back): another batch tries again.
                tracing::warn!(payment = %record.payment_id(), "item did not settle in its batch but would now; re-queued");
            }
            Some(Err(failure)) => self.refusal(record, failure, &mut t).await?,
        }
        Ok(t)
    }

    /// Turns the token's refusal of an item into its transition: expired, failed, or, for
    /// a used nonce whose `AuthorizationUsed` log is in a transaction of ours, included.
    async fn refusal(
        &self,
        record: &PaymentRecord,
        failure: simulate::ItemFailure,
        t: &mut TransitionRequest,
    ) -> Result<(), SettleError> {
        match failure.reason {
            Reason::InvalidValidBefore => {
                t.to = Status::Expired;
                t.failure = Some((Reason::InvalidValidBefore, failure.message));
            }
            Reason::NonceAlreadyUsed => match self.find_our_use(record).await? {
                Some(ev) => {
                    t.to = Status::Included;
                    t.evidence = Some(ev);
                }
                None => {
                    t.to = Status::Failed;
                    t.failure = Some((Reason::NonceAlreadyUsed, failure.message));
                }
            },
            Reason::InvalidValidAfter => {
                // Not valid yet on chain: stays accepted for a later batch.
                t.to = Status::Accepted;
            }
            reason => {
                t.to = Status::Failed;
                t.failure = Some((reason, failure.message));
            }
        }
        Ok(())
    }

    /// The `AuthorizationUsed` log of `record`'s authorization if a transaction from one
    /// of our settlers emitted it: a payment that did settle (say, a reorged-out
    /// transaction mined again) must never be reported failed.
    async fn find_our_use(&self, record: &PaymentRecord) -> Result<Option<Evidence>, SettleError> {
        let head = self.head().await?.number;
        let a = &record.signed.authorization;
        let filter = Filter::new()
            .address(record.signed.token)
            .event_signature(IEip3009::AuthorizationUsed::SIGNATURE_HASH)
            .topic1(a.from.into_word())
            .topic2(a.nonce)
            .from_block(head.saturating_sub(LOG_LOOKBACK_BLOCKS))
            .to_block(head);
        let logs =
            self.endpoint.provider.get_logs(&filter).await.map_err(|e| self.rpc_err("eth_getLogs", e))?;
        for log in logs.into_iter().filter(|l| !l.removed) {
            let Some(tx_hash) = log.transaction_hash else { continue };
            let Some(receipt) = self.receipt_by_hash(tx_hash).await? else { continue };
            if self.settlers.iter().any(|s| s.address == receipt.from) {
                return self.evidence_in(&receipt, record).await;
            }
        }
        Ok(None)
    }

    async fn receipt_by_hash(&self, tx_hash: B256) -> Result<Option<TransactionReceipt>, SettleError> {
        self.endpoint
            .provider
            .get_transaction_receipt(tx_hash)
            .await
            .map_err(|e| self.rpc_err("eth_getTransactionReceipt", e))
    }

    /// `record`'s own `AuthorizationUsed` log in a mined `receipt`, as evidence; its gas
    /// and fee share is the transaction's divided by the authorizations it used.
    async fn evidence_in(
        &self,
        receipt: &TransactionReceipt,
        record: &PaymentRecord,
    ) -> Result<Option<Evidence>, SettleError> {
        let (Some(block_number), Some(block_hash)) = (receipt.block_number, receipt.block_hash) else {
            return Ok(None);
        };
        let a = &record.signed.authorization;
        let used = chain::authorization_logs(receipt, record.signed.token);
        let Some(&(_, _, log_index)) =
            used.iter().find(|(from, nonce, _)| *from == a.from && *nonce == a.nonce)
        else {
            return Ok(None);
        };
        let n = used.len() as u64;
        let block_time = self.block_at(block_number).await?.map(|(_, t)| t).unwrap_or_default();
        Ok(Some(Evidence {
            tx_hash: receipt.transaction_hash,
            block_number,
            block_hash,
            block_time,
            log_index,
            gas_share: receipt.gas_used / n,
            fee_share_wei: U256::from(receipt.gas_used) * U256::from(receipt.effective_gas_price)
                / U256::from(n),
        }))
    }

    /// Included payments that no open batch follows: those whose evidence is another
    /// transaction of ours than their batch's (found by [`Self::find_our_use`]), or whose
    /// batch was closed while they were included. Each is judged on its own evidence:
    /// settled once its block is `confirmations` deep on the canonical chain; after a
    /// reorg, included again where its transaction was mined anew, else back to accepted
    /// (or expired). Without this sweep such a payment would wait forever.
    async fn sweep_included(
        &mut self,
        pending: &[PaymentRecord],
        head: &Head,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let followed: HashSet<(String, B256)> = self
            .open
            .values()
            .filter(|b| b.status == BatchStatus::Included)
            .filter_map(|b| b.inclusion.map(|i| (b.id(), i.tx_hash)))
            .collect();
        let orphans: Vec<&PaymentRecord> = pending
            .iter()
            .filter(|r| r.status == Status::Included)
            .filter(|r| !r.tx_hash.is_some_and(|h| followed.contains(&(r.batch_id.clone(), h))))
            .collect();
        if orphans.is_empty() {
            return Ok(());
        }
        let now_ms = self.now_ms();
        let mut canonical: HashMap<u64, Option<B256>> = HashMap::new();
        let mut transitions = Vec::new();
        for r in orphans {
            let (Some(tx_hash), Some(block_hash)) = (r.tx_hash, r.block_hash) else {
                transitions.push(self.requeue(r, head, "it was included without evidence", now_ms));
                continue;
            };
            let hash = match canonical.get(&r.block_number) {
                Some(h) => *h,
                None => {
                    let h = self.block_at(r.block_number).await?.map(|(h, _)| h);
                    canonical.insert(r.block_number, h);
                    h
                }
            };
            if hash == Some(block_hash) {
                let depth = head.number.saturating_sub(r.block_number) + 1;
                if depth >= self.policy.confirmations {
                    if let Some(cache) = &self.balances {
                        cache.invalidate(&r.key().payer());
                    }
                    let mut t = TransitionRequest::new(r.key(), Status::Settled, now_ms);
                    t.only_from = Some(Status::Included);
                    transitions.push(t);
                }
                continue;
            }
            tracing::warn!(payment = %r.payment_id(), block = r.block_number, "reorg: the block of an included payment changed");
            self.metrics.reorgs.increment(1);
            let evidence = match self.receipt_by_hash(tx_hash).await? {
                Some(receipt) => self.evidence_in(&receipt, r).await?,
                None => None,
            };
            match evidence {
                Some(ev) => {
                    let mut t = TransitionRequest::new(r.key(), Status::Included, now_ms);
                    t.only_from = Some(Status::Included);
                    t.evidence = Some(ev);
                    transitions.push(t);
                }
                None => transitions.push(self.requeue(r, head, "its transaction was reorged out", now_ms)),
            }
        }
        let results =
            self.apply(ApplyRequest { transitions: transitions.clone(), batch: None, atomic: false }).await?;
        for (t, r) in transitions.iter().zip(&results) {
            if r.is_ok() {
                match t.to {
                    Status::Settled => report.settled += 1,
                    Status::Expired => report.expired += 1,
                    Status::Accepted => report.requeued += 1,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// A payment whose transaction is gone goes back to accepted while the chain can
    /// still take it, else it expires.
    fn requeue(&self, r: &PaymentRecord, head: &Head, why: &str, now_ms: u64) -> TransitionRequest {
        let still_valid = r.signed.authorization.valid_before > U256::from(head.timestamp.saturating_add(1));
        let mut t = TransitionRequest::new(
            r.key(),
            if still_valid { Status::Accepted } else { Status::Expired },
            now_ms,
        );
        t.only_from = Some(r.status);
        if !still_valid {
            t.failure = Some((Reason::InvalidValidBefore, format!("validBefore passed after {why}")));
        }
        t
    }

    async fn follow_included(
        &mut self,
        batch: BatchRecord,
        head: &Head,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let Some(inc) = batch.inclusion else {
            return self.abandon(batch, head, "included without inclusion data", report).await;
        };
        let canonical = self.block_at(inc.block_number).await?.map(|(h, _)| h);
        if canonical != Some(inc.block_hash) {
            tracing::warn!(batch = %batch.id(), block = inc.block_number, "reorg: the including block changed");
            self.metrics.reorgs.increment(1);
            return match self.receipt_of(&batch).await? {
                Some(receipt) if receipt.block_hash.is_some() => {
                    self.on_included(batch, receipt, report).await
                }
                _ => self.abandon(batch, head, "its transaction was reorged out", report).await,
            };
        }
        let depth = head.number.saturating_sub(inc.block_number) + 1;
        if depth < self.policy.confirmations {
            return Ok(());
        }
        let records = self.records_of(&batch)?;
        // A payment included by another transaction of ours is the sweep's to settle.
        let included: Vec<&PaymentRecord> = records
            .iter()
            .filter(|r| r.status == Status::Included && r.tx_hash == Some(inc.tx_hash))
            .collect();
        // Balances first: once exposure is released, a cached balance from before the
        // transfer would cover the same money twice.
        if let Some(cache) = &self.balances {
            for r in &included {
                cache.invalidate(&r.key().payer());
            }
        }
        let now_ms = self.now_ms();
        let transitions = included
            .iter()
            .map(|r| {
                let mut t = TransitionRequest::new(r.key(), Status::Settled, now_ms);
                t.only_from = Some(Status::Included);
                t
            })
            .collect();
        let mut done = batch.clone();
        done.status = BatchStatus::Done;
        done.updated_at_ms = now_ms;
        let results = self.apply(ApplyRequest { transitions, batch: Some(done), atomic: false }).await?;
        report.settled += results.iter().filter(|r| r.is_ok()).count();
        tracing::info!(batch = %batch.id(), settled = included.len(), depth, "batch settled");
        self.open.remove(&batch.counter);
        Ok(())
    }

    /// The batch's transaction is gone: its payments go back to accepted while the chain
    /// can still take them, else they expire.
    async fn abandon(
        &mut self,
        batch: BatchRecord,
        head: &Head,
        why: &str,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let records = self.records_of(&batch)?;
        let now_ms = self.now_ms();
        let mut transitions = Vec::new();
        for r in records
            .iter()
            .filter(|r| matches!(r.status, Status::Batched | Status::Submitted | Status::Included))
            .filter(|r| !included_elsewhere(r, &batch))
        {
            let t = self.requeue(r, head, why, now_ms);
            if t.to == Status::Expired {
                report.expired += 1;
            } else {
                report.requeued += 1;
            }
            transitions.push(t);
        }
        let mut gone = batch.clone();
        gone.status = BatchStatus::Abandoned;
        gone.updated_at_ms = now_ms;
        self.apply(ApplyRequest { transitions, batch: Some(gone), atomic: false }).await?;
        tracing::warn!(batch = %batch.id(), items = batch.items.len(), "batch abandoned: {why}");
        self.open.remove(&batch.counter);
        Ok(())
    }

    fn records_of(&self, batch: &BatchRecord) -> Result<Vec<PaymentRecord>, SettleError> {
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

    // ---- planning and sending -----------------------------------------------------------

    /// Settlers with no batch waiting for inclusion, the least recently used first.
    fn idle_settlers(&self) -> Vec<Settler> {
        let n = self.settlers.len();
        (0..n)
            .map(|i| &self.settlers[(self.next_settler + i) % n])
            .filter(|s| {
                !self.open.values().any(|b| {
                    b.settler == s.address && matches!(b.status, BatchStatus::Signed | BatchStatus::Submitted)
                })
            })
            .cloned()
            .collect()
    }

    async fn plan_and_send(
        &mut self,
        accepted: Vec<PaymentRecord>,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let chain_id = self.chain_id;
        if accepted.is_empty() {
            return Ok(());
        }
        let now_ms = self.now_ms();
        let now = (now_ms / 1000).max(head.timestamp);

        // Expired on chain: nothing can settle them any more.
        let (expired, live): (Vec<_>, Vec<_>) = accepted
            .into_iter()
            .partition(|r| r.signed.authorization.valid_before <= U256::from(head.timestamp));
        if !expired.is_empty() {
            let transitions = expired
                .iter()
                .map(|r| {
                    let mut t = TransitionRequest::new(r.key(), Status::Expired, now_ms);
                    t.only_from = Some(Status::Accepted);
                    t.failure = Some((
                        Reason::InvalidValidBefore,
                        format!(
                            "validBefore passed (chain time {}) before it could be settled",
                            head.timestamp
                        ),
                    ));
                    t
                })
                .collect();
            let results = self.apply(ApplyRequest { transitions, batch: None, atomic: false }).await?;
            report.expired += results.iter().filter(|r| r.is_ok()).count();
        }

        let mut idle = self.idle_settlers();
        if idle.is_empty() {
            return Ok(());
        }
        let mut by_token: BTreeMap<Address, Vec<PaymentRecord>> = BTreeMap::new();
        for r in live {
            by_token.entry(r.signed.token).or_default().push(r);
        }
        // The live value, read after this round's pending payments were: a payment
        // accepted after a pause took effect is never batched before the resume.
        if self.policy.paused || self.policy_rx.borrow().paused {
            return Ok(());
        }
        let policy = Policy {
            max_batch_size: self.policy.max_batch_size,
            max_wait_secs: self.policy.max_wait_secs,
            target_cost_per_payment_wei: self.policy.target_cost_per_payment_wei,
            deadline_margin_secs: self.policy.deadline_margin_secs,
        };
        let model = self.learner.model();
        let caps = self.caps(head, model);
        let affordable = fees.per_gas() <= self.config.max_fee_per_gas_wei;
        for (token, mut records) in by_token {
            while !records.is_empty() && !idle.is_empty() {
                let pending: Vec<Pending> = records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Pending {
                        id: i,
                        accepted_at: r.accepted_at_ms / 1000,
                        valid_after: saturate(r.signed.authorization.valid_after),
                        valid_before: saturate(r.signed.authorization.valid_before),
                    })
                    .collect();
                let plan = planner::plan(now, &pending, fees, model, caps, &policy);
                let Some((ids, reason)) = plan.cut else { break };
                if !affordable {
                    tracing::warn!(
                        chain_id,
                        base_fee = fees.base_fee,
                        max_fee_per_gas = self.config.max_fee_per_gas_wei,
                        "fees above settlement.max_fee_per_gas_wei: batches wait"
                    );
                    break;
                }
                let chosen: HashSet<usize> = ids.iter().copied().collect();
                let mut batch_records = Vec::with_capacity(ids.len());
                let mut rest = Vec::with_capacity(records.len() - ids.len());
                for (i, r) in records.into_iter().enumerate() {
                    if chosen.contains(&i) {
                        batch_records.push(r);
                    } else {
                        rest.push(r);
                    }
                }
                records = rest;
                let settler = idle.remove(0);
                if let Some(i) = self.settlers.iter().position(|s| s.address == settler.address) {
                    self.next_settler = i + 1;
                }
                self.cut(token, batch_records, reason, settler, head, fees, report).await?;
            }
        }
        Ok(())
    }

    /// Caps for the planner such that the batches it plans get a gas limit (the limit
    /// model plus margin) within the per-transaction and block gas caps.
    fn caps(&self, head: &Head, model: GasModel) -> Caps {
        let cap = self.config.tx_gas_cap.min(head.gas_limit.max(1));
        let margin = self.config.gas_limit_margin_percent;
        // Largest n whose limit fits (the limit is linear in n: a short search).
        let (mut lo, mut hi) = (0usize, self.policy.max_batch_size);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.learner.gas_limit(mid, margin) <= cap {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let tx_gas = if lo >= self.policy.max_batch_size {
            u64::MAX
        } else {
            model.fixed.saturating_add(model.per_item.saturating_mul(lo as u64))
        };
        Caps { tx_gas, block_gas: u64::MAX }
    }

    #[allow(clippy::too_many_arguments)]
    async fn cut(
        &mut self,
        token: Address,
        records: Vec<PaymentRecord>,
        reason: CutReason,
        settler: Settler,
        head: &Head,
        fees: Fees,
        report: &mut RoundReport,
    ) -> Result<(), SettleError> {
        let now_ms = self.now_ms();
        // Pre-simulation: what the token would refuse now does not go in the batch.
        let signed: Vec<_> = records.iter().map(|r| r.signed.clone()).collect();
        let gas = self.batch_gas_limit(signed.len());
        let sim = simulate::simulate(&self.endpoint, &signed, gas)
            .await
            .map_err(|e| SettleError::Chain { chain_id: self.chain_id, detail: e.to_string() })?;
        let mut refusals = Vec::new();
        let mut items = Vec::new();
        for (record, outcome) in records.into_iter().zip(sim) {
            match outcome {
                Ok(()) => items.push(record),
                Err(failure) => {
                    let mut t = TransitionRequest::new(record.key(), Status::Failed, now_ms);
                    t.only_from = Some(Status::Accepted);
                    self.refusal(&record, failure, &mut t).await?;
                    if t.to != Status::Accepted {
                        refusals.push(t);
                    }
                }
            }
        }
        if !refusals.is_empty() {
            let results = self
                .apply(ApplyRequest { transitions: refusals.clone(), batch: None, atomic: false })
                .await?;
            for (t, r) in refusals.iter().zip(&results) {
                if r.is_ok() {
                    match t.to {
                        Status::Failed => report.failed += 1,
                        Status::Expired => report.expired += 1,
                        _ => {}
                    }
                    if let Some((reason, msg)) = &t.failure {
                        tracing::info!(payment = %t.key.payment_id(), reason = reason.code(), "refused before sending: {msg}");
                    }
                }
            }
        }
        if items.is_empty() {
            return Ok(());
        }

        let counter = self.next_counter;
        self.next_counter += 1;
        let nonce = self.account_nonce(settler.address).await?;
        let mut batch = BatchRecord {
            chain_id: self.chain_id,
            counter,
            token,
            settler: settler.address,
            items: items.iter().map(PaymentRecord::key).collect(),
            cut_reason: reason.as_str().to_owned(),
            status: BatchStatus::Signed,
            attempts: Vec::new(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            gas_limit: self.batch_gas_limit(items.len()),
            inclusion: None,
        };
        let attempt = self.sign(&batch, nonce, fees, None, head).await?;
        let raw = attempt.raw.clone();
        batch.attempts.push(attempt);
        let transitions = items
            .iter()
            .map(|r| {
                let mut t = TransitionRequest::new(r.key(), Status::Batched, now_ms);
                t.only_from = Some(Status::Accepted);
                t.batch_id = Some(batch.id());
                t
            })
            .collect();
        // Atomic: the signed transaction carries exactly these items, so either all of
        // them join the batch or the batch is not recorded (and never sent).
        match self.apply(ApplyRequest { transitions, batch: Some(batch.clone()), atomic: true }).await {
            Ok(_) => {}
            Err(LedgerError::IllegalTransition { id, .. }) => {
                tracing::info!(%id, "a payment changed while its batch was prepared; planning again next round");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            batch = %batch.id(),
            items = batch.items.len(),
            reason = reason.as_str(),
            settler = %settler.address,
            nonce,
            gas_limit = batch.gas_limit,
            "batch cut"
        );
        self.metrics.batch_cut(reason.as_str(), batch.items.len());
        if let Err(e) = self.broadcast(&raw).await {
            // Recorded as submitted anyway: the next round finds it unknown to the node and
            // re-signs it with current fees.
            tracing::warn!(batch = %batch.id(), "broadcast refused: {e}");
        }
        self.mark_submitted(batch).await?;
        report.batches_sent += 1;
        Ok(())
    }

    /// Signs the batch's transaction at `nonce`: current fees, or (replacing `previous`)
    /// at least `fee_bump_percent` above it; never above the configured maximum.
    async fn sign(
        &self,
        batch: &BatchRecord,
        nonce: u64,
        fees: Fees,
        previous: Option<&Attempt>,
        head: &Head,
    ) -> Result<Attempt, SettleError> {
        let cap = self.config.max_fee_per_gas_wei;
        let mut priority = fees.priority_fee;
        let mut max_fee = fees.base_fee.saturating_mul(2).saturating_add(priority);
        if let Some(p) = previous {
            let bump =
                |v: u128| v.saturating_mul(100 + u128::from(self.config.fee_bump_percent)).div_ceil(100);
            priority = priority.max(bump(p.max_priority_fee_per_gas));
            max_fee = max_fee.max(bump(p.max_fee_per_gas));
        }
        max_fee = max_fee.min(cap);
        priority = priority.min(max_fee);
        if let Some(p) = previous
            && (max_fee <= p.max_fee_per_gas || priority <= p.max_priority_fee_per_gas)
        {
            return Err(SettleError::Chain {
                chain_id: self.chain_id,
                detail: format!(
                    "the fee is already at settlement.max_fee_per_gas_wei ({cap}); the transaction waits for the base fee to fall"
                ),
            });
        }
        let records = self.records_of(batch)?;
        let signed: Vec<_> = records.iter().map(|r| r.signed.clone()).collect();
        let calldata = IMulticall3::aggregate3Call { calls: chain::batch_calls(&signed) }.abi_encode();
        let settler =
            self.settlers.iter().find(|s| s.address == batch.settler).ok_or_else(|| {
                SettleError::Sign(format!("settler {} is no longer configured", batch.settler))
            })?;
        let tx = TransactionRequest::default()
            .with_to(MULTICALL3)
            .with_input(calldata)
            .with_nonce(nonce)
            .with_chain_id(self.chain_id)
            .with_gas_limit(batch.gas_limit)
            .with_max_fee_per_gas(max_fee)
            .with_max_priority_fee_per_gas(priority);
        let envelope =
            <TransactionRequest as NetworkTransactionBuilder<Ethereum>>::build(tx, &settler.wallet)
                .await
                .map_err(|e| SettleError::Sign(e.to_string()))?;
        debug_assert_eq!(envelope.nonce(), nonce);
        Ok(Attempt {
            tx_hash: *envelope.tx_hash(),
            raw: envelope.encoded_2718().into(),
            max_fee_per_gas: max_fee,
            max_priority_fee_per_gas: priority,
            signed_at_block: head.number,
            tx_nonce: nonce,
        })
    }

    /// The gas limit a batch of `items` is sent (and simulated) with.
    fn batch_gas_limit(&self, items: usize) -> u64 {
        self.learner.gas_limit(items, self.config.gas_limit_margin_percent).min(self.config.tx_gas_cap)
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// Whether `record` is included by a transaction that is not one of `batch`'s: its own
/// evidence, not the batch, decides its outcome (see [`Engine::sweep_included`]).
fn included_elsewhere(record: &PaymentRecord, batch: &BatchRecord) -> bool {
    record.status == Status::Included
        && record.tx_hash.is_some_and(|h| !batch.attempts.iter().any(|a| a.tx_hash == h))
}

fn saturate(v: U256) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}
