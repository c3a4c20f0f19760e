//! Who can reach the daemon and how: its listeners (gRPC API, Admin, the facilitator's
//! HTTP), TLS, the callers' credentials, per-server limits and the metrics endpoint.

use std::collections::HashMap;

use serde::Deserialize;
use tokio_rustls::rustls::pki_types::ServerName;

use super::{Config, ConfigError, invalid};

/// Where the gRPC API listens unless configured: loopback, so a daemon started without
/// thought is not reachable from the network (authentication arrives with TLS).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// The Admin listener: loopback, so only someone on the host can change settlement policy
/// unless the operator decides otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:50052";

/// Largest gRPC message (and facilitator body) accepted. A submission is ~2 KiB; 64 KiB
/// leaves room for large headers and refuses abuse cheaply.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Concurrent HTTP/2 streams per connection. A fleet node needs a few (one SubmitStream,
/// some unary calls); the bound stops one client from holding unbounded server state.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

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

/// Checks the listeners, TLS and credentials together: no listener reachable from other
/// hosts without authentication, no bearer token in clear text off the host, and every
/// credential well formed and unique.
pub(super) fn validate(config: &Config) -> Result<(), ConfigError> {
    let this = config;
    let mut listeners = vec![("server.listen", this.server.listen), ("admin.listen", this.admin.listen)];
    if let Some(addr) = this.facilitator.listen {
        listeners.push(("facilitator.listen", addr));
    }
    for (i, (field, addr)) in listeners.iter().enumerate() {
        if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| a.port() != 0 && a == addr) {
            return Err(invalid(*field, format!("must differ from {other}")));
        }
    }
    let client_ca = this.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
    let (mut names, mut tokens, mut certs) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (i, c) in this.credentials.iter().enumerate() {
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
            let hash = parse_token_hash(hash).map_err(|e| invalid(field("token_sha256"), e))?;
            if let Some(j) = tokens.insert(hash, i) {
                return Err(invalid(field("token_sha256"), format!("duplicates credentials[{j}]")));
            }
        }
        if let Some(name) = &c.cert_name {
            let name = parse_cert_name(name).map_err(|e| invalid(field("cert_name"), e))?;
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
    if this.credentials.is_empty() {
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
        if !this.credentials.is_empty() && !this.credentials.iter().any(|c| c.role == role) {
            return Err(invalid(
                "credentials",
                format!(
                    "no entry with role = \"{}\": with authentication on, its listener would refuse every call",
                    role.as_str()
                ),
            ));
        }
    }
    if this.tls.is_none() && this.credentials.iter().any(|c| c.token_sha256.is_some()) {
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

/// A configured `token_sha256`: 64 hex digits.
pub fn parse_token_hash(hex_digits: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits.trim(), &mut out)
        .map_err(|_| "must be 64 hex digits (the SHA-256 of the token)".to_owned())?;
    Ok(out)
}

/// A configured `cert_name`: a DNS name, lower-cased.
pub fn parse_cert_name(name: &str) -> Result<String, String> {
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Ok(name.to_ascii_lowercase()),
        Ok(_) => Err(format!("{name:?} must be a DNS name (a certificate's DNS subjectAltName)")),
        Err(_) => Err(format!("{name:?} is not a valid DNS name")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn token_hashes_and_cert_names_are_checked() {
        assert!(parse_token_hash(&"ab".repeat(32)).is_ok());
        assert!(parse_token_hash("abc").is_err());
        assert!(parse_token_hash(&"z".repeat(64)).is_err());
        assert_eq!(parse_cert_name("API-1.example.com").unwrap(), "api-1.example.com");
        assert!(parse_cert_name("10.0.0.1").is_err());
        assert!(parse_cert_name("not a name").is_err());
    }
}
