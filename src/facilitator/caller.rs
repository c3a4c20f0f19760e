//! Who is calling, checked once for every route: an axum extractor over the daemon's
//! credentials ([`Auth::check`], the same as gRPC's), so no handler begins with the check.

use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use super::{Facilitator, LISTENER, Refused, count};
use crate::auth::Role;
use crate::connections::Client;

/// The caller of a request: its name for the ledger and the limits (its credential's, or
/// `http:<address>` while authentication is off, on loopback). A route that takes it
/// answers 401 (no or an unknown credential) or 403 (another role) before its handler runs,
/// counted under the route's endpoint.
pub struct Caller(pub String);

impl FromRequestParts<Arc<Facilitator>> for Caller {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, f: &Arc<Facilitator>) -> Result<Caller, Refused> {
        let endpoint = endpoint(parts.uri.path());
        let Some(ConnectInfo(Client { peer, .. })) = parts.extensions.get::<ConnectInfo<Client>>().cloned()
        else {
            // Served without connection info (never by `serve`): nobody to check.
            count(endpoint, "unauthenticated");
            let message = "no connection information to authenticate the caller by".to_owned();
            return Err(Refused { code: StatusCode::INTERNAL_SERVER_ERROR, message });
        };
        let authorization = parts.headers.get(header::AUTHORIZATION).map(|v| v.to_str().ok());
        match f.auth.check(LISTENER, Role::Api, authorization, Some(&peer)) {
            Ok(Some(principal)) => Ok(Caller(principal.name.to_string())),
            Ok(None) => Ok(Caller(match peer.addr {
                Some(addr) => format!("http:{}", addr.ip()),
                None => "http".to_owned(),
            })),
            Err(status) => {
                let (code, outcome) = if status.code() == tonic::Code::PermissionDenied {
                    (StatusCode::FORBIDDEN, "permission_denied")
                } else {
                    (StatusCode::UNAUTHORIZED, "unauthenticated")
                };
                count(endpoint, outcome);
                Err(Refused { code, message: status.message().to_owned() })
            }
        }
    }
}

/// The endpoint a path is counted under (`x402_batcher_facilitator_requests_total`).
fn endpoint(path: &str) -> &'static str {
    match path.trim_start_matches('/').split('/').next().unwrap_or("") {
        "supported" => "supported",
        "verify" => "verify",
        "settle" => "settle",
        "payments" => "payment",
        "health" => "health",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_route_is_counted_under_its_endpoint() {
        assert_eq!(super::endpoint("/verify"), "verify");
        assert_eq!(super::endpoint("/settle"), "settle");
        assert_eq!(super::endpoint("/supported"), "supported");
        assert_eq!(super::endpoint("/payments/0x00"), "payment");
        assert_eq!(super::endpoint("/nope"), "other");
    }
}
