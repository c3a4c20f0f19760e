//! The listeners' connections: TCP with Nagle off, and TLS (rustls) when configured, with
//! the handshake done here so a refused one is logged with its peer.
//!
//! Handshakes run concurrently (a slow or silent client holds only its own task, for at
//! most [`HANDSHAKE_TIMEOUT`]) and at most [`MAX_HANDSHAKES`] at once per listener.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Peer;
use crate::config::TlsConfig;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at once per listener; connections beyond it are closed.
pub const MAX_HANDSHAKES: usize = 256;

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}")]
    Pem { what: &'static str, path: String, expected: &'static str },
    #[error(
        "tls.key_file {path} is accessible to other users (mode {mode:o}): allow its owner only (chmod 600)"
    )]
    LoosePermissions { path: String, mode: u32 },
    #[error("TLS configuration refused")]
    Rustls(#[from] rustls::Error),
    #[error("tls.client_ca_file: no usable CA certificate")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

/// The rustls server configuration for both listeners.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |what, path: &std::path::Path| {
        let err = |source| TlsError::Read { what, path: path.display().to_string(), source };
        std::fs::read(path).map_err(err)
    };
    let pem_err = |what, path: &std::path::Path, expected| TlsError::Pem {
        what,
        path: path.display().to_string(),
        expected,
    };
    let certs = |what, path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&read(what, path)?)
            .collect::<Result<_, _>>()
            .map_err(|_| pem_err(what, path, "certificates"))?;
        if certs.is_empty() {
            return Err(pem_err(what, path, "certificates"));
        }
        Ok(certs)
    };

    let chain = certs("tls.cert_file", &tls.cert_file)?;
    let key_path = &tls.key_file;
    let key_read =
        |source| TlsError::Read { what: "tls.key_file", path: key_path.display().to_string(), source };
    if let Some(mode) = crate::config::loose_mode(key_path).map_err(key_read)? {
        return Err(TlsError::LoosePermissions { path: key_path.display().to_string(), mode });
    }
    let key = PrivateKeyDer::from_pem_slice(&read("tls.key_file", key_path)?)
        .map_err(|_| pem_err("tls.key_file", key_path, "private key"))?;

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
    let builder = match &tls.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certs("tls.client_ca_file", path)? {
                roots.add(ca)?;
            }
            // Optional at the handshake, so token-holding clients need no certificate; a
            // certificate that is presented must chain to these roots, or the handshake fails.
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The same configuration for an HTTP listener: HTTP/2 or HTTP/1.1, as the client offers
/// (the x402 middlewares speak HTTP/1.1).
pub fn http_server_config(grpc: &ServerConfig) -> Arc<ServerConfig> {
    let mut config = grpc.clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One accepted connection.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        match self {
            Conn::Plain(tcp) => Peer::new(tcp.peer_addr().ok(), None),
            Conn::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let cert =
                    session.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
                Peer::new(tcp.peer_addr().ok(), cert)
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, TLS-wrapped with `tls` when given. The listener
/// closes when the server drops the stream (at the start of a drain).
///
/// Nagle's algorithm is turned off on each: the server's own `tcp_nodelay` setting does not
/// reach connections it is handed, and without it small replies wait for the client's
/// delayed ACK (each unary call ~40 ms instead of well under one).
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    name: &'static str,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
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
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
            }
            let Some(acceptor) = &acceptor else {
                if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                let why = format!("{MAX_HANDSHAKES} TLS handshakes already in progress: connection closed");
                crate::auth::refused(name, &addr.to_string(), None, &why);
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(tls)))).await;
                        return;
                    }
                    Ok(Err(e)) => format!("TLS handshake failed: {e}"),
                    Err(_) => format!("TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}"),
                };
                drop(permit);
                crate::auth::refused(name, &addr.to_string(), None, &why);
            });
        }
    });
    ReceiverStream::new(rx)
}
