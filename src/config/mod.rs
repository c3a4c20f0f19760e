//! The daemon's typed configuration (TOML): plain data and its validation. Every default is
//! a named constant with the reason for its value; [`Config::validate`] runs once at
//! start-up and names the offending field on failure.
//!
//! - [`access`]: listeners, TLS, credentials, limits, metrics;
//! - [`connections`]: what a client may hold on each listener (caps, timeouts);
//! - [`facilitator`]: the x402 facilitator HTTP API and its settle mode;
//! - [`ledger`]: which ledger backend, where, and how to log in to it;
//! - [`settlement`]: the `[settlement]` section;
//! - [`tokens`]: tokens, chains and the token table.

pub mod access;
pub mod connections;
pub mod facilitator;
pub mod ledger;
pub mod settlement;
pub mod tokens;

pub use access::{
    AdminConfig, CredentialConfig, DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_MESSAGE_BYTES, LimitsConfig, MetricsConfig, Role, ServerConfig, TlsConfig, parse_cert_name,
    parse_token_hash,
};
pub use connections::ConnectionsConfig;
pub use facilitator::{
    DEFAULT_HOLD_MS, DEFAULT_SETTLE_TIMEOUT_MS, FacilitatorConfig, MAX_SETTLE_TIMEOUT_MS, SettleMode,
};
pub use ledger::{LedgerBackend, LedgerConfig};
pub use settlement::{
    DEFAULT_CONFIRMATIONS, DEFAULT_DEADLINE_MARGIN_SECS, DEFAULT_ERC6492_DEPLOY_GAS,
    DEFAULT_FEE_BUMP_PERCENT, DEFAULT_FIXED_GAS, DEFAULT_GAS_LIMIT_MARGIN_PERCENT, DEFAULT_ITEM_GAS,
    DEFAULT_LEASE_MS, DEFAULT_LINGER_MS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_FEE_PER_GAS_WEI,
    DEFAULT_MAX_WAIT_MS, DEFAULT_MIN_PRIORITY_FEE_WEI, DEFAULT_REPLACE_AFTER_BLOCKS,
    DEFAULT_SEED_GAS_MARGIN_PERCENT, DEFAULT_SETTLE_POLL_MS, DEFAULT_TARGET_COST_PER_PAYMENT_WEI,
    SettlementConfig,
};
pub use tokens::{ChainConfig, Finality, FinalityTag, TokenConfig, TokenEntry, TokenTable};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use alloy::primitives::{Address, U256, address};
use serde::{Deserialize, Deserializer};

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

/// Commands queued for the ledger writer before submissions are refused. One synced
/// group of 512 takes a few ms, so 8192 is tens of ms of backlog at most.
pub const DEFAULT_LEDGER_QUEUE_CAPACITY: usize = 8192;

/// How long a payer's on-chain balance is trusted. Short, because settlements outside the
/// daemon (the payer spending elsewhere) lower it; the ledger's exposure covers what the
/// daemon itself has accepted.
pub const DEFAULT_BALANCE_MAX_AGE_MS: u64 = 2_000;

/// Payers read in one refresh round (their balances and code, by the deployless
/// `PayerProbe`: up to 191 per `eth_call`, a larger round's calls at once): one round trip
/// for a burst of new payers.
pub const DEFAULT_BALANCE_MAX_BATCH: usize = 500;

/// Longest one balance read may take before the submissions waiting on it are refused
/// (UNAVAILABLE): far below API clients' deadlines (5 s is common), far above a healthy
/// node's answer (a few ms). The general RPC timeout (10 s) is for settlement, not ingest.
pub const DEFAULT_BALANCE_READ_TIMEOUT_MS: u64 = 1_000;

/// How often accepted payments' nonces are checked on chain for use outside the daemon.
/// Each round is one `eth_call` per 500 pending payments; 5 s keeps a payment spent
/// elsewhere from lingering as accepted.
pub const DEFAULT_NONCE_AUDIT_INTERVAL_MS: u64 = 5_000;

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

pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
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
    #[serde(default)]
    pub connections: ConnectionsConfig,
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

/// The payer balance cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// See [`DEFAULT_BALANCE_MAX_AGE_MS`].
    pub max_age_ms: u64,
    /// See [`DEFAULT_BALANCE_MAX_BATCH`].
    pub max_batch: usize,
    /// See [`DEFAULT_BALANCE_READ_TIMEOUT_MS`].
    pub read_timeout_ms: u64,
    /// While a chain's node is failing, accept against a payer's last known balance if it
    /// is at most this much older than `max_age_ms` (the ledger still subtracts everything
    /// the payer has pending). 0, the default, refuses instead. A risk the operator takes:
    /// the payer may have spent elsewhere meanwhile, and such a payment fails at settlement
    /// after the API server has served it.
    pub stale_ok_ms: u64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            max_age_ms: DEFAULT_BALANCE_MAX_AGE_MS,
            max_batch: DEFAULT_BALANCE_MAX_BATCH,
            read_timeout_ms: DEFAULT_BALANCE_READ_TIMEOUT_MS,
            stale_ok_ms: 0,
        }
    }
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
    /// The token table, one line per token (what `check-config` prints).
    pub fn describe_tokens(&self) -> String {
        self.tokens
            .iter()
            .map(|t| {
                format!(
                    "chain {:>8}  {}  {:<6} domain {:?}/{:?}  {} decimals\n",
                    t.chain_id, t.address, t.symbol, t.eip712_name, t.eip712_version, t.decimals
                )
            })
            .collect()
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot: relations between fields and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.ledger.validate()?;
        self.connections.validate()?;
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
        if self.balances.read_timeout_ms == 0 {
            return Err(invalid("balances.read_timeout_ms", "must be at least 1"));
        }
        if self.balances.max_batch == 0 {
            return Err(invalid("balances.max_batch", "must be at least 1"));
        }
        access::validate(self)?;
        let mut chains = HashMap::new();
        for (i, c) in self.chains.iter().enumerate() {
            if let Some(j) = chains.insert(c.chain_id, i) {
                return Err(invalid(format!("chains[{i}].chain_id"), format!("duplicates chains[{j}]")));
            }
            c.validate_urls(i)?;
            if c.finality == Finality::Depth(0) {
                return Err(invalid(
                    format!("chains[{i}].finality"),
                    "must be \"finalized\", \"safe\" or a depth of at least 1 block",
                ));
            }
            if c.ws_url.as_ref().is_some_and(|u| !(u.starts_with("ws://") || u.starts_with("wss://"))) {
                return Err(invalid(format!("chains[{i}].ws_url"), "must be a ws:// or wss:// URL"));
            }
            if c.preconfirmation_ms.is_some_and(|ms| !(10..=10_000).contains(&ms)) {
                return Err(invalid(
                    format!("chains[{i}].preconfirmation_ms"),
                    "must be a flashblock interval of 10 to 10000 ms (Base: 200)",
                ));
            }
        }
        Ok(())
    }

    /// Checks what running the daemon needs beyond a valid file: a ledger path, and an RPC
    /// endpoint for every chain a token is configured on.
    pub fn validate_for_run(&self) -> Result<(), ConfigError> {
        match self.ledger.backend {
            LedgerBackend::Rocksdb if self.ledger.path.is_none() => {
                return Err(invalid("ledger.path", "is required to run the daemon"));
            }
            LedgerBackend::Postgres if self.ledger.url.is_none() => {
                return Err(invalid(
                    "ledger.url",
                    "is required to run the daemon with backend = \"postgres\"",
                ));
            }
            _ => {}
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
                    contract_signatures: true,
                },
                TokenConfig {
                    chain_id: 84532,
                    address: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
                    eip712_name: "USDC".into(),
                    eip712_version: "2".into(),
                    decimals: 6,
                    symbol: "USDC".into(),
                    contract_signatures: true,
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
            connections: ConnectionsConfig::default(),
            tls: None,
            credentials: Vec::new(),
            facilitator: FacilitatorConfig::default(),
            source: None,
        }
    }
}

