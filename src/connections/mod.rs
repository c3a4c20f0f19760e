//! What a client may hold on a listener before it has proved anything (issue #28): a
//! descriptor is spent at accept, before TLS or credentials are seen, so every listener
//! bounds what any peer that reaches its port can take.
//!
//! - A **cap** on open connections per listener ([`Gate`]), and per peer address on a
//!   listener that runs without credentials: past it a new connection is closed at once
//!   and counted (`x402_batcher_connections_refused_total{listener, reason="cap"|"peer_cap"}`).
//! - **Deadlines** on each connection ([`Conn`]): the TLS handshake; the HTTP/2 preface on the
//!   gRPC listeners; on HTTP, a request head (and its body) within the header timeout and no
//!   longer than the idle timeout with no request in flight. HTTP/2 keep-alive pings (set on
//!   the gRPC servers) close dead peers once the preface is in.
//! - **Headroom** ([`fit_caps`]): the caps together stay under the process's open-file limit
//!   less a reserve for the ledger's files, the RPC pools and the database connections, so
//!   no flood of connections can make a ledger write or an RPC call fail for want of a
//!   descriptor.
//!
//! `io.rs` is the connection and its deadlines; `http.rs` serves an axum router over a
//! listener's connections, counting the requests in flight for the idle rule.

mod http;
mod io;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_stream::wrappers::ReceiverStream;

pub use http::{Client, serve_http};
pub use io::Conn;

use crate::config::ConnectionsConfig;

/// TLS handshakes in progress at once per listener; connections beyond it are closed.
pub const MAX_HANDSHAKES: usize = 256;

/// The least cap a listener gets when the caps are lowered to fit the open-file limit.
const MIN_CAP: usize = 8;

/// What a listener speaks, for the deadlines of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// HTTP/1.1, or HTTP/2 where the client offers it.
    Http,
}

/// The timeouts of every listener (`[connections]`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tls_handshake: Duration,
    pub header_read: Duration,
    pub idle: Duration,
}

impl Timeouts {
    pub fn new(config: &ConnectionsConfig) -> Timeouts {
        Timeouts {
            tls_handshake: Duration::from_millis(config.tls_handshake_timeout_ms),
            header_read: Duration::from_millis(config.header_read_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
        }
    }
}

/// Why the caps cannot fit the open-file limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "the open-file limit ({limit}) leaves {left} descriptors for {listeners} listeners after \
     a reserve of {reserved}; each needs at least {MIN_CAP}: raise the hard limit (systemd \
     LimitNOFILE, ulimit -Hn)"
)]
pub struct NoHeadroom {
    pub limit: u64,
    pub reserved: u64,
    pub left: u64,
    pub listeners: usize,
}

/// Caps that fit the open-file limit, and the reserve kept back beside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fitted {
    pub caps: Vec<usize>,
    pub reserved: u64,
}

/// The caps `wanted` (one per listener), lowered in proportion where together they would
/// not fit under `limit` (the open-file limit; `None`: unlimited) less `reserved` and one
/// descriptor per listener (a connection refused at the cap is accepted, then closed). A
/// limit too low for the whole reserve beside the least caps (a shell's 1,024 under the
/// default reserve) keeps half of it back instead: a small daemon that runs beats one that
/// refuses to.
pub fn fit_caps(limit: Option<u64>, reserved: u64, wanted: &[usize]) -> Result<Fitted, NoHeadroom> {
    let Some(limit) = limit else { return Ok(Fitted { caps: wanted.to_vec(), reserved }) };
    let listeners = wanted.len();
    let least = (listeners * (MIN_CAP + 1)) as u64;
    let reserved = if limit >= reserved.saturating_add(least) { reserved } else { reserved.min(limit / 2) };
    let left = limit.saturating_sub(reserved).saturating_sub(listeners as u64);
    if left < (listeners * MIN_CAP) as u64 {
        return Err(NoHeadroom { limit, reserved, left, listeners });
    }
    let total: u64 = wanted.iter().map(|&w| w as u64).sum();
    if total <= left {
        return Ok(Fitted { caps: wanted.to_vec(), reserved });
    }
    // Room for every listener's minimum first, the rest shared in proportion.
    let share = left - (listeners * MIN_CAP) as u64;
    let caps =
        wanted.iter().map(|&w| (MIN_CAP + (w as u64 * share / total) as usize).min(w.max(MIN_CAP))).collect();
    Ok(Fitted { caps, reserved })
}

