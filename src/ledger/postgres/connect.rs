//! Where the database is and how to log in: the connection string, the password, TLS.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::decode::pg_err;
use crate::ledger::error::LedgerError;

/// How long connecting may take when the URL does not say (`connect_timeout`).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the PostgreSQL ledger is and how to log in.
#[derive(Clone)]
pub struct PgConnect {
    pub(super) config: tokio_postgres::Config,
    /// TLS (rustls) with these roots; plaintext when `None`.
    pub(super) tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location())
    }
}

impl PgConnect {
    /// From a connection string (`postgresql://user@host:port/db?…` or `host=… user=…`,
    /// several hosts allowed); `password`, when given, replaces any in the string.
    pub fn new(url: &str, password: Option<&str>) -> Result<PgConnect, LedgerError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|_| LedgerError::Config("ledger.url is not a PostgreSQL connection string".into()))?;
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(PgConnect { config, tls: None })
    }

    /// From the configured connection string, refusing one that carries a password (it
    /// belongs in `ledger.password_file` or `ledger.password_env`) or that asks for TLS
    /// without `has_ca` (the CA that signs the database's certificate). Errors name the field
    /// and never echo the string.
    pub fn checked(url: &str, password: Option<&str>, has_ca: bool) -> Result<PgConnect, LedgerError> {
        let invalid = |why: &str| LedgerError::Config(format!("ledger.url {why}"));
        // Parse errors may echo the string: say only that it is not one.
        let parsed: tokio_postgres::Config =
            url.parse().map_err(|_| invalid("is not a PostgreSQL connection string (URL or key=value)"))?;
        if parsed.get_password().is_some() {
            return Err(invalid("carries a password: put it in ledger.password_file or ledger.password_env"));
        }
        if parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Require && !has_ca {
            return Err(invalid(
                "asks for TLS (sslmode=require): give ledger.ca_file, the CA that signs the database's certificate",
            ));
        }
        PgConnect::new(url, password)
    }

    /// Connects over TLS only, verifying the server's certificate (and its name: the host
    /// connected to) against the CA certificates in the PEM file `ca_file`.
    pub fn with_tls(mut self, ca_file: &std::path::Path) -> Result<PgConnect, LedgerError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        let shown = ca_file.display();
        let pem = std::fs::read(ca_file)
            .map_err(|e| LedgerError::Config(format!("ledger.ca_file {shown}: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert
                .map_err(|_| LedgerError::Config(format!("ledger.ca_file {shown}: not PEM certificates")))?;
            roots.add(cert).map_err(|e| LedgerError::Config(format!("ledger.ca_file {shown}: {e}")))?;
        }
        if roots.is_empty() {
            return Err(LedgerError::Config(format!("ledger.ca_file {shown}: no certificate in it")));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| LedgerError::Config(format!("ledger TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Never fall back to plaintext once a CA is given.
        self.config.ssl_mode(tokio_postgres::config::SslMode::Require);
        self.tls = Some(Arc::new(tls));
        Ok(self)
    }

    /// Hosts, ports, database and user: never the password.
    pub fn location(&self) -> String {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                match c.get_ports().get(i).or(c.get_ports().first()) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .collect();
        format!(
            "postgresql://{}@{}/{}",
            c.get_user().unwrap_or(""),
            hosts.join(","),
            c.get_dbname().unwrap_or("")
        )
    }

    pub(super) async fn connect(self) -> Result<Client, LedgerError> {
        let closed = |e: tokio_postgres::Error| tracing::warn!("ledger database connection closed: {e}");
        match self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(pg_err("connect"))?;
                tokio::spawn(async move { connection.await.unwrap_or_else(closed) });
                Ok(client)
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, connection) = self.config.connect(tls).await.map_err(pg_err("connect"))?;
                tokio::spawn(async move { connection.await.unwrap_or_else(closed) });
                Ok(client)
            }
        }
    }
}
