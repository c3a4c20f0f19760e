//! An axum router served over a listener's connections ([`super::incoming`]): each request
//! is counted in flight on its connection (the idle rule of `io.rs`), its body must arrive
//! within the header timeout, and handlers see the caller as [`Client`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_rustls::rustls::ServerConfig;
use tokio_stream::wrappers::ReceiverStream;

use super::io::Activity;
use super::{Conn, Gate};
use crate::auth::Peer;

/// Who a request came from: its connection's peer, and the connection's requests in flight.
#[derive(Clone)]
pub struct Client {
    pub peer: Peer,
    activity: Arc<Activity>,
}

/// The listener's connections as axum takes them.
struct Incoming {
    conns: ReceiverStream<std::io::Result<Conn>>,
    local: Option<std::net::SocketAddr>,
    name: &'static str,
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures::StreamExt as _;
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.peer();
                    return (conn, peer);
                }
                Some(Err(e)) => tracing::warn!(listener = self.name, "cannot accept a connection: {e}"),
                // The accept loop ended (the listener is closing): nothing more comes.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer::new(self.local, None))
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>> for Client {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Client {
        Client { peer: stream.remote_addr().clone(), activity: stream.io().activity() }
    }
}

/// Serves `router` on `listener` through `gate` (TLS when `tls` is given) until `shutdown`
/// resolves, then lets the requests in flight finish.
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    gate: Arc<Gate>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr().ok();
    let name = gate.name();
    let body_timeout = gate.timeouts().header_read;
    let conns = super::incoming(listener, tls, gate);
    let app = router
        .layer(axum::middleware::from_fn(move |client, request, next| {
            in_flight(client, request, next, body_timeout)
        }))
        .into_make_service_with_connect_info::<Client>();
    axum::serve(Incoming { conns, local, name }, app).with_graceful_shutdown(shutdown).await
}

/// Holds the request in flight on its connection until its response is made, and bounds
/// the time its body may take to arrive.
async fn in_flight(
    ConnectInfo(client): ConnectInfo<Client>,
    request: Request,
    next: Next,
    body_timeout: std::time::Duration,
) -> Response {
    let _busy = client.activity.busy();
    let request = request.map(|body| {
        Body::new(TimedBody {
            body,
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + body_timeout)),
        })
    });
    next.run(request).await
}

/// A request body that fails (`TimedOut`) if it has not all arrived by its deadline.
struct TimedBody {
    body: Body,
    deadline: Pin<Box<Sleep>>,
}

impl HttpBody for TimedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let late =
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the request body was not sent in time");
            return Poll::Ready(Some(Err(axum::Error::new(late))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    use super::*;
    use crate::connections::{Protocol, Timeouts};

    const HEAD: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(20);

    /// A server of `/fast` and of `/slow` (answers after three idle timeouts).
    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let timeouts = Timeouts { tls_handshake: HEAD, header_read: HEAD, idle: IDLE };
        let gate = Gate::new("test", Protocol::Http, 16, None, timeouts);
        let router = Router::new()
            .route("/fast", axum::routing::get(|| async { "ok" }))
            .route("/echo", axum::routing::post(|body: axum::body::Bytes| async move { body }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(3 * IDLE).await;
                    "done"
                }),
            );
        tokio::spawn(serve_http(listener, None, gate, router, std::future::pending()));
        addr
    }

    /// Reads until the server closes; what it sent, and when it closed.
    async fn until_closed(conn: &mut TcpStream) -> (String, Instant) {
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got).await;
        (String::from_utf8_lossy(&got).into_owned(), Instant::now())
    }

    /// Reads one whole reply (its body ends the text `end`).
    async fn reply(conn: &mut TcpStream, end: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with(end) {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the reply: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn slow_heads_and_idle_connections_are_cut_and_a_long_request_is_not() {
        let addr = server().await;

        // Nothing sent: cut at the header timeout from the accept.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        let (got, closed) = until_closed(&mut silent).await;
        assert!(got.is_empty() && closed - start >= HEAD && closed - start < IDLE, "{:?}", closed - start);

        // Half a head: cut at the header timeout from its first byte.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /fa").await.unwrap();
        let start = Instant::now();
        let (got, closed) = until_closed(&mut slow).await;
        assert!(!got.contains("200"), "{got}");
        assert!(closed - start >= HEAD && closed - start < IDLE, "{:?}", closed - start);

        // A request answered, then silence: cut at the idle timeout from the reply; a second
        // request before it is served on the same connection.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(reply(&mut idle, "ok").await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(IDLE / 2).await;
        idle.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(reply(&mut idle, "ok").await.starts_with("HTTP/1.1 200"));
        let answered = Instant::now();
        let (_, closed) = until_closed(&mut idle).await;
        assert!(closed - answered >= IDLE && closed - answered < IDLE + HEAD, "{:?}", closed - answered);

        // A request in flight for three idle timeouts is answered.
        let mut long = TcpStream::connect(addr).await.unwrap();
        long.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let got = reply(&mut long, "done").await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");

        // A body that does not arrive in time is refused (the head came at once).
        let mut body = TcpStream::connect(addr).await.unwrap();
        body.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab").await.unwrap();
        let start = Instant::now();
        let (got, closed) = until_closed(&mut body).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        assert!(closed - start >= HEAD && closed - start < IDLE, "{:?}", closed - start);
    }
}
