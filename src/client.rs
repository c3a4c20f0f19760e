//! A Rust client for the daemon's API, for API servers written in Rust and for the load
//! generator: typed construction of submissions and one-call helpers over the generated
//! stubs.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::api::{self, v1};
use crate::x402::{PaymentRequirements, SignedAuthorization};

/// The channel every stub uses: adds the bearer token, if any, to each call.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// A connection to the daemon (one HTTP/2 channel; clones share it). The Admin stub needs a
/// connection to the Admin listener (`admin.listen`).
#[derive(Clone, Debug)]
pub struct Client {
    pub ingest: v1::ingest_client::IngestClient<AuthChannel>,
    pub payments: v1::payments_client::PaymentsClient<AuthChannel>,
    pub admin: v1::admin_client::AdminClient<AuthChannel>,
}

/// How to authenticate to the daemon: TLS (with a client certificate for mTLS) and/or a
/// bearer token. The default is plaintext without credentials (a loopback daemon).
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    /// PEM of the CA that issued the daemon's certificate: connect with TLS (an https URL).
    pub ca_pem: Option<Vec<u8>>,
    /// The name the daemon's certificate must carry, if not the URL's host.
    pub server_name: Option<String>,
    /// PEM certificate chain and private key of this client (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// A bearer token (`x402-batcher new-token`).
    pub token: Option<String>,
}

/// Adds `authorization: Bearer TOKEN` to every call (nothing without a token).
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Why the client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not a valid daemon URL (expected e.g. http://127.0.0.1:50051)")]
    InvalidUrl(String),
    #[error("the bearer token is not printable ASCII")]
    InvalidToken,
    #[error("cannot connect to the daemon")]
    Connect(#[from] tonic::transport::Error),
    #[error("cannot read {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("environment variable {0} (the bearer token) is not set or not UTF-8")]
    TokenEnv(String),
}

impl ClientAuth {
    /// Credentials read from files (PEM) and a bearer token from an environment variable
    /// (never a flag: flags show in `ps`).
    pub fn from_files(
        ca: Option<&std::path::Path>,
        server_name: Option<String>,
        identity: Option<(&std::path::Path, &std::path::Path)>,
        token_env: Option<&str>,
    ) -> Result<ClientAuth, ClientError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| ClientError::File { path: p.display().to_string(), source })
        };
        Ok(ClientAuth {
            ca_pem: ca.map(read).transpose()?,
            server_name,
            identity: identity
                .map(|(cert, key)| Ok::<_, ClientError>((read(cert)?, read(key)?)))
                .transpose()?,
            token: token_env
                .map(|var| std::env::var(var).map_err(|_| ClientError::TokenEnv(var.to_owned())))
                .transpose()?,
        })
    }
}

impl Client {
    /// Connects to `url` (for example `http://127.0.0.1:50051`) without credentials.
    pub async fn connect(url: String) -> Result<Client, ClientError> {
        Client::connect_with(url, &ClientAuth::default()).await
    }

    /// Connects to `url` with `auth` (an `https://` URL when `auth.ca_pem` is set).
    pub async fn connect_with(url: String, auth: &ClientAuth) -> Result<Client, ClientError> {
        let mut endpoint = Channel::from_shared(url.clone()).map_err(|_| ClientError::InvalidUrl(url))?;
        if let Some(ca) = &auth.ca_pem {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some(name) = &auth.server_name {
                tls = tls.domain_name(name.clone());
            }
            if let Some((cert, key)) = &auth.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let token = auth
            .token
            .as_ref()
            .map(|t| format!("Bearer {t}").parse().map_err(|_| ClientError::InvalidToken))
            .transpose()?;
        Ok(Client::from_channel(endpoint.connect().await?, Bearer(token)))
    }

    pub fn from_channel(channel: Channel, bearer: Bearer) -> Client {
        let channel = InterceptedService::new(channel, bearer);
        Client {
            ingest: v1::ingest_client::IngestClient::new(channel.clone()),
            payments: v1::payments_client::PaymentsClient::new(channel.clone()),
            admin: v1::admin_client::AdminClient::new(channel),
        }
    }

    /// Submits one payment and waits for its decision.
    pub async fn submit(&mut self, req: v1::SubmitRequest) -> Result<v1::SubmitReply, tonic::Status> {
        self.ingest.submit(req).await.map(tonic::Response::into_inner)
    }
}

/// A submission of a typed authorization against `requirements`.
pub fn typed_request(
    request_id: String,
    signed: &SignedAuthorization,
    requirements: &PaymentRequirements,
) -> v1::SubmitRequest {
    v1::SubmitRequest {
        request_id,
        payment: Some(v1::submit_request::Payment::Authorization(api::typed_authorization(signed))),
        requirements: Some(requirements_message(requirements)),
        ..Default::default()
    }
}

/// A submission of a raw x402 header as an API server received it.
pub fn header_request(
    request_id: String,
    header: String,
    requirements: &PaymentRequirements,
) -> v1::SubmitRequest {
    v1::SubmitRequest {
        request_id,
        payment: Some(v1::submit_request::Payment::X402Header(header)),
        requirements: Some(requirements_message(requirements)),
        ..Default::default()
    }
}

/// The message form of payment requirements.
pub fn requirements_message(r: &PaymentRequirements) -> v1::PaymentRequirements {
    v1::PaymentRequirements {
        scheme: r.scheme.clone(),
        network: r.network.clone(),
        asset: r.asset.to_checksum(None),
        pay_to: r.pay_to.to_checksum(None),
        amount: r.amount.to_string(),
        max_timeout_seconds: r.max_timeout_seconds.unwrap_or(0),
    }
}
