//! The daemon's typed configuration (TOML). Every default is a named constant with the
//! reason for its value; [`Config::validate`] runs once at start-up and names the offending
//! field on failure.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use alloy::primitives::{Address, U256, address};
use serde::{Deserialize, Deserializer};

use crate::x402::eip712::TokenDomain;

/// x402's default `maxTimeoutSeconds`: a payment should settle within about five minutes.
pub const DEFAULT_MAX_TIMEOUT_SECS: u64 = 300;

/// An authorization must stay valid at least this long after admission. The reference
/// facilitators demand 6 s because they settle at once; a batcher also waits for a batch
/// (up to its max wait) and for inclusion, so it needs a wider margin.
pub const DEFAULT_MIN_VALIDITY_REMAINING_SECS: u64 = 30;

/// Submissions queued for signature checks before new ones are refused. At ~22k
/// recoveries/s per core this is ~0.1 s of work on 2 cores: enough to absorb bursts, small
/// enough that a queued payment is answered well within any client deadline.
pub const DEFAULT_VERIFY_QUEUE_CAPACITY: usize = 4096;

/// Verification threads; 0 means one per available core, since recovery is pure CPU.
pub const DEFAULT_VERIFY_THREADS: usize = 0;

/// Where the gRPC API listens unless configured: loopback, so a daemon started without
/// thought is not reachable from the network (authentication arrives with TLS).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Largest gRPC message accepted. A submission is ~2 KiB; 64 KiB leaves room for large
/// headers and refuses abuse cheaply.
/// The Admin listener: loopback, so only someone on the host can change settlement policy
/// unless the operator decides otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:50052";

pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Concurrent HTTP/2 streams per connection. A fleet node needs a few (one SubmitStream,
/// some unary calls); the bound stops one client from holding unbounded server state.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// Commands queued for the ledger writer before submissions are refused. One synced
/// group of 512 takes a few ms, so 8192 is tens of ms of backlog at most.
pub const DEFAULT_LEDGER_QUEUE_CAPACITY: usize = 8192;

/// How long a payer's on-chain balance is trusted. Short, because settlements outside the
/// daemon (the payer spending elsewhere) lower it; the ledger's exposure covers what the
/// daemon itself has accepted.
pub const DEFAULT_BALANCE_MAX_AGE_MS: u64 = 2_000;

/// Balances read in one `aggregate3` call: ~30k gas of `eth_call` each, far below node
/// limits, and one round trip for a burst of new payers.
pub const DEFAULT_BALANCE_MAX_BATCH: usize = 500;

/// How often accepted payments' nonces are checked on chain for use outside the daemon.
/// Each round is one `eth_call` per 500 pending payments; 5 s keeps a payment spent
/// elsewhere from lingering as accepted.
pub const DEFAULT_NONCE_AUDIT_INTERVAL_MS: u64 = 5_000;

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

/// How long `POST /settle` waits for the payment to reach its settle mode's state before
/// it answers `settlement_pending` (and the v2 client retries once). Two waits, the retry
/// included, stay well inside the v2 client's 90 s timeout; a batch on a 2 s chain is
/// usually included within the planner's max wait plus two blocks.
pub const DEFAULT_SETTLE_TIMEOUT_MS: u64 = 30_000;

/// Longest settle timeout allowed: two waits must end before the v2 client's 90 s timeout.
pub const MAX_SETTLE_TIMEOUT_MS: u64 = 44_000;

/// How long a payment verified by `POST /verify` stays held for its `POST /settle`. The API
/// route's handler runs in between; a minute covers a slow one, and a hold that is never
/// claimed only reserves the payer's balance (and refuses replays) that long.
pub const DEFAULT_HOLD_MS: u64 = 60_000;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid TOML or has an unknown field")]
    Parse(#[from] toml::de::Error),
    #[error("config field `{field}`: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), problem: problem.into() }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The tokens payments may be made in.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Extra x402 v1 network names (name → chain id), beyond the built-in ones.
    #[serde(default)]
    pub network_aliases: BTreeMap<String, u64>,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub verify: VerifyConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// RPC endpoints, one per chain that has a configured token.
    #[serde(default)]
    pub chains: Vec<ChainConfig>,
    #[serde(default)]
    pub balances: BalanceConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub settlement: SettlementConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// TLS on both gRPC listeners; off without this section.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Who may call, by bearer token or client certificate. With none, the daemon
    /// authenticates no one, which it allows only while every listener is on loopback.
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
    /// The x402 facilitator HTTP API; off without `listen`.
    #[serde(default)]
    pub facilitator: FacilitatorConfig,
    /// The file this config was loaded from (for a reload on SIGHUP); not a config key.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

/// When `POST /settle` answers success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettleMode {
    /// Once the payment's batch is included on chain: `transaction` is its hash (what the
    /// x402 specification means by settled).
    #[default]
    Included,
    /// Once it is at the configured confirmation depth.
    Confirmed,
    /// As soon as the payment is durably accepted, with `transaction` empty: the API serves
    /// at once, and the operator carries the risk of the batch window (the payer could
    /// spend the funds elsewhere before the batch lands).
    Accepted,
}

impl SettleMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SettleMode::Included => "included",
            SettleMode::Confirmed => "confirmed",
            SettleMode::Accepted => "accepted",
        }
    }
}

