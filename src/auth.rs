//! Who may call the daemon: credentials (bearer tokens and client-certificate names, each
//! with a name and a role), and the interceptor ([`Gate`]) that checks every call on a
//! listener before anything else sees it.
//!
//! - No credential configured: authentication is off (the config allows that only while
//!   both listeners are on loopback).
//! - A bearer token (`authorization: Bearer <token>`) decides when present: its SHA-256 must
//!   be a configured `token_sha256`. Tokens are never stored, only their hashes.
//! - Otherwise a client certificate (verified against `tls.client_ca_file` during the
//!   handshake) must carry a configured `cert_name` among its DNS subjectAltNames.
//! - The credential's role must be the listener's: API servers on the API listener
//!   (Ingest, Payments), operators on the Admin listener.
//!
//! Refusals are UNAUTHENTICATED (no credential, an unknown or revoked one) or
//! PERMISSION_DENIED (a known caller on the wrong listener), each logged with the peer's
//! address and counted in `x402_batcher_auth_refused_total`. A refused call never reaches
//! a service. Credentials reload on SIGHUP ([`Auth::reload`]): removing one revokes it for
//! the next call, even on an open connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sha2::{Digest as _, Sha256};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tonic::{Request, Status};

pub use crate::config::Role;
use crate::config::{CredentialConfig, parse_cert_name, parse_token_hash};

/// An authenticated caller, in the request's extensions for the services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub role: Role,
}

/// What the daemon knows of a connection, from its accept to its end (in every request's
/// extensions).
#[derive(Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The client's certificate, verified during the TLS handshake (shared: tonic clones
    /// the connection's info into every request).
    pub cert: Option<Arc<CertificateDer<'static>>>,
    /// The credential the certificate matched, against the table of that generation.
    matched: Arc<Mutex<Option<(u64, CertMatch)>>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("addr", &self.addr).field("cert", &self.cert.is_some()).finish()
    }
}

/// The credential a client certificate names, or why none.
type CertMatch = Result<Arc<Principal>, &'static str>;

impl Peer {
    pub fn new(addr: Option<SocketAddr>, cert: Option<CertificateDer<'static>>) -> Peer {
        Peer { addr, cert: cert.map(Arc::new), matched: Arc::default() }
    }

    /// The address of a request's peer, for logs.
    pub fn describe(peer: Option<&Peer>) -> String {
        peer.and_then(|p| p.addr).map_or_else(|| "an unknown peer".to_owned(), |a| a.to_string())
    }
}

/// One generation of the credentials.
#[derive(Default)]
struct Table {
    generation: u64,
    by_token: HashMap<[u8; 32], Arc<Principal>>,
    by_cert: Vec<(ServerName<'static>, Arc<Principal>)>,
}

impl Table {
    fn new(generation: u64, credentials: &[CredentialConfig]) -> Result<Table, String> {
        let mut table = Table { generation, ..Table::default() };
        for c in credentials {
            let principal = Arc::new(Principal { name: c.name.as_str().into(), role: c.role });
            if let Some(hash) = &c.token_sha256 {
                table.by_token.insert(parse_token_hash(hash)?, Arc::clone(&principal));
            }
            if let Some(name) = &c.cert_name {
                let name = ServerName::try_from(parse_cert_name(name)?).map_err(|e| e.to_string())?;
                table.by_cert.push((name, principal));
            }
        }
        Ok(table)
    }

    /// The one credential whose name the certificate carries.
    fn match_cert(&self, cert: &CertificateDer<'_>) -> CertMatch {
        let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
            return Err("the client certificate cannot be parsed");
        };
        let mut found =
            self.by_cert.iter().filter(|(name, _)| cert.verify_is_valid_for_subject_name(name).is_ok());
        match (found.next(), found.next()) {
            (Some((_, p)), None) => Ok(Arc::clone(p)),
            (None, _) => Err("the client certificate names no configured credential (unknown or revoked)"),
            // A wildcard certificate must not let one caller choose among identities.
            (Some(_), Some(_)) => {
                Err("the client certificate matches several credentials (a wildcard name?)")
            }
        }
    }
}

/// The credentials in force, shared by both listeners' gates.
pub struct Auth {
    required: bool,
    table: RwLock<Arc<Table>>,
}

