//! `[settlement]`: settler accounts, the batching policy's starting values, fees, gas and
//! confirmations. Every default is a named constant with its reason.

use serde::{Deserialize, Deserializer};

use super::{ConfigError, invalid};
use crate::planner::{GasLearner, GasModel};
use crate::policy::SettlementPolicy;

/// Confirmations before a payment counts as settled: the included block and two more.
/// Enough for an L2 sequencer's soft finality and cheap on a devnet; operators of L1
/// settlement raise it.
pub const DEFAULT_CONFIRMATIONS: u64 = 3;

/// How often the settlement engine reads the chain head (new blocks, receipts, fees).
/// About one L2 block; each round is a handful of RPC calls.
pub const DEFAULT_SETTLE_POLL_MS: u64 = 1_000;

/// Largest batch. A batch of 50 already costs within ~2% of the asymptotic gas per
/// payment (BENCHMARKS.md); 200 keeps one receipt's work and one failure's blast radius
/// small while staying far below the 2^24 gas cap.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 200;

/// Longest an accepted payment waits for a batch when gas is expensive.
pub const DEFAULT_MAX_WAIT_SECS: u64 = 5;

/// Cut a batch at once when it costs at most this per payment: 1e14 wei (0.0001 ETH). At
/// 1 gwei a payment alone costs ~7e13 wei, so cheap gas means small batches at once; at a
/// 100 gwei spike even large batches cost more, and the planner waits to fill them.
pub const DEFAULT_TARGET_COST_PER_PAYMENT_WEI: u128 = 100_000_000_000_000;

/// Plan a payment at least this long before its `validBefore`: inclusion plus one fee
/// replacement on a slow chain.
pub const DEFAULT_DEADLINE_MARGIN_SECS: u64 = 10;

/// Highest fee per gas ever offered (wei): 500 gwei. A spike above it stalls settlement
/// (payments wait, then expire) rather than spending without bound.
pub const DEFAULT_MAX_FEE_PER_GAS_WEI: u128 = 500_000_000_000;

/// Priority fee offered when fee history suggests less: 0.1 gwei.
pub const DEFAULT_MIN_PRIORITY_FEE_WEI: u128 = 100_000_000;

/// Blocks a transaction may stay unmined before it is replaced with a higher fee.
pub const DEFAULT_REPLACE_AFTER_BLOCKS: u64 = 3;

/// Fee increase of a replacement, in percent. Nodes demand at least 12.5 %.
pub const DEFAULT_FEE_BUMP_PERCENT: u64 = 25;

/// Gas model seeds (learned from receipts afterwards). Measured: fixed 27k-42k, per item
/// 41.6k (minimal token), 45.3k (the devnet token), 49.3k (USDC to a funded payee), 71.3k
/// (USDC to a fresh payee).
pub const DEFAULT_FIXED_GAS: u64 = 40_000;
pub const DEFAULT_ITEM_GAS: u64 = 60_000;

/// Headroom of a batch's gas limit over the gas model, in percent. The limit must never
/// under-fund an item (the item would fail silently inside a successful transaction);
/// unused gas is not paid for.
pub const DEFAULT_GAS_LIMIT_MARGIN_PERCENT: u64 = 50;

/// The settlement engine: settler accounts, batching policy, fees, confirmations.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlementConfig {
    /// A file holding settler private keys, one hex key per line (`#` comments allowed).
    /// Readable by its owner only (mode 600), or the daemon refuses it.
    pub settler_keys_file: Option<std::path::PathBuf>,
    /// The name of an environment variable holding settler keys, comma separated.
    pub settler_keys_env: Option<String>,
    /// See [`DEFAULT_CONFIRMATIONS`]; at least 1 (the including block).
    pub confirmations: u64,
    /// See [`DEFAULT_SETTLE_POLL_MS`].
    pub poll_interval_ms: u64,
    /// See [`DEFAULT_MAX_BATCH_SIZE`].
    pub max_batch_size: usize,
    /// See [`DEFAULT_MAX_WAIT_SECS`].
    pub max_wait_secs: u64,
    /// See [`DEFAULT_TARGET_COST_PER_PAYMENT_WEI`]; a decimal string.
    #[serde(deserialize_with = "decimal_u128")]
    pub target_cost_per_payment_wei: u128,
    /// See [`DEFAULT_DEADLINE_MARGIN_SECS`].
    pub deadline_margin_secs: u64,
    /// See [`DEFAULT_MAX_FEE_PER_GAS_WEI`]; a decimal string.
    #[serde(deserialize_with = "decimal_u128")]
    pub max_fee_per_gas_wei: u128,
    /// See [`DEFAULT_MIN_PRIORITY_FEE_WEI`]; a decimal string.
    #[serde(deserialize_with = "decimal_u128")]
    pub min_priority_fee_wei: u128,
    /// See [`DEFAULT_REPLACE_AFTER_BLOCKS`].
    pub replace_after_blocks: u64,
    /// See [`DEFAULT_FEE_BUMP_PERCENT`]; at least 13.
    pub fee_bump_percent: u64,
    /// Per-transaction gas cap (EIP-7825).
    pub tx_gas_cap: u64,
    /// See [`DEFAULT_FIXED_GAS`].
    pub fixed_gas: u64,
    /// See [`DEFAULT_ITEM_GAS`].
    pub item_gas: u64,
    /// See [`DEFAULT_GAS_LIMIT_MARGIN_PERCENT`].
    pub gas_limit_margin_percent: u64,
}

