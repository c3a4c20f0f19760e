//! The x402 facilitator HTTP API's settings: where it listens, when `POST /settle` answers
//! success ([`SettleMode`]), how long it waits, how long a verified payment is held.

use serde::Deserialize;

use super::{ConfigError, invalid};

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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
