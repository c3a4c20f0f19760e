//! Config reload on SIGHUP: the settlement policy and the credentials apply without a
//! restart.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::auth::Auth;
use crate::config::Config;
use crate::policy::{PolicyHandle, SettlementPolicy};

/// The SIGHUP stream, for a config read from a file (none for one built in code). Taking it
/// also stops a SIGHUP from killing the daemon (the default action).
pub(super) fn hangup_signal(config: &Config) -> Option<(PathBuf, Signal)> {
    let source = config.source.clone()?;
    match signal(SignalKind::hangup()) {
        Ok(s) => Some((source, s)),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP ({e}); config reload is off");
            None
        }
    }
}

/// Re-reads the config file on every SIGHUP and applies its settlement policy (batch size,
/// max wait, target cost, confirmations, deadline margin; pause stays as it is) and its
/// credentials (a removed one is revoked for the next call). A file that does not parse or
/// validate, or that would turn authentication on or off, changes nothing and is logged;
/// other sections need a restart.
pub(super) async fn on_sighup(source: PathBuf, mut hangup: Signal, policy: PolicyHandle, auth: Arc<Auth>) {
    while hangup.recv().await.is_some() {
        let path = source.display().to_string();
        match Config::load(&source) {
            Ok(new) if new.credentials.is_empty() == auth.required() => tracing::warn!(
                config = %path,
                "config reload refused, nothing changed: turning authentication on or off needs a restart"
            ),
            Ok(new) => {
                let from_file = new.settlement.policy();
                let result = policy.update(&format!("SIGHUP {path}"), |current| {
                    Ok(SettlementPolicy { paused: current.paused, ..from_file.clone() })
                });
                if result.is_err() {
                    continue;
                }
                // Validated with the file, and the on/off switch is excluded above.
                if let Err(e) = auth.reload(&new.credentials) {
                    tracing::error!(config = %path, "policy reloaded but credentials not: {e}");
                    continue;
                }
                tracing::info!(
                    config = %path,
                    credentials = new.credentials.len(),
                    "config reloaded ([settlement] policy fields and [[credentials]] apply without a restart)"
                );
            }
            Err(e) => tracing::warn!(config = %path, "config reload refused, nothing changed: {e}"),
        }
    }
}