/// The x402 facilitator HTTP API (`GET /supported`, `POST /verify`, `POST /settle`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FacilitatorConfig {
    /// Where it listens (e.g. `127.0.0.1:8402`); absent: not served.
    pub listen: Option<std::net::SocketAddr>,
    /// See [`SettleMode`].
    pub settle_mode: SettleMode,
    /// See [`DEFAULT_SETTLE_TIMEOUT_MS`]; 1,000 to [`MAX_SETTLE_TIMEOUT_MS`].
    pub settle_timeout_ms: u64,
    /// See [`DEFAULT_HOLD_MS`]; 1,000 to 600,000.
    pub hold_ms: u64,
}

impl Default for FacilitatorConfig {
    fn default() -> Self {
        Self {
            listen: None,
            settle_mode: SettleMode::default(),
            settle_timeout_ms: DEFAULT_SETTLE_TIMEOUT_MS,
            hold_ms: DEFAULT_HOLD_MS,
        }
    }
}

impl FacilitatorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1_000..=MAX_SETTLE_TIMEOUT_MS).contains(&self.settle_timeout_ms) {
            return Err(invalid(
                "facilitator.settle_timeout_ms",
                format!(
                    "must be 1000 to {MAX_SETTLE_TIMEOUT_MS}: a settle and its one retry must answer within the \
                     x402 v2 client's 90 s timeout"
                ),
            ));
        }
        if !(1_000..=600_000).contains(&self.hold_ms) {
            return Err(invalid("facilitator.hold_ms", "must be 1000 to 600000 (ten minutes)"));
        }
        Ok(())
    }
}

/// Per-API-server submission limits (by the submission's `api_server`); all off by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Submissions per second per server (token bucket); 0 = no limit.
    pub per_server_rate: f64,
    /// Submissions a server may send at once above its rate; 0 = one second's worth.
    pub per_server_burst: usize,
    /// Submissions of one server being decided at once; 0 = no limit.
    pub per_server_in_flight: usize,
}

/// The Prometheus scrape endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served (e.g. `127.0.0.1:9464`); absent: not served.
    pub listen: Option<std::net::SocketAddr>,
}

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
    /// Whether settler keys are configured (without them the daemon accepts and holds).
    pub fn enabled(&self) -> bool {
        self.settler_keys_file.is_some() || self.settler_keys_env.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let f = |name: &str| format!("settlement.{name}");
        // The runtime-tunable fields obey the same bounds as a change through Admin.
        crate::policy::SettlementPolicy::from_config(self)
            .validate()
            .map_err(|e| invalid(f(e.field), e.reason))?;
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

/// The nonce audit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// See [`DEFAULT_NONCE_AUDIT_INTERVAL_MS`]; 0 turns the periodic audit off.
    pub nonce_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { nonce_interval_ms: DEFAULT_NONCE_AUDIT_INTERVAL_MS }
    }
}

/// The gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// See [`DEFAULT_LISTEN`].
    pub listen: std::net::SocketAddr,
    /// See [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
    /// See [`DEFAULT_MAX_CONCURRENT_STREAMS`].
    pub max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("constant address parses"),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// The Admin listener (the Admin service and health only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// See [`DEFAULT_ADMIN_LISTEN`].
    pub listen: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: DEFAULT_ADMIN_LISTEN.parse().expect("constant address parses") }
    }
}

