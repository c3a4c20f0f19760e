//! The listeners' TLS (rustls): the server configuration from `[tls]`, for gRPC (HTTP/2)
//! and for HTTP (HTTP/2 or HTTP/1.1). The handshakes run in [`crate::connections`].

use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::config::TlsConfig;

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