impl std::fmt::Debug for SettlementConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Where keys come from is fine to show; the keys are never in this struct.
        f.debug_struct("SettlementConfig")
            .field("settler_keys_file", &self.settler_keys_file)
            .field("settler_keys_env", &self.settler_keys_env)
            .field("confirmations", &self.confirmations)
            .field("max_batch_size", &self.max_batch_size)
            .finish_non_exhaustive()
    }
}

impl Default for SettlementConfig {
    fn default() -> Self {
        Self {
            settler_keys_file: None,
            settler_keys_env: None,
            confirmations: DEFAULT_CONFIRMATIONS,
            poll_interval_ms: DEFAULT_SETTLE_POLL_MS,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            max_wait_secs: DEFAULT_MAX_WAIT_SECS,
            target_cost_per_payment_wei: DEFAULT_TARGET_COST_PER_PAYMENT_WEI,
            deadline_margin_secs: DEFAULT_DEADLINE_MARGIN_SECS,
            max_fee_per_gas_wei: DEFAULT_MAX_FEE_PER_GAS_WEI,
            min_priority_fee_wei: DEFAULT_MIN_PRIORITY_FEE_WEI,
            replace_after_blocks: DEFAULT_REPLACE_AFTER_BLOCKS,
            fee_bump_percent: DEFAULT_FEE_BUMP_PERCENT,
            tx_gas_cap: crate::chain::TX_GAS_CAP,
            fixed_gas: DEFAULT_FIXED_GAS,
            item_gas: DEFAULT_ITEM_GAS,
            gas_limit_margin_percent: DEFAULT_GAS_LIMIT_MARGIN_PERCENT,
        }
    }
}

impl SettlementConfig {
    /// The runtime policy this section starts the daemon with (never paused).
    pub fn policy(&self) -> SettlementPolicy {
        SettlementPolicy {
            max_batch_size: self.max_batch_size,
            max_wait_secs: self.max_wait_secs,
            target_cost_per_payment_wei: self.target_cost_per_payment_wei,
            confirmations: self.confirmations,
            deadline_margin_secs: self.deadline_margin_secs,
            paused: false,
        }
    }

    /// The gas model before any receipt: the configured seeds.
    pub fn seed_gas(&self) -> GasModel {
        GasModel { fixed: self.fixed_gas, per_item: self.item_gas }
    }

    /// The gas limit of a batch of `items` under what `learner` has learnt (never below
    /// the seeds), plus the margin, within the per-transaction cap. Estimation is never
    /// used: `eth_estimateGas` under-funds small `allowFailure` batches (an inner call runs
    /// out of gas while the outer call succeeds).
    pub fn gas_limit(&self, learner: &GasLearner, items: usize) -> u64 {
        learner.gas_limit(items, self.gas_limit_margin_percent).min(self.tx_gas_cap)
    }

    /// The gas limit of a batch of `items` before anything is learnt (the devnet's batches
    /// and tests send with it).
    pub fn seed_gas_limit(&self, items: usize) -> u64 {
        self.gas_limit(&GasLearner::new(self.seed_gas(), 2), items)
    }

    /// Whether settler keys are configured (without them the daemon accepts and holds).
    pub fn enabled(&self) -> bool {
        self.settler_keys_file.is_some() || self.settler_keys_env.is_some()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let f = |name: &str| format!("settlement.{name}");
        // The runtime-tunable fields obey the same bounds as a change through Admin.
        self.policy().validate().map_err(|e| invalid(f(e.field), e.reason))?;
        if self.poll_interval_ms == 0 {
            return Err(invalid(f("poll_interval_ms"), "must be at least 1"));
        }
        if self.fee_bump_percent < 13 {
            return Err(invalid(f("fee_bump_percent"), "must be at least 13 (nodes demand +12.5 %)"));
        }
        if self.replace_after_blocks == 0 {
            return Err(invalid(f("replace_after_blocks"), "must be at least 1"));
        }
        if self.max_fee_per_gas_wei == 0 {
            return Err(invalid(f("max_fee_per_gas_wei"), "must be positive"));
        }
        if self.min_priority_fee_wei > self.max_fee_per_gas_wei {
            return Err(invalid(f("min_priority_fee_wei"), "must not exceed max_fee_per_gas_wei"));
        }
        if self.item_gas == 0 {
            return Err(invalid(f("item_gas"), "must be positive"));
        }
        if self.tx_gas_cap < self.fixed_gas.saturating_add(self.item_gas) {
            return Err(invalid(f("tx_gas_cap"), "must fit at least one item (fixed_gas + item_gas)"));
        }
        if self.settler_keys_env.as_deref().is_some_and(str::is_empty) {
            return Err(invalid(f("settler_keys_env"), "must name an environment variable"));
        }
        Ok(())
    }
}

fn decimal_u128<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<u128>().map_err(|_| serde::de::Error::custom(format!("{s:?} is not a decimal integer of wei")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_gas_limit_has_its_margin_and_stays_within_the_transaction_cap() {
        let c = SettlementConfig::default();
        let one = DEFAULT_FIXED_GAS + DEFAULT_ITEM_GAS;
        assert_eq!(c.seed_gas_limit(1), one + one * DEFAULT_GAS_LIMIT_MARGIN_PERCENT / 100);
        assert_eq!(c.seed_gas_limit(1_000_000), crate::chain::TX_GAS_CAP);
        let mut learner = GasLearner::new(c.seed_gas(), 4);
        learner.observe(10, 300_000);
        learner.observe(10, 300_000);
        assert_eq!(c.gas_limit(&learner, 1), c.seed_gas_limit(1), "never below the seeds");
    }
}