/// TLS for both listeners (rustls; TLS 1.2 and 1.3, ALPN h2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM, leaf first).
    pub cert_file: std::path::PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1). Refused if group or others may read it.
    pub key_file: std::path::PathBuf,
    /// CA certificates (PEM) whose client certificates are verified. Clients may then
    /// authenticate by certificate; a certificate from another CA fails the handshake.
    /// Clients without a certificate may still present a bearer token.
    #[serde(default)]
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// What a credential may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An API server: Ingest and Payments, on `server.listen`.
    Api,
    /// An operator: Admin, on `admin.listen`.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Admin => "admin",
        }
    }
}

/// One caller: an API server or an operator, by bearer token, client certificate or both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// The caller's name: in logs, in the ledger's `api_server`, and the key of its limits.
    pub name: String,
    pub role: Role,
    /// SHA-256 of its bearer token, 64 hex digits (`x402-batcher new-token` makes a pair).
    /// The token itself is never stored in the config.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// A DNS name in its client certificate's subjectAltName (needs `tls.client_ca_file`).
    #[serde(default)]
    pub cert_name: Option<String>,
}

/// The RocksDB ledger.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Directory of the RocksDB ledger. Required to run the daemon: where the record of
    /// money owed lives is the operator's decision, never a silent default.
    pub path: Option<std::path::PathBuf>,
    /// See [`DEFAULT_LEDGER_QUEUE_CAPACITY`]; 0 means the default.
    pub queue_capacity: usize,
}

/// One chain's RPC endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub chain_id: u64,
    /// HTTP(S) JSON-RPC URL. May embed an API key: errors that quote it are redacted
    /// before they are logged or sent to clients (`chain::RpcEndpoint::redact`).
    pub rpc_url: String,
}

/// The payer balance cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// See [`DEFAULT_BALANCE_MAX_AGE_MS`].
    pub max_age_ms: u64,
    /// See [`DEFAULT_BALANCE_MAX_BATCH`].
    pub max_batch: usize,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self { max_age_ms: DEFAULT_BALANCE_MAX_AGE_MS, max_batch: DEFAULT_BALANCE_MAX_BATCH }
    }
}

/// One token on one chain, with the EIP-712 domain its signatures use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub chain_id: u64,
    pub address: Address,
    /// EIP-712 domain `name` ("USD Coin" for USDC on Base; "USDC" on Base Sepolia).
    pub eip712_name: String,
    /// EIP-712 domain `version` ("2" for USDC).
    pub eip712_version: String,
    /// Decimals of the token, for display and export only; amounts stay in base units.
    pub decimals: u8,
    #[serde(default)]
    pub symbol: String,
}

/// The cheap checks before signature recovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// See [`DEFAULT_MIN_VALIDITY_REMAINING_SECS`].
    pub min_validity_remaining_secs: u64,
    /// Largest single payment accepted, in base units; none by default. A safety cap
    /// against a misconfigured API server asking for far too much.
    #[serde(deserialize_with = "opt_decimal_u256")]
    pub max_value: Option<U256>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self { min_validity_remaining_secs: DEFAULT_MIN_VALIDITY_REMAINING_SECS, max_value: None }
    }
}

/// The signature verification pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// See [`DEFAULT_VERIFY_THREADS`].
    pub threads: usize,
    /// See [`DEFAULT_VERIFY_QUEUE_CAPACITY`].
    pub queue_capacity: usize,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self { threads: DEFAULT_VERIFY_THREADS, queue_capacity: DEFAULT_VERIFY_QUEUE_CAPACITY }
    }
}

impl VerifyConfig {
    /// The number of threads to start: the configured count, or one per core.
    pub fn effective_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }
}

fn opt_decimal_u256<'de, D: Deserializer<'de>>(d: D) -> Result<Option<U256>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| crate::x402::decode::parse_u256("max_value", &s).map_err(serde::de::Error::custom)).transpose()
}