/// The permission bits of a secret file the config names (a settler key file, a TLS key)
/// if group or others have any access to it: such a file is refused.
pub fn loose_mode(path: &std::path::Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
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
        let chain = |ms: u64| {
            format!("[[chains]]\nchain_id = 8453\nrpc_url = \"http://x\"\npreconfirmation_ms = {ms}")
        };
        let urls = |keys: &str| format!("[[chains]]\nchain_id = 8453\n{keys}");
        let err = Config::parse(&urls("")).unwrap_err().to_string();
        assert!(err.contains("chains[0].rpc_url"), "{err}");
        let both = urls("rpc_url = \"http://a\"\nrpc_urls = [\"http://b\"]");
        assert!(Config::parse(&both).unwrap_err().to_string().contains("chains[0].rpc_urls"));
        let bad = urls("rpc_urls = [\"http://a\", \"ftp://b\"]");
        assert!(Config::parse(&bad).unwrap_err().to_string().contains("chains[0].rpc_urls"));
        let two = Config::parse(&urls("rpc_urls = [\"http://a\", \"https://b\"]")).unwrap();
        assert_eq!(two.chains[0].urls(), ["http://a", "https://b"]);
        let err = Config::parse(&chain(0)).unwrap_err().to_string();
        assert!(err.contains("chains[0].preconfirmation_ms"), "{err}");
        assert_eq!(Config::parse(&chain(200)).unwrap().chains[0].preconfirmation_ms, Some(200));
        let ws =
            |url: &str| format!("[[chains]]\nchain_id = 8453\nrpc_url = \"http://x\"\nws_url = \"{url}\"");
        let err = Config::parse(&ws("http://x")).unwrap_err().to_string();
        assert!(err.contains("chains[0].ws_url") && !err.contains("http://x"), "{err}");
        assert!(Config::parse(&ws("wss://x/KEY")).is_ok());
    }

    #[test]
    fn the_fleet_example_config_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ops/fleet/config.toml")).unwrap();
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.ledger.backend, LedgerBackend::Postgres);
        config.validate_for_run().unwrap();
    }

    #[test]
    fn a_postgres_ledger_needs_a_url_without_its_password() {
        let pg = |rest: &str| Config::parse(&format!("[ledger]\nbackend = \"postgres\"\n{rest}"));
        let ok =
            pg("url = \"postgresql://batcher@db1:5432,db2:5432/x402?target_session_attrs=read-write\"\n\
                     password_env = \"X402_DB_PASSWORD\"")
            .unwrap();
        assert_eq!(ok.ledger.backend, LedgerBackend::Postgres);
        pg("url = \"host=db1 sslmode=require\"\nca_file = \"ca.pem\"").unwrap();
        let err = Config::parse("[ledger]\npath = \"l\"\nca_file = \"ca.pem\"").unwrap_err().to_string();
        assert!(err.contains("ledger.ca_file"), "{err}");
        let err = pg("url = \"host=db1\"\npath = \"/var/lib/x402\"").unwrap_err().to_string();
        assert!(err.contains("ledger.path"), "{err}");
        let err =
            pg("url = \"host=db1\"\npassword_file = \"p\"\npassword_env = \"P\"").unwrap_err().to_string();
        assert!(err.contains("ledger.password_env"), "{err}");
        let err = Config::parse("[ledger]\nurl = \"host=db1\"").unwrap_err().to_string();
        assert!(err.contains("ledger.url") && err.contains("postgres"), "{err}");
        let err = Config::parse("[ledger]\nbackend = \"mysql\"").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err:?}");
        let mut run = pg("").unwrap();
        run.tokens = ok.tokens.clone();
        let err = run.validate_for_run().unwrap_err().to_string();
        assert!(err.contains("ledger.url"), "{err}");
    }
}
