//! The `[ledger]` section: RocksDB in a directory (the default), or PostgreSQL at a
//! connection string with its password from a file or the environment (never from the config
//! file). What the connection string itself says is checked by the PostgreSQL ledger, which
//! reads it.

use serde::Deserialize;

use super::{ConfigError, invalid};

/// The ledger: RocksDB in a directory (the default), or PostgreSQL.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Where the ledger lives: `"rocksdb"` (embedded, one machine; the default) or
    /// `"postgres"` (a database several daemons can share).
    pub backend: LedgerBackend,
    /// Directory of the RocksDB ledger. Required to run the daemon on RocksDB: where the
    /// record of money owed lives is the operator's decision, never a silent default.
    pub path: Option<std::path::PathBuf>,
    /// PostgreSQL connection string (URL `postgresql://user@host:port/db` or key=value;
    /// several hosts with `target_session_attrs=read-write` to follow a failover). Required
    /// with `backend = "postgres"`; it may not carry the password.
    pub url: Option<String>,
    /// A file holding the database password (readable by its owner only).
    pub password_file: Option<std::path::PathBuf>,
    /// An environment variable holding the database password.
    pub password_env: Option<String>,
    /// PEM certificates of the CA(s) that sign the database servers' certificates: the
    /// connection is then TLS (rustls), the server's certificate verified against them and
    /// its name (`sslmode=require` is implied; a server without TLS is refused).
    pub ca_file: Option<std::path::PathBuf>,
    /// See [`super::DEFAULT_LEDGER_QUEUE_CAPACITY`]; 0 means the default.
    pub queue_capacity: usize,
}

/// Which store holds the ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerBackend {
    #[default]
    Rocksdb,
    Postgres,
}

impl LedgerConfig {
    /// Checks the backend's settings: a postgres backend needs a URL without a password,
    /// at most one password source, and no RocksDB path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.backend {
            LedgerBackend::Rocksdb => {
                for (set, field) in [
                    (self.url.is_some(), "ledger.url"),
                    (self.password_file.is_some(), "ledger.password_file"),
                    (self.password_env.is_some(), "ledger.password_env"),
                    (self.ca_file.is_some(), "ledger.ca_file"),
                ] {
                    if set {
                        return Err(invalid(field, "is for backend = \"postgres\""));
                    }
                }
            }
            LedgerBackend::Postgres => {
                if self.path.is_some() {
                    return Err(invalid(
                        "ledger.path",
                        "is for backend = \"rocksdb\" (postgres uses ledger.url)",
                    ));
                }
                // What the connection string itself says (a password in it, TLS without a CA)
                // is checked by the PostgreSQL ledger, which reads it
                // (`ledger::postgres::PgConnect::checked`), when the ledger opens.
                if self.password_file.is_some() && self.password_env.is_some() {
                    return Err(invalid("ledger.password_env", "give one of password_file and password_env"));
                }
            }
        }
        Ok(())
    }
}
