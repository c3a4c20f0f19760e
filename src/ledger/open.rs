//! Opening the configured ledger: RocksDB at `ledger.path`, or PostgreSQL at `ledger.url`
//! with its password from a file or an environment variable (never from the config file,
//! never logged).

use std::path::Path;
use std::sync::Arc;

use super::LedgerStore;
use super::error::LedgerError;
use super::postgres::{PgConnect, PgLedger};
use super::rocks::Ledger;
use crate::config::{LedgerBackend, LedgerConfig};

/// Opens the configured ledger for the daemon (creating or upgrading its schema).
pub fn open(config: &LedgerConfig) -> Result<Arc<dyn LedgerStore>, LedgerError> {
    Ok(match config.backend {
        LedgerBackend::Rocksdb => Arc::new(Ledger::open(rocks_path(config, None)?)?),
        LedgerBackend::Postgres => Arc::new(PgLedger::open(connect(config)?)?),
    })
}

/// Opens the configured ledger (or the RocksDB directory `over`) for reading only, beside
/// running daemons: exports, reconciliation.
pub fn open_read_only(
    config: &LedgerConfig,
    over: Option<&Path>,
) -> Result<Arc<dyn LedgerStore>, LedgerError> {
    Ok(match (config.backend, over) {
        (LedgerBackend::Rocksdb, _) | (_, Some(_)) => {
            Arc::new(Ledger::open_read_only(rocks_path(config, over)?)?)
        }
        (LedgerBackend::Postgres, None) => Arc::new(PgLedger::open_read_only(connect(config)?)?),
    })
}

fn rocks_path<'a>(config: &'a LedgerConfig, over: Option<&'a Path>) -> Result<&'a Path, LedgerError> {
    over.or(config.path.as_deref())
        .ok_or_else(|| LedgerError::Config("no ledger: set ledger.path (or pass --ledger)".into()))
}

/// Where the PostgreSQL ledger is, with its password.
pub fn connect(config: &LedgerConfig) -> Result<PgConnect, LedgerError> {
    let url = config.url.as_deref().ok_or_else(|| LedgerError::Config("ledger.url is not set".into()))?;
    let password = password(config)?;
    let connect = PgConnect::new(url, password.as_deref())?;
    match &config.ca_file {
        Some(path) => connect.with_tls(path),
        None => Ok(connect),
    }
}

fn password(config: &LedgerConfig) -> Result<Option<String>, LedgerError> {
    if let Some(path) = &config.password_file {
        let shown = path.display();
        match crate::config::loose_mode(path) {
            Ok(Some(mode)) => {
                return Err(LedgerError::Config(format!(
                    "ledger.password_file {shown} is readable by others (mode {mode:o}): chmod 600 it"
                )));
            }
            Ok(None) => {}
            Err(e) => return Err(LedgerError::Config(format!("ledger.password_file {shown}: {e}"))),
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| LedgerError::Config(format!("ledger.password_file {shown}: {e}")))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()));
    }
    if let Some(var) = &config.password_env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| LedgerError::Config(format!("ledger.password_env: {var} is not set")));
    }
    Ok(None)
}