impl Auth {
    /// Credentials from a validated config.
    pub fn new(credentials: &[CredentialConfig]) -> Result<Arc<Auth>, String> {
        Ok(Arc::new(Auth {
            required: !credentials.is_empty(),
            table: RwLock::new(Arc::new(Table::new(0, credentials)?)),
        }))
    }

    /// Whether calls need a credential (any is configured).
    pub fn required(&self) -> bool {
        self.required
    }

    /// Replaces the credentials (a SIGHUP). Turning authentication on or off needs a
    /// restart: the listeners' exposure was checked against it at start-up.
    pub fn reload(&self, credentials: &[CredentialConfig]) -> Result<(), String> {
        if credentials.is_empty() == self.required {
            return Err(if self.required {
                "the new config has no [[credentials]]: turning authentication off needs a restart".to_owned()
            } else {
                "the new config adds [[credentials]]: turning authentication on needs a restart".to_owned()
            });
        }
        let mut current = self.table.write();
        *current = Arc::new(Table::new(current.generation + 1, credentials)?);
        Ok(())
    }

    /// The interceptor for a listener serving `role`'s calls.
    pub fn gate(self: &Arc<Self>, serves: Role) -> Gate {
        Gate { auth: Arc::clone(self), serves }
    }

    /// Checks one call on the listener `listener` serving `serves` calls, from its
    /// `authorization` header (`Some(None)`: present but not text) and its connection. `Ok`
    /// with the caller, or `None` while authentication is off; a refusal is logged and
    /// counted. Both surfaces (gRPC's [`Gate`], the HTTP facilitator) call this.
    pub fn check(
        &self,
        listener: &'static str,
        serves: Role,
        authorization: Option<Option<&str>>,
        peer: Option<&Peer>,
    ) -> Result<Option<Arc<Principal>>, Status> {
        if !self.required {
            return Ok(None);
        }
        let refuse = |status: Status| {
            refused(listener, &Peer::describe(peer), Some(status.code()), status.message());
            status
        };
        let principal = self.identify(authorization, peer).map_err(refuse)?;
        if principal.role != serves {
            return Err(refuse(Status::permission_denied(format!(
                "`{}` is an {} credential; this listener serves {} calls only",
                principal.name,
                principal.role.as_str(),
                serves.as_str()
            ))));
        }
        Ok(Some(principal))
    }

