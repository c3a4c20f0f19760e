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

/// How often the settlement engine reads the chain head when none of its transactions is in
/// flight (new blocks for depth and finality, fees). With one in flight it looks sooner (see
/// `settle::pace`), and a payment arriving wakes it at once. About one L2 block; each look
/// is one RPC call, a round with a new head a handful.
pub const DEFAULT_SETTLE_POLL_MS: u64 = 1_000;

/// Fleet mode (a PostgreSQL ledger several daemons share): how long a daemon's lease on a
/// settler account lasts without renewal (renewed every round). A daemon that dies is
/// replaced on its accounts this long after its last round at most.
pub const DEFAULT_LEASE_MS: u64 = 10_000;

/// Largest batch. A batch of 50 already costs within ~2% of the asymptotic gas per
/// payment (BENCHMARKS.md); 200 keeps one receipt's work and one failure's blast radius
/// small while staying far below the 2^24 gas cap.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 200;

/// Longest an accepted payment waits for a batch when gas is expensive (milliseconds).
pub const DEFAULT_MAX_WAIT_MS: u64 = 5_000;

/// How long a batch that already meets the cost target, but is not full, waits for more
/// payments (milliseconds, from its oldest payment). A quarter of a second costs little
/// latency against 1-2 s blocks and lets a burst share one transaction instead of the first
/// payment leaving alone.
pub const DEFAULT_LINGER_MS: u64 = 250;

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

/// Headroom of a batch's gas limit over what receipts taught (the dearest batch seen, see
/// [`GasLearner::envelope`]), in percent: covers the gas a refund hides from a receipt and
/// state that changed since. Every batch is simulated at its own limit before it is sent,
/// and one whose items would run short is sent with the seed limit instead.
pub const DEFAULT_GAS_LIMIT_MARGIN_PERCENT: u64 = 20;

/// Gas added to a batch's limit for each wallet it deploys (an ERC-6492 payer's factory
/// call, before its transfer). Measured: deploying the devnet's `OwnedWallet` through its
/// factory, 315k as a transaction of its own (with the 21k base). Real wallets' factories
/// differ; unused gas is not paid for.
pub const DEFAULT_ERC6492_DEPLOY_GAS: u64 = 500_000;

/// Headroom over the seeds, before the first receipt of a token (and the fallback limit):
/// 78k per item covers the dearest item measured (USDC to a fresh payee, 71.3k used, plus
/// the 4.8k a drained payer's refund hides), and 200 items still fit the 2^24 cap
/// (15.7M), so a cold daemon's first full batch is not split. Unused gas is not paid for,
/// but the settler must hold limit × max fee.
pub const DEFAULT_SEED_GAS_MARGIN_PERCENT: u64 = 30;

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
    /// See [`DEFAULT_LEASE_MS`]; more than `poll_interval_ms`.
    pub lease_ms: u64,
    /// See [`DEFAULT_MAX_BATCH_SIZE`].
    pub max_batch_size: usize,
    /// See [`DEFAULT_MAX_WAIT_MS`].
    pub max_wait_ms: Option<u64>,
    /// The same in whole seconds, as older configs say it (one or the other).
    pub max_wait_secs: Option<u64>,
    /// See [`DEFAULT_LINGER_MS`].
    pub linger_ms: u64,
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
    /// See [`DEFAULT_SEED_GAS_MARGIN_PERCENT`].
    pub seed_gas_margin_percent: u64,
    /// See [`DEFAULT_ERC6492_DEPLOY_GAS`].
    pub erc6492_deploy_gas: u64,
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
            lease_ms: DEFAULT_LEASE_MS,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            max_wait_ms: None,
            max_wait_secs: None,
            linger_ms: DEFAULT_LINGER_MS,
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
            seed_gas_margin_percent: DEFAULT_SEED_GAS_MARGIN_PERCENT,
            erc6492_deploy_gas: DEFAULT_ERC6492_DEPLOY_GAS,
        }
    }
}

