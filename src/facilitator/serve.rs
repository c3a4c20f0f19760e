//! The facilitator's routes and its listener: each handler takes its [`Caller`] (checked
//! before it runs) and translates; the listener's connections (TLS or not, under the
//! listener's caps and deadlines) reach axum through [`crate::connections::serve_http`].

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;

use super::caller::Caller;
use super::{Facilitator, count};
use crate::ledger::PaymentId;

type Shared = State<Arc<Facilitator>>;

/// The routes, over `facilitator`, taking bodies of at most `max_body` bytes.
pub fn router(facilitator: Arc<Facilitator>, max_body: usize) -> Router {
    Router::new()
        .route("/supported", get(get_supported))
        .route("/verify", post(post_verify))
        .route("/settle", post(post_settle))
        .route("/payments/{id}", get(get_payment))
        .route("/health", get(get_health))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(facilitator)
}

async fn get_supported(State(f): Shared, _: Caller) -> Response {
    count("supported", "ok");
    Json(f.supported.clone()).into_response()
}

async fn post_verify(State(f): Shared, Caller(api_server): Caller, body: Bytes) -> Response {
    let (status, reply) = f.verify(api_server, &body).await;
    (status, Json(reply)).into_response()
}

async fn post_settle(State(f): Shared, Caller(api_server): Caller, body: Bytes) -> Response {
    let (status, reply) = f.settle(api_server, &body).await;
    (status, Json(reply)).into_response()
}

async fn get_payment(State(f): Shared, _: Caller, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<PaymentId>() else {
        let error = "a payment id is 0x followed by 32 hex digits";
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": error }))).into_response();
    };
    match f.ledger.ledger().get_by_id(&id) {
        Ok(Some(record)) => Json(f.payment_view(&record)).into_response(),
        Ok(None) => {
            (StatusCode::NOT_FOUND, Json(serde_json::json!({ "error": "no such payment" }))).into_response()
        }
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "error": format!("ledger: {e}") })))
                .into_response()
        }
    }
}

async fn get_health(State(f): Shared) -> Response {
    if f.ingest.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "draining" }))).into_response()
    } else {
        Json(serde_json::json!({ "status": "serving" })).into_response()
    }
}

/// Serves the facilitator on `listener` through `gate` (TLS when `tls` is given) until
/// `shutdown` resolves, then lets the requests in flight finish.
pub async fn serve(
    facilitator: Arc<Facilitator>,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    gate: Arc<crate::connections::Gate>,
    max_body: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::connections::serve_http(listener, tls, gate, router(facilitator, max_body), shutdown).await
}
