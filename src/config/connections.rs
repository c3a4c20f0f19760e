//! `[connections]`: what a client may hold on each listener (gRPC API, Admin, the
//! facilitator's HTTP, metrics) before it has proved anything: how many connections, how
//! long a handshake or a request head may take, how long an HTTP/1.1 connection may idle.
//! A descriptor is spent at accept, before TLS or credentials are seen, so these bound what
//! any peer that can reach a port can take.

use serde::Deserialize;

use super::{ConfigError, invalid};

/// Open connections on the API listener. An API server keeps a few channels; a fleet of
/// hundreds of them fits with room for reconnect storms.
pub const DEFAULT_MAX_API_CONNECTIONS: usize = 4096;

/// Open connections on the Admin listener: operators and their scripts.
pub const DEFAULT_MAX_ADMIN_CONNECTIONS: usize = 64;

/// Open connections on the facilitator listener: the middlewares' keep-alive pools, a few
/// per API server process.
pub const DEFAULT_MAX_FACILITATOR_CONNECTIONS: usize = 4096;

/// Open connections on the metrics listener: a Prometheus server or two, and curl.
pub const DEFAULT_MAX_METRICS_CONNECTIONS: usize = 64;

/// Open connections from one peer address, on a listener that runs without credentials
/// (and always on the metrics listener): one process cannot take a whole listener.
pub const DEFAULT_MAX_PER_PEER: usize = 256;

/// Longest a client may take to finish its TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Longest a client may take to send a request head (HTTP/1.1) once it has started one, or
/// its first request head (the HTTP/2 preface on gRPC) after connecting; the same bound
/// holds for reading an HTTP request's body. A client on a real network sends a head in
/// one round trip; ten seconds tolerates a very slow one and stops a slowloris.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// Longest an HTTP connection may sit with no request in flight and nothing sent since the
/// last reply, and a gRPC connection with nothing sent at all (a live gRPC client answers
/// the keep-alive pings well within it). Node's HTTP client keeps idle sockets 4 s by default (undici) and reuses
/// them; a minute keeps a busy middleware's pool warm and frees what a client forgot.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;

/// HTTP/2 keep-alive pings on the gRPC listeners: how often on a quiet connection (0: none).
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS: u64 = 30_000;

/// How long a keep-alive ping may go unanswered before the connection is closed.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS: u64 = 10_000;

/// Descriptors kept back from the listeners for the ledger's files, the RPC connection
/// pools, the database connections and the daemon's own files. RocksDB keeps a few hundred
/// files open at most with the daemon's options; each chain's pool and the PostgreSQL pool
/// a few dozen.
pub const DEFAULT_RESERVED_FILES: u64 = 1024;

/// Bounds of every timeout here: under 100 ms refuses real clients on a slow network; over
/// an hour is no bound.
const TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// The `[connections]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// See [`DEFAULT_MAX_API_CONNECTIONS`].
    pub max_api: usize,
    /// See [`DEFAULT_MAX_ADMIN_CONNECTIONS`].
    pub max_admin: usize,
    /// See [`DEFAULT_MAX_FACILITATOR_CONNECTIONS`].
    pub max_facilitator: usize,
    /// See [`DEFAULT_MAX_METRICS_CONNECTIONS`].
    pub max_metrics: usize,
    /// See [`DEFAULT_MAX_PER_PEER`].
    pub max_per_peer: usize,
    /// See [`DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS`].
    pub tls_handshake_timeout_ms: u64,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT_MS`].
    pub header_read_timeout_ms: u64,
    /// See [`DEFAULT_IDLE_TIMEOUT_MS`].
    pub idle_timeout_ms: u64,
    /// See [`DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS`].
    pub http2_keepalive_interval_ms: u64,
    /// See [`DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS`].
    pub http2_keepalive_timeout_ms: u64,
    /// See [`DEFAULT_RESERVED_FILES`].
    pub reserved_files: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            max_api: DEFAULT_MAX_API_CONNECTIONS,
            max_admin: DEFAULT_MAX_ADMIN_CONNECTIONS,
            max_facilitator: DEFAULT_MAX_FACILITATOR_CONNECTIONS,
            max_metrics: DEFAULT_MAX_METRICS_CONNECTIONS,
            max_per_peer: DEFAULT_MAX_PER_PEER,
            tls_handshake_timeout_ms: DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            http2_keepalive_interval_ms: DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS,
            http2_keepalive_timeout_ms: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS,
            reserved_files: DEFAULT_RESERVED_FILES,
        }
    }
}

impl ConnectionsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let field = |f: &str| format!("connections.{f}");
        for (name, max) in [
            ("max_api", self.max_api),
            ("max_admin", self.max_admin),
            ("max_facilitator", self.max_facilitator),
            ("max_metrics", self.max_metrics),
            ("max_per_peer", self.max_per_peer),
        ] {
            if max == 0 {
                return Err(invalid(field(name), "must be at least 1"));
            }
        }
        let mut timeouts = vec![
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("http2_keepalive_timeout_ms", self.http2_keepalive_timeout_ms),
        ];
        if self.http2_keepalive_interval_ms != 0 {
            timeouts.push(("http2_keepalive_interval_ms", self.http2_keepalive_interval_ms));
        }
        for (name, ms) in timeouts {
            if !TIMEOUT_RANGE_MS.contains(&ms) {
                return Err(invalid(field(name), "must be 100 to 3,600,000 ms"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_zeros_and_extremes_are_refused() {
        ConnectionsConfig::default().validate().unwrap();
        let off = ConnectionsConfig { http2_keepalive_interval_ms: 0, ..Default::default() };
        off.validate().unwrap();
        let cases: [(&str, ConnectionsConfig); 3] = [
            ("connections.max_admin", ConnectionsConfig { max_admin: 0, ..Default::default() }),
            (
                "connections.header_read_timeout_ms",
                ConnectionsConfig { header_read_timeout_ms: 50, ..Default::default() },
            ),
            (
                "connections.idle_timeout_ms",
                ConnectionsConfig { idle_timeout_ms: 7_200_000, ..Default::default() },
            ),
        ];
        for (field, config) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