impl SettlementConfig {
    /// The runtime policy this section starts the daemon with (never paused).
    pub fn policy(&self) -> SettlementPolicy {
        SettlementPolicy {
            max_batch_size: self.max_batch_size,
            max_wait_ms: self.max_wait_ms(),
            linger_ms: self.linger_ms,
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

    /// The maximum wait in milliseconds, however the config said it.
    pub fn max_wait_ms(&self) -> u64 {
        match (self.max_wait_ms, self.max_wait_secs) {
            (Some(ms), _) => ms,
            (None, Some(secs)) => secs.saturating_mul(1000),
            (None, None) => DEFAULT_MAX_WAIT_MS,
        }
    }

    /// The gas limit of a settlement of `items` under what `learner` has learnt: its
    /// envelope plus `gas_limit_margin_percent`, or the seeds' limit before any receipt;
    /// within the per-transaction cap. Estimation is never used:
    /// `eth_estimateGas` under-funds small `allowFailure` batches (an inner call runs out of
    /// gas while the outer call succeeds).
    pub fn gas_limit(&self, learner: &GasLearner, items: usize) -> u64 {
        self.gas_need(learner, items).min(self.tx_gas_cap)
    }

    /// [`Self::gas_limit`] before the per-transaction cap: what a settlement of `items`
    /// would ask for (the planner keeps batches small enough that it fits).
    pub fn gas_need(&self, learner: &GasLearner, items: usize) -> u64 {
        match learner.envelope(items) {
            Some(gas) => with_margin(gas, self.gas_limit_margin_percent),
            None => with_margin(self.seed_gas().batch_gas(items), self.seed_gas_margin_percent),
        }
    }

    /// The gas limit of a settlement of `items` before anything is learnt, and the limit a
    /// batch falls back to when its simulation at the learnt limit runs short (the
    /// devnet's batches and tests send with it too).
    pub fn seed_gas_limit(&self, items: usize) -> u64 {
        with_margin(self.seed_gas().batch_gas(items), self.seed_gas_margin_percent).min(self.tx_gas_cap)
    }

    /// `limit` with room for `deploys` wallet deployments, within the per-transaction cap.
    pub fn with_deployments(&self, limit: u64, deploys: usize) -> u64 {
        limit.saturating_add(self.erc6492_deploy_gas.saturating_mul(deploys as u64)).min(self.tx_gas_cap)
    }

    /// Whether settler keys are configured (without them the daemon accepts and holds).
    pub fn enabled(&self) -> bool {
        self.settler_keys_file.is_some() || self.settler_keys_env.is_some()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let f = |name: &str| format!("settlement.{name}");
        // The runtime-tunable fields obey the same bounds as a change through Admin.
        self.policy().validate().map_err(|e| invalid(f(e.field), e.reason))?;
        if self.max_wait_ms.is_some() && self.max_wait_secs.is_some() {
            return Err(invalid(f("max_wait_secs"), "set max_wait_ms or max_wait_secs, not both"));
        }
        if self.poll_interval_ms == 0 {
            return Err(invalid(f("poll_interval_ms"), "must be at least 1"));
        }
        if self.lease_ms <= self.poll_interval_ms {
            return Err(invalid(
                f("lease_ms"),
                "must be longer than settlement.poll_interval_ms (renewed every round)",
            ));
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

fn with_margin(gas: u64, percent: u64) -> u64 {
    gas.saturating_add(gas.saturating_mul(percent) / 100)
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
        assert_eq!(c.seed_gas_limit(1), one + one * DEFAULT_SEED_GAS_MARGIN_PERCENT / 100);
        assert_eq!(c.seed_gas_limit(1_000_000), crate::chain::TX_GAS_CAP);
        let learner = GasLearner::new(c.seed_gas(), 4);
        assert_eq!(c.gas_limit(&learner, 7), c.seed_gas_limit(7), "the seeds until a receipt");
    }

    #[test]
    fn a_learnt_gas_limit_is_the_envelope_plus_the_margin() {
        let c = SettlementConfig::default();
        let mut learner = GasLearner::new(c.seed_gas(), 4);
        learner.observe(200, 27_000 + 200 * 45_000);
        learner.observe(100, 27_000 + 100 * 45_000);
        let used = 27_000 + 200 * 45_000;
        assert_eq!(c.gas_limit(&learner, 200), used + used * DEFAULT_GAS_LIMIT_MARGIN_PERCENT / 100);
        assert!(c.gas_limit(&learner, 200) * 100 <= used * 125, "within 1.25x of what it uses");
        let mut dear = GasLearner::new(c.seed_gas(), 4);
        dear.observe(1, 500_000);
        assert_eq!(c.gas_limit(&dear, 1), 600_000, "above the seeds when the token costs more");
    }

    #[test]
    fn the_maximum_wait_is_said_in_milliseconds_or_in_seconds_but_not_both() {
        let mut c = SettlementConfig::default();
        assert_eq!(c.max_wait_ms(), DEFAULT_MAX_WAIT_MS);
        c.max_wait_secs = Some(2);
        assert_eq!(c.max_wait_ms(), 2_000);
        c.max_wait_ms = Some(1_500);
        assert!(c.validate().unwrap_err().to_string().contains("max_wait_secs"));
        c.max_wait_secs = None;
        assert_eq!((c.validate().is_ok(), c.policy().max_wait_ms), (true, 1_500));
    }
}