/// The open connections of each peer address that has some.
type Peers = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One listener's door: its caps and the deadlines its connections get.
pub struct Gate {
    name: &'static str,
    protocol: Protocol,
    slots: Arc<Semaphore>,
    cap: usize,
    /// The cap per peer address, and the peers' open connections.
    per_peer: Option<(usize, Peers)>,
    timeouts: Timeouts,
    /// Refusals not yet logged, and when the last log line was written (ms since start).
    quiet: (AtomicU64, AtomicU64),
    started: std::time::Instant,
}

/// A connection's place under its listener's caps, given back when it is dropped.
pub struct Ticket {
    _slot: OwnedSemaphorePermit,
    peer: Option<(Peers, IpAddr)>,
    listener: &'static str,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((peers, ip)) = &self.peer {
            let mut peers = peers.lock();
            if let Some(n) = peers.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    peers.remove(ip);
                }
            }
        }
        metrics::gauge!("x402_batcher_connections_open", "listener" => self.listener).decrement(1);
    }
}

impl Gate {
    /// The door of listener `name` (`api`, `admin`, `facilitator`, `metrics`): at most `cap`
    /// connections, and `per_peer` from one address when given.
    pub fn new(
        name: &'static str,
        protocol: Protocol,
        cap: usize,
        per_peer: Option<usize>,
        timeouts: Timeouts,
    ) -> Arc<Gate> {
        metrics::gauge!("x402_batcher_connections_open", "listener" => name).set(0.0);
        Arc::new(Gate {
            name,
            protocol,
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            per_peer: per_peer.map(|n| (n, Arc::default())),
            timeouts,
            quiet: (AtomicU64::new(0), AtomicU64::new(0)),
            started: std::time::Instant::now(),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// A place for a connection from `ip`, or why there is none.
    fn admit(&self, ip: IpAddr) -> Result<Ticket, &'static str> {
        let slot = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| "cap")?;
        let peer = match &self.per_peer {
            Some((max, peers)) => {
                let mut open = peers.lock();
                let n = open.entry(ip).or_default();
                if *n >= *max {
                    if *n == 0 {
                        open.remove(&ip);
                    }
                    return Err("peer_cap");
                }
                *n += 1;
                Some((Arc::clone(peers), ip))
            }
            None => None,
        };
        metrics::gauge!("x402_batcher_connections_open", "listener" => self.name).increment(1);
        Ok(Ticket { _slot: slot, peer, listener: self.name })
    }

    /// Counts a refused connection, and logs refusals at most once a second (a flood would
    /// otherwise fill the log).
    fn refuse(&self, peer: &std::net::SocketAddr, reason: &'static str) {
        let listener = self.name;
        metrics::counter!("x402_batcher_connections_refused_total", "listener" => listener, "reason" => reason)
            .increment(1);
        let (unlogged, last) = &self.quiet;
        let unlogged = unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.started.elapsed().as_millis() as u64;
        let before = last.load(Ordering::Relaxed);
        if (before == 0 || now.saturating_sub(before) >= 1_000)
            && last.compare_exchange(before, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.quiet.0.fetch_sub(unlogged, Ordering::Relaxed);
            let (cap, per_peer) = (self.cap, self.per_peer.as_ref().map(|p| p.0));
            let why = match reason {
                "cap" => "the listener's connection cap is reached",
                "peer_cap" => "the peer's connection cap is reached",
                _ => "its TLS handshake did not finish in time",
            };
            tracing::warn!(
                listener,
                %peer,
                reason,
                cap,
                ?per_peer,
                refused = unlogged,
                "connection refused: {why} (refused: how many since the last such line)"
            );
        }
    }
}

/// The connections `listener` accepts through `gate`, TLS-wrapped with `tls` when given.
/// The listener closes when the server drops the stream (at the start of a drain).
///
/// Nagle's algorithm is turned off on each: the server's own `tcp_nodelay` setting does not
/// reach connections it is handed, and without it small replies wait for the client's
/// delayed ACK (each unary call ~40 ms instead of well under one).
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    gate: Arc<Gate>,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let name = gate.name;
        loop {
            let (tcp, addr) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off rather than spin.
                        tracing::warn!(listener = name, "cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let ticket = match gate.admit(addr.ip()) {
                Ok(ticket) => ticket,
                Err(reason) => {
                    gate.refuse(&addr, reason);
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
            }
            let Some(acceptor) = &acceptor else {
                if tx.send(Ok(Conn::plain(tcp, ticket, &gate))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                let why = format!("{MAX_HANDSHAKES} TLS handshakes already in progress: connection closed");
                crate::auth::refused(name, &addr.to_string(), None, &why);
                continue;
            };
            let (acceptor, tx, gate) = (acceptor.clone(), tx.clone(), Arc::clone(&gate));
            tokio::spawn(async move {
                let limit = gate.timeouts.tls_handshake;
                let why = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Conn::tls(tls, ticket, &gate))).await;
                        return;
                    }
                    Ok(Err(e)) => format!("TLS handshake failed: {e}"),
                    Err(_) => {
                        gate.refuse(&addr, "handshake_timeout");
                        format!("TLS handshake not finished within {limit:?}")
                    }
                };
                drop(permit);
                crate::auth::refused(name, &addr.to_string(), None, &why);
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_fit_stay_and_caps_that_do_not_are_lowered_in_proportion() {
        assert_eq!(fit_caps(None, 1024, &[4096, 64]).unwrap().caps, vec![4096, 64]);
        let roomy = fit_caps(Some(1 << 20), 1024, &[4096, 64, 4096, 64]).unwrap();
        assert_eq!(roomy, Fitted { caps: vec![4096, 64, 4096, 64], reserved: 1024 });
        // 2,000 - 1,000 reserved - 4 accept slots = 996 for 8,320 wanted.
        let fitted = fit_caps(Some(2_000), 1_000, &[4096, 64, 4096, 64]).unwrap();
        assert_eq!(fitted.reserved, 1_000);
        let caps = &fitted.caps;
        assert!(caps.iter().sum::<usize>() <= 996, "{caps:?}");
        assert!(caps.iter().all(|&c| c >= MIN_CAP), "{caps:?}");
        assert!(caps[0] > 10 * caps[1], "in proportion: {caps:?}");
        // A shell's 1,024 under the default reserve of 1,024: half kept back.
        let small = fit_caps(Some(1_024), 1_024, &[4096, 64, 4096]).unwrap();
        assert_eq!(small.reserved, 512);
        assert!(small.caps.iter().sum::<usize>() <= 1_024 - 512 - 3, "{small:?}");
        let err = fit_caps(Some(40), 1_024, &[4096, 64, 4096]).unwrap_err().to_string();
        assert!(err.contains("raise the hard limit"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_connection_quiet_after_its_preface_is_closed_at_the_idle_timeout() {
        use futures::StreamExt as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (head, idle) = (Duration::from_secs(5), Duration::from_secs(20));
        let timeouts = Timeouts { tls_handshake: head, header_read: head, idle };
        let mut conns = incoming(listener, None, Gate::new("test", Protocol::Grpc, 4, None, timeouts));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let start = tokio::time::Instant::now();
        let (mut got, mut buf) = (0, [0u8; 64]);
        let err = loop {
            match conn.read(&mut buf).await {
                Ok(0) => panic!("the client did not close"),
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!((got, err.kind()), (24, std::io::ErrorKind::TimedOut));
        let waited = start.elapsed();
        assert!(waited >= idle && waited < idle + head, "{waited:?}");
    }

    #[test]
    fn a_full_gate_refuses_and_a_dropped_ticket_frees_its_place() {
        let timeouts = Timeouts::new(&ConnectionsConfig::default());
        let gate = Gate::new("test", Protocol::Http, 3, Some(2), timeouts);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t1 = gate.admit(a).unwrap();
        let _t2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some("peer_cap"));
        let _t3 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some("cap"));
        drop(t1);
        let _t4 = gate.admit(a).unwrap();
        assert_eq!(gate.per_peer.as_ref().unwrap().1.lock().get(&a), Some(&2));
    }
}
