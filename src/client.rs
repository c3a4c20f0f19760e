//! A Rust client for the daemon's API, for API servers written in Rust and for the load
//! generator: typed construction of submissions and one-call helpers over the generated
//! stubs.

use tonic::transport::Channel;

use crate::api::{self, v1};
use crate::x402::{PaymentRequirements, SignedAuthorization};

/// A connection to the daemon (one HTTP/2 channel; clones share it).
#[derive(Clone, Debug)]
pub struct Client {
    pub ingest: v1::ingest_client::IngestClient<Channel>,
    pub payments: v1::payments_client::PaymentsClient<Channel>,
    pub admin: v1::admin_client::AdminClient<Channel>,
}

/// Why the client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not a valid daemon URL (expected e.g. http://127.0.0.1:50051)")]
    InvalidUrl(String),
    #[error("cannot connect to the daemon")]
    Connect(#[from] tonic::transport::Error),
}

impl Client {
    /// Connects to `url` (for example `http://127.0.0.1:50051`).
    pub async fn connect(url: String) -> Result<Client, ClientError> {
        let endpoint = Channel::from_shared(url.clone()).map_err(|_| ClientError::InvalidUrl(url))?;
        Ok(Client::from_channel(endpoint.connect().await?))
    }

    pub fn from_channel(channel: Channel) -> Client {
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
