//! One accepted connection: its stream (TCP, or TLS over it), the [`Ticket`] holding its
//! place under the listener's caps, and the deadlines it must meet, checked wherever the
//! server reads from it (and writes to it, for HTTP: a client that stops reading its reply
//! is idle too). A missed deadline fails the read with `TimedOut`, and the server closes the
//! connection.
//!
//! - gRPC ([`Protocol::Grpc`]): the 24-byte HTTP/2 preface within the header timeout of the
//!   accept; after it, nothing read for the idle timeout closes it. A live client is never
//!   that quiet: it answers the server's keep-alive pings (every 30 s by default), and a
//!   peer that sent a preface and stalled before its settings gets no pings at all.
//! - HTTP ([`Protocol::Http`]): with no request in flight, a request head must be complete
//!   within the header timeout of its first byte (of the accept, for a connection's first
//!   request), and a connection with nothing sent since its last reply is closed after the
//!   idle timeout. The requests in flight are counted by [`Activity`], which the server's
//!   middleware holds for each request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::{Gate, Protocol, Ticket, Timeouts};
use crate::auth::Peer;

/// The HTTP/2 client preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_PREFACE_LEN: u64 = 24;

/// The requests in flight on one HTTP connection, and since when it has had none.
#[derive(Default)]
pub struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Default)]
struct ActivityState {
    in_flight: usize,
    /// Requests started on the connection so far.
    started: u64,
    /// When the last request in flight ended (`None`: no request yet).
    idle_since: Option<Instant>,
}

/// A request in flight (its connection is not idle until every one is dropped).
pub struct Busy(Arc<Activity>);

impl Activity {
    pub fn busy(self: &Arc<Self>) -> Busy {
        let mut state = self.state.lock();
        state.in_flight += 1;
        state.started += 1;
        Busy(Arc::clone(self))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Some(Instant::now());
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection.
pub struct Conn {
    stream: Stream,
    _ticket: Ticket,
    watch: Watch,
}

/// A connection's deadlines.
struct Watch {
    listener: &'static str,
    protocol: Protocol,
    timeouts: Timeouts,
    accepted: Instant,
    /// Bytes read so far (gRPC: the preface is in once there are 24).
    read: u64,
    /// When bytes were last read.
    last_read: Instant,
    /// When the first byte of a request head not yet complete was read, and how many
    /// requests had started then (the head is complete once another has).
    head_started: Option<(Instant, u64)>,
    activity: Arc<Activity>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    /// The deadline missed, once one is (every later read or write fails too).
    missed: Option<&'static str>,
}

impl Conn {
    pub(super) fn plain(tcp: TcpStream, ticket: Ticket, gate: &Gate) -> Conn {
        Conn { stream: Stream::Plain(tcp), _ticket: ticket, watch: Watch::new(gate) }
    }

    pub(super) fn tls(tls: tokio_rustls::server::TlsStream<TcpStream>, ticket: Ticket, gate: &Gate) -> Conn {
        Conn { stream: Stream::Tls(Box::new(tls)), _ticket: ticket, watch: Watch::new(gate) }
    }

    /// The requests in flight on this connection (HTTP).
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.watch.activity)
    }

    fn tcp(&self) -> &TcpStream {
        match &self.stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// The peer: its address, and its certificate when TLS verified one.
    pub fn peer(&self) -> Peer {
        let addr = self.tcp().peer_addr().ok();
        let cert = match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => {
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned())
            }
        };
        Peer::new(addr, cert)
    }
}

impl Watch {
    fn new(gate: &Gate) -> Watch {
        let now = Instant::now();
        Watch {
            listener: gate.name(),
            protocol: gate.protocol,
            timeouts: gate.timeouts(),
            accepted: now,
            read: 0,
            last_read: now,
            head_started: None,
            activity: Arc::default(),
            sleep: Box::pin(tokio::time::sleep_until(now + gate.timeouts().idle)),
            armed: None,
            missed: None,
        }
    }

    /// The deadline the connection must meet now, and what missing it is called; `None`:
    /// none (an HTTP request in flight).
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        match self.protocol {
            Protocol::Grpc if self.read >= H2_PREFACE_LEN => {
                Some((self.last_read + self.timeouts.idle, "idle_timeout"))
            }
            Protocol::Grpc => Some((self.accepted + self.timeouts.header_read, "header_timeout")),
            Protocol::Http => {
                let state = self.activity.state.lock();
                if state.in_flight > 0 {
                    return None;
                }
                let head = |from: Instant| Some((from + self.timeouts.header_read, "header_timeout"));
                match (self.head_started, state.idle_since) {
                    (Some((at, n)), _) if n == state.started => head(at),
                    (_, None) => head(self.accepted),
                    (_, Some(since)) => Some((since + self.timeouts.idle, "idle_timeout")),
                }
            }
        }
    }

    /// Whether the deadline has passed (arming the timer to wake `cx` at it if not).
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        if let Some(why) = self.missed {
            return Err(timed_out(why));
        }
        let Some((deadline, why)) = self.deadline() else { return Ok(()) };
        if self.armed != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        if Instant::now() < deadline && self.sleep.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        self.missed = Some(why);
        if why == "idle_timeout" {
            metrics::counter!("x402_batcher_connections_idle_closed_total", "listener" => self.listener)
                .increment(1);
        } else {
            metrics::counter!("x402_batcher_connections_refused_total", "listener" => self.listener, "reason" => why)
                .increment(1);
        }
        tracing::debug!(listener = self.listener, why, "connection closed");
        Err(timed_out(why))
    }

    /// Notes `n` bytes read.
    fn on_read(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.read = self.read.saturating_add(n as u64);
        self.last_read = Instant::now();
        if self.protocol == Protocol::Http {
            let state = self.activity.state.lock();
            let head_pending = self.head_started.is_some_and(|(_, n)| n == state.started);
            if state.in_flight == 0 && !head_pending {
                self.head_started = Some((Instant::now(), state.started));
            }
        }
    }
}

fn timed_out(why: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, why)
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.watch.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = polled {
            this.watch.on_read(buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.stalled_write(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.stalled_write(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.stalled_write(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Conn {
    /// A write the client is not taking (its receive window full) on an HTTP connection
    /// with no request in flight: it counts against the idle deadline like silence does.
    fn stalled_write<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_pending()
            && self.watch.protocol == Protocol::Http
            && let Err(e) = self.watch.check(cx)
        {
            return Poll::Ready(Err(e));
        }
        polled
    }
}
