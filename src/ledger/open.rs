//! Opening the configured ledger: RocksDB at `ledger.path`, or PostgreSQL at `ledger.url`
//! with its password from a file or an environment variable (never from the config file,
//! never logged).

use std::path::Path;
use std::sync::Arc;

use super::error::LedgerError;
use super::postgres::{PgConnect, PgLedger};
use super::rocks::RocksLedger;
use super::store::LedgerStore;
use crate::config::{LedgerBackend, LedgerConfig};

/// Opens the configured ledger for the daemon (creating or upgrading its schema).
pub fn open(config: &LedgerConfig) -> Result<Arc<dyn LedgerStore>, LedgerError> {
    Ok(match config.backend {
        LedgerBackend::Rocksdb => Arc::new(RocksLedger::open(rocks_path(config, None)?)?),
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
            Arc::new(RocksLedger::open_read_only(rocks_path(config, over)?)?)
        }
        (LedgerBackend::Postgres, None) => Arc::new(PgLedger::open_read_only(connect(config)?)?),
    })
}

fn rocks_path<'a>(config: &'a LedgerConfig, over: Option<&'a Path>) -> Result<&'a Path, LedgerError> {
    over.or(config.path.as_deref())
        .ok_or_else(|| LedgerError::Config("no ledger: set ledger.path (or pass --ledger)".into()))
}

/// Checks what the configured ledger's settings say without opening it: for PostgreSQL,
/// the connection string (no password in it, TLS only with a CA). Nothing is read or
/// connected to; errors name the field.
pub fn check(config: &LedgerConfig) -> Result<(), LedgerError> {
    match (config.backend, config.url.as_deref()) {
        (LedgerBackend::Postgres, Some(url)) => {
            PgConnect::checked(url, None, config.ca_file.is_some()).map(|_| ())
        }
        _ => Ok(()),
    }
}

/// Where the PostgreSQL ledger is, with its password.
pub fn connect(config: &LedgerConfig) -> Result<PgConnect, LedgerError> {
    let url = config.url.as_deref().ok_or_else(|| LedgerError::Config("ledger.url is not set".into()))?;
    let password = password(config)?;
    let connect = PgConnect::checked(url, password.as_deref(), config.ca_file.is_some())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn connect_to(rest: &str) -> Result<PgConnect, LedgerError> {
        let config = Config::parse(&format!("[ledger]\nbackend = \"postgres\"\n{rest}")).unwrap();
        let checked = check(&config.ledger);
        let connect = connect(&config.ledger);
        assert_eq!(checked.is_ok(), connect.is_ok(), "check and connect agree");
        connect
    }

    #[test]
    fn a_postgres_url_is_refused_with_its_password_or_asking_for_tls_without_a_ca() {
        let err = connect_to("url = \"postgresql://batcher:hunter2@db1/x402\"").unwrap_err().to_string();
        assert!(err.contains("ledger.url") && err.contains("password_file"), "{err}");
        assert!(!err.contains("hunter2"), "the secret is not echoed: {err}");
        let err = connect_to("url = \"host=db1 password=hunter2\"").unwrap_err().to_string();
        assert!(err.contains("carries a password") && !err.contains("hunter2"), "{err}");
        let err = connect_to("url = \"host=db1 sslmode=require\"").unwrap_err().to_string();
        assert!(err.contains("ledger.ca_file"), "{err}");
        let err = connect_to("url = \"postgresql://[::1\"").unwrap_err().to_string();
        assert!(err.contains("ledger.url"), "{err}");
        connect_to("url = \"postgresql://batcher@db1:5432,db2:5432/x402?target_session_attrs=read-write\"")
            .unwrap();
    }
}