impl Config {
    /// Reads, parses and validates a TOML config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut config = Config::parse(&text)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot: relations between fields and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = HashMap::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let field = |f: &str| format!("tokens[{i}].{f}");
            if t.chain_id == 0 {
                return Err(invalid(field("chain_id"), "must be a positive EIP-155 chain id"));
            }
            if t.address == Address::ZERO {
                return Err(invalid(field("address"), "must not be the zero address"));
            }
            if t.eip712_name.is_empty() {
                return Err(invalid(field("eip712_name"), "must not be empty"));
            }
            if t.eip712_version.is_empty() {
                return Err(invalid(field("eip712_version"), "must not be empty"));
            }
            if t.decimals > 77 {
                return Err(invalid(field("decimals"), "must be at most 77 (uint256 has 78 digits)"));
            }
            if let Some(j) = seen.insert((t.chain_id, t.address), i) {
                return Err(invalid(
                    field("address"),
                    format!("duplicates tokens[{j}] on chain {}", t.chain_id),
                ));
            }
        }
        for (name, &chain_id) in &self.network_aliases {
            if name.starts_with("eip155:") || name.is_empty() {
                return Err(invalid(
                    format!("network_aliases.{name}"),
                    "must be a plain name, not a CAIP-2 id",
                ));
            }
            if chain_id == 0 {
                return Err(invalid(format!("network_aliases.{name}"), "must be a positive chain id"));
            }
        }
        if self.verify.queue_capacity == 0 {
            return Err(invalid("verify.queue_capacity", "must be at least 1"));
        }
        if self.verify.threads > 1024 {
            return Err(invalid("verify.threads", "must be at most 1024 (0 = one per core)"));
        }
        if self.server.max_message_bytes < 1024 {
            return Err(invalid("server.max_message_bytes", "must be at least 1024"));
        }
        if self.server.max_concurrent_streams == 0 {
            return Err(invalid("server.max_concurrent_streams", "must be at least 1"));
        }
        self.settlement.validate()?;
        self.facilitator.validate()?;
        if !(self.limits.per_server_rate >= 0.0 && self.limits.per_server_rate.is_finite()) {
            return Err(invalid(
                "limits.per_server_rate",
                "must be a number of submissions per second, 0 or more",
            ));
        }
        if self.balances.max_batch == 0 {
            return Err(invalid("balances.max_batch", "must be at least 1"));
        }
        self.validate_access()?;
        let mut chains = HashMap::new();
        for (i, c) in self.chains.iter().enumerate() {
            if let Some(j) = chains.insert(c.chain_id, i) {
                return Err(invalid(format!("chains[{i}].chain_id"), format!("duplicates chains[{j}]")));
            }
            if !(c.rpc_url.starts_with("http://") || c.rpc_url.starts_with("https://")) {
                return Err(invalid(format!("chains[{i}].rpc_url"), "must be an http:// or https:// URL"));
            }
        }
        Ok(())
    }

    /// Checks the listeners, TLS and credentials together: no listener reachable from
    /// other hosts without authentication, no bearer token in clear text off the host, and
    /// every credential well formed and unique.
    fn validate_access(&self) -> Result<(), ConfigError> {
        let mut listeners = vec![("server.listen", self.server.listen), ("admin.listen", self.admin.listen)];
        if let Some(addr) = self.facilitator.listen {
            listeners.push(("facilitator.listen", addr));
        }
        for (i, (field, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| a.port() != 0 && a == addr) {
                return Err(invalid(*field, format!("must differ from {other}")));
            }
        }
        let client_ca = self.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        let (mut names, mut tokens, mut certs) = (HashMap::new(), HashMap::new(), HashMap::new());
        for (i, c) in self.credentials.iter().enumerate() {
            let field = |f: &str| format!("credentials[{i}].{f}");
            if c.name.is_empty() || c.name.len() > 128 || c.name.chars().any(char::is_control) {
                return Err(invalid(field("name"), "must be 1 to 128 printable characters"));
            }
            if let Some(j) = names.insert(c.name.as_str(), i) {
                return Err(invalid(field("name"), format!("duplicates credentials[{j}]")));
            }
            if c.token_sha256.is_none() && c.cert_name.is_none() {
                return Err(invalid(field("name"), "needs token_sha256, cert_name or both"));
            }
            if let Some(hash) = &c.token_sha256 {
                let hash =
                    crate::auth::parse_token_hash(hash).map_err(|e| invalid(field("token_sha256"), e))?;
                if let Some(j) = tokens.insert(hash, i) {
                    return Err(invalid(field("token_sha256"), format!("duplicates credentials[{j}]")));
                }
            }
            if let Some(name) = &c.cert_name {
                let name = crate::auth::parse_cert_name(name).map_err(|e| invalid(field("cert_name"), e))?;
                if !client_ca {
                    return Err(invalid(
                        field("cert_name"),
                        "needs tls.client_ca_file: client certificates are verified against it",
                    ));
                }
                if let Some(j) = certs.insert(name, i) {
                    return Err(invalid(field("cert_name"), format!("duplicates credentials[{j}]")));
                }
            }
        }
        if self.credentials.is_empty() {
            for &(field, addr) in &listeners {
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        field,
                        format!(
                            "{addr} is reachable from other hosts and no [[credentials]] are configured: \
                             anyone who can connect could call it. Add credentials, or listen on loopback"
                        ),
                    ));
                }
            }
        }
        for role in [Role::Api, Role::Admin] {
            if !self.credentials.is_empty() && !self.credentials.iter().any(|c| c.role == role) {
                return Err(invalid(
                    "credentials",
                    format!(
                        "no entry with role = \"{}\": with authentication on, its listener would refuse every call",
                        role.as_str()
                    ),
                ));
            }
        }
        if self.tls.is_none() && self.credentials.iter().any(|c| c.token_sha256.is_some()) {
            for &(field, addr) in &listeners {
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        field,
                        format!(
                            "{addr} is reachable from other hosts without [tls]: bearer tokens would \
                             cross the network in clear text"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks what running the daemon needs beyond a valid file: a ledger path, and an RPC
    /// endpoint for every chain a token is configured on.
    pub fn validate_for_run(&self) -> Result<(), ConfigError> {
        if self.ledger.path.is_none() {
            return Err(invalid("ledger.path", "is required to run the daemon"));
        }
        if self.tokens.is_empty() {
            return Err(invalid("tokens", "at least one token is required to run the daemon"));
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if !self.chains.iter().any(|c| c.chain_id == t.chain_id) {
                return Err(invalid(
                    format!("tokens[{i}].chain_id"),
                    format!("chain {} has no [[chains]] entry with an rpc_url", t.chain_id),
                ));
            }
        }
        if self.facilitator.listen.is_some() {
            self.validate_facilitator_settles()?;
        }
        Ok(())
    }

    /// A facilitator that waits for settlement needs an engine that settles.
    pub fn validate_facilitator_settles(&self) -> Result<(), ConfigError> {
        if self.facilitator.settle_mode != SettleMode::Accepted && !self.settlement.enabled() {
            return Err(invalid(
                "facilitator.settle_mode",
                format!(
                    "{:?} waits for settlement, which needs settler keys (settlement.settler_keys_file or \
                     settler_keys_env); use \"accepted\" to record payments without settling them",
                    self.facilitator.settle_mode.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// The token table built from `tokens`.
    pub fn token_table(&self) -> TokenTable {
        TokenTable::new(&self.tokens)
    }

    /// The public USDC deployments on Base and Base Sepolia: the shape of a real config.
    pub fn example_usdc_base() -> Config {
        Config {
            tokens: vec![
                TokenConfig {
                    chain_id: 8453,
                    address: address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
                    eip712_name: "USD Coin".into(),
                    eip712_version: "2".into(),
                    decimals: 6,
                    symbol: "USDC".into(),
                },
                TokenConfig {
                    chain_id: 84532,
                    address: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
                    eip712_name: "USDC".into(),
                    eip712_version: "2".into(),
                    decimals: 6,
                    symbol: "USDC".into(),
                },
            ],
            network_aliases: BTreeMap::new(),
            admission: AdmissionConfig::default(),
            verify: VerifyConfig::default(),
            server: ServerConfig::default(),
            ledger: LedgerConfig::default(),
            chains: Vec::new(),
            balances: BalanceConfig::default(),
            audit: AuditConfig::default(),
            settlement: SettlementConfig::default(),
            metrics: MetricsConfig::default(),
            limits: LimitsConfig::default(),
            admin: AdminConfig::default(),
            tls: None,
            credentials: Vec::new(),
            facilitator: FacilitatorConfig::default(),
            source: None,
        }
    }
}

/// A configured token, ready for verification.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub domain: TokenDomain,
    pub decimals: u8,
    pub symbol: String,
}

/// Lookup of configured tokens by `(chain id, address)`.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    by_key: HashMap<(u64, Address), TokenEntry>,
}

impl TokenTable {
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let by_key = tokens
            .iter()
            .map(|t| {
                let entry = TokenEntry {
                    domain: TokenDomain::new(&t.eip712_name, &t.eip712_version, t.chain_id, t.address),
                    decimals: t.decimals,
                    symbol: t.symbol.clone(),
                };
                ((t.chain_id, t.address), entry)
            })
            .collect();
        Self { by_key }
    }

    pub fn get(&self, chain_id: u64, token: Address) -> Option<&TokenEntry> {
        self.by_key.get(&(chain_id, token))
    }

    pub fn iter(&self) -> impl Iterator<Item = &TokenEntry> {
        self.by_key.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_file_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ops/config.example.toml")).unwrap();
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.tokens.len(), 2);
        let table = config.token_table();
        let usdc = table.get(8453, address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")).unwrap();
        assert_eq!(usdc.domain.name, "USD Coin");
        assert_eq!(config.admission.max_value, Some(U256::from(100_000_000u64)));
    }

    #[test]
    fn listeners_off_the_host_need_credentials_and_tokens_need_tls() {
        let hash = "ab".repeat(32);
        let other = "cd".repeat(32);
        let api = format!("[[credentials]]\nname = \"api-1\"\nrole = \"api\"\ntoken_sha256 = \"{hash}\"\n");
        let admin =
            format!("[[credentials]]\nname = \"ops\"\nrole = \"admin\"\ntoken_sha256 = \"{other}\"\n");
        let tls = "[tls]\ncert_file = \"s.pem\"\nkey_file = \"s.key\"\n";
        let remote = "[server]\nlisten = \"0.0.0.0:50051\"\n";
        let field = |text: &str| match Config::parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{text}: {other:?}"),
        };
        assert!(Config::parse("").is_ok(), "loopback without credentials");
        assert_eq!(field(remote), "server.listen");
        assert_eq!(field("[admin]\nlisten = \"10.0.0.1:50052\"\n"), "admin.listen");
        assert_eq!(field(&format!("{remote}{api}{admin}")), "server.listen", "tokens in clear text");
        assert!(Config::parse(&format!("{remote}{tls}{api}{admin}")).is_ok());
        assert!(Config::parse(&format!("{api}{admin}")).is_ok(), "tokens on loopback without TLS");
        assert_eq!(field(&api), "credentials", "no admin credential");
        let dup = admin.replace(&other, &hash);
        assert_eq!(field(&format!("{api}{dup}")), "credentials[1].token_sha256");
        assert_eq!(field(&format!("{api}{}", admin.replace("ops", "api-1"))), "credentials[1].name");
        let bad = admin.replace(&other, "xyz");
        assert_eq!(field(&format!("{api}{bad}")), "credentials[1].token_sha256");
        let cert = "[[credentials]]\nname = \"c\"\nrole = \"admin\"\ncert_name = \"ops.example\"\n";
        assert_eq!(field(&format!("{api}{cert}")), "credentials[1].cert_name", "needs a client CA");
        let ca = format!("{tls}client_ca_file = \"ca.pem\"\n");
        assert!(Config::parse(&format!("{ca}{api}{cert}")).is_ok());
        let ip = cert.replace("ops.example", "10.1.2.3");
        assert_eq!(field(&format!("{ca}{api}{ip}")), "credentials[1].cert_name");
        let neither = "[[credentials]]\nname = \"n\"\nrole = \"admin\"\n";
        assert_eq!(field(&format!("{api}{neither}")), "credentials[1].name");
        assert!(matches!(
            Config::parse("[[credentials]]\nname = \"x\"\nrole = \"root\"\n"),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn refusals_name_the_field() {
        let dup = r#"
            [[tokens]]
            chain_id = 1
            address = "0x0000000000000000000000000000000000000001"
            eip712_name = "A"
            eip712_version = "1"
            decimals = 6
            [[tokens]]
            chain_id = 1
            address = "0x0000000000000000000000000000000000000001"
            eip712_name = "B"
            eip712_version = "1"
            decimals = 6
        "#;
        let err = Config::parse(dup).unwrap_err().to_string();
        assert!(err.contains("tokens[1].address"), "{err}");
        let err = Config::parse("[verify]\nqueue_capacity = 0").unwrap_err().to_string();
        assert!(err.contains("verify.queue_capacity"), "{err}");
        let err = Config::parse("[verify]\nqeue_capacity = 4").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)));
        let err = Config::parse("[admission]\nmax_value = \"-3\"").unwrap_err();
        assert!(format!("{err:?}").contains("max_value"), "{err:?}");
    }
}