    /// Who is calling, or why nobody the daemon knows is.
    fn identify(
        &self,
        authorization: Option<Option<&str>>,
        peer: Option<&Peer>,
    ) -> Result<Arc<Principal>, Status> {
        let table = Arc::clone(&self.table.read());
        if let Some(value) = authorization {
            let token = value
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer <token>`")
                })?;
            return table
                .by_token
                .get(&hash_token(token))
                .cloned()
                .ok_or_else(|| Status::unauthenticated("unknown or revoked bearer token"));
        }
        let Some((peer, cert)) = peer.and_then(|p| Some((p, p.cert.as_ref()?))) else {
            return Err(Status::unauthenticated(
                "no credentials: present a client certificate or an `authorization: Bearer <token>` header",
            ));
        };
        let mut matched = peer.matched.lock();
        let result = match &*matched {
            Some((generation, result)) if *generation == table.generation => result.clone(),
            _ => {
                let result = table.match_cert(cert);
                *matched = Some((table.generation, result.clone()));
                result
            }
        };
        result.map_err(Status::unauthenticated)
    }
}

/// Checks every call on one listener ([`tonic::service::Interceptor`]); a passed call
/// carries its [`Principal`] in its extensions.
#[derive(Clone)]
pub struct Gate {
    auth: Arc<Auth>,
    serves: Role,
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let authorization = request.metadata().get("authorization").map(|v| v.to_str().ok());
        let peer = request.extensions().get::<Peer>();
        if let Some(principal) = self.auth.check(self.serves.as_str(), self.serves, authorization, peer)? {
            request.extensions_mut().insert(principal);
        }
        Ok(request)
    }
}

/// Logs and counts one refused call (its status code) on `listener` (`api`, `admin`,
/// `facilitator`), or connection (`None`: its TLS handshake failed or could not start).
pub fn refused(listener: &'static str, peer: &str, code: Option<tonic::Code>, why: &str) {
    let code = match code {
        Some(tonic::Code::Unauthenticated) => "unauthenticated",
        Some(tonic::Code::PermissionDenied) => "permission_denied",
        Some(_) => "other",
        None => "tls_handshake",
    };
    tracing::warn!(peer, listener, code, "refused: {why}");
    metrics::counter!("x402_batcher_auth_refused_total", "listener" => listener, "code" => code).increment(1);
}

/// SHA-256 of a bearer token: what the config holds.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random bearer token (256 bits from the kernel's generator) and its SHA-256 in hex
/// (for the config).
pub fn new_token() -> std::io::Result<(String, String)> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token = format!("x4b_{}", hex::encode(bytes));
    let hash = hex::encode(hash_token(&token));
    Ok((token, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(name: &str, role: Role, token: Option<&str>) -> CredentialConfig {
        CredentialConfig {
            name: name.into(),
            role,
            token_sha256: token.map(|t| hex::encode(hash_token(t))),
            cert_name: None,
        }
    }

    fn call(gate: &mut Gate, token: Option<&str>) -> Result<Arc<Principal>, Status> {
        use tonic::service::Interceptor as _;
        let mut request = Request::new(());
        if let Some(t) = token {
            request.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        request.extensions_mut().insert(Peer::new(Some("127.0.0.1:9".parse().unwrap()), None));
        gate.call(request).map(|r| r.extensions().get::<Arc<Principal>>().cloned().unwrap())
    }

    #[test]
    fn tokens_roles_and_revocation() {
        let auth = Auth::new(&[
            credential("api-1", Role::Api, Some("t1")),
            credential("ops", Role::Admin, Some("t2")),
        ])
        .unwrap();
        let (mut api, mut admin) = (auth.gate(Role::Api), auth.gate(Role::Admin));
        assert_eq!(&*call(&mut api, Some("Bearer t1")).unwrap().name, "api-1");
        assert_eq!(&*call(&mut admin, Some("Bearer t2")).unwrap().name, "ops");
        for (token, code) in [
            (None, tonic::Code::Unauthenticated),
            (Some("Bearer nope"), tonic::Code::Unauthenticated),
            (Some("Basic dDE="), tonic::Code::Unauthenticated),
            (Some("Bearer "), tonic::Code::Unauthenticated),
        ] {
            assert_eq!(call(&mut api, token).unwrap_err().code(), code, "{token:?}");
        }
        assert_eq!(call(&mut admin, Some("Bearer t1")).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(call(&mut api, Some("Bearer t2")).unwrap_err().code(), tonic::Code::PermissionDenied);

        auth.reload(&[credential("ops", Role::Admin, Some("t2"))]).unwrap();
        let err = call(&mut api, Some("Bearer t1")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("revoked"), "{}", err.message());
        assert!(auth.reload(&[]).is_err(), "authentication cannot be switched off by a reload");
    }

    #[test]
    fn without_credentials_every_call_passes_unnamed() {
        use tonic::service::Interceptor as _;
        let auth = Auth::new(&[]).unwrap();
        let passed = auth.gate(Role::Api).call(Request::new(())).unwrap();
        assert!(passed.extensions().get::<Arc<Principal>>().is_none());
        assert!(auth.reload(&[credential("api-1", Role::Api, Some("t1"))]).is_err());
    }

    #[test]
    fn a_certificate_names_exactly_one_credential_or_none() {
        let cert = |san: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let der = rcgen::CertificateParams::new(vec![san.to_owned()]).unwrap().self_signed(&key).unwrap();
            der.der().clone()
        };
        let by_cert = |name: &str| CredentialConfig {
            name: name.split('.').next().unwrap().into(),
            role: Role::Api,
            token_sha256: None,
            cert_name: Some(name.into()),
        };
        let table = Table::new(0, &[by_cert("a.fleet.test"), by_cert("b.fleet.test")]).unwrap();
        assert_eq!(&*table.match_cert(&cert("a.fleet.test")).unwrap().name, "a");
        assert_eq!(&*table.match_cert(&cert("B.fleet.test")).unwrap().name, "b");
        assert!(table.match_cert(&cert("c.fleet.test")).unwrap_err().contains("no configured credential"));
        assert!(table.match_cert(&cert("*.fleet.test")).unwrap_err().contains("several"));
        assert!(table.match_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }

    #[test]
    fn a_new_token_matches_its_hash() {
        let (token, hash) = new_token().unwrap();
        assert_eq!(parse_token_hash(&hash).unwrap(), hash_token(&token));
    }
}
