//! The gRPC services over [`crate::ingest::Ingest`] and the ledger: Ingest (unary and
//! streaming submission), Payments (lookup and a resumable change feed) and Admin (status
//! and the runtime settlement policy), and the one place decisions and system conditions
//! become gRPC replies and statuses. Calls arrive here authenticated ([`crate::auth`]);
//! a submission is named after its authenticated sender.
//!
//! Every stream has a bound: a SubmitStream has at most [`MAX_IN_FLIGHT_PER_STREAM`]
//! requests being decided (reading stops beyond that, so HTTP/2 flow control pushes back
//! on the client), and replies wait in a buffer of the same size.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::{self, v1};
use crate::auth::{Peer, Principal, Role};
use crate::ingest::{Decision, Ingest, Intent, SubmitError};
use crate::ledger::Repeat;
use crate::ledger::{AuthKey, LedgerHandle, PaymentId};
use crate::policy::PolicyHandle;
use crate::settle::StatusBoard;
use crate::x402::decode;

/// Requests of one SubmitStream decided concurrently: enough to keep both verify threads
/// busy and fill ledger groups from a single client.
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 1024;

/// Events read from the ledger per catch-up step of WatchPayments.
const WATCH_PAGE: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Shared state of the services.
#[derive(Clone)]
pub struct Services {
    ingest: Arc<Ingest>,
    ledger: LedgerHandle,
    started: Instant,
    /// Turns true when the daemon starts draining: long-lived streams end.
    shutdown: watch::Receiver<bool>,
    policy: PolicyHandle,
    board: StatusBoard,
}

impl Services {
    pub fn new(
        ingest: Arc<Ingest>,
        shutdown: watch::Receiver<bool>,
        policy: PolicyHandle,
        board: StatusBoard,
    ) -> Self {
        let ledger = ingest.ledger().clone();
        Self { ingest, ledger, started: Instant::now(), shutdown, policy, board }
    }
}

#[tonic::async_trait]
impl v1::ingest_server::Ingest for Services {
    async fn submit(&self, request: Request<v1::SubmitRequest>) -> Result<Response<v1::SubmitReply>, Status> {
        let caller = Caller::of(&request);
        let mut req = request.into_inner();
        caller.bind(&mut req).map_err(|e| status(&e))?;
        let decision = submit(&self.ingest, &req).await.map_err(|e| status(&e))?;
        Ok(Response::new(reply(req.request_id, Ok(decision))))
    }

    type SubmitStreamStream = BoxStream<v1::SubmitReply>;

    async fn submit_stream(
        &self,
        request: Request<Streaming<v1::SubmitRequest>>,
    ) -> Result<Response<Self::SubmitStreamStream>, Status> {
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT_PER_STREAM);
        let ingest = Arc::clone(&self.ingest);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_STREAM));
            let mut tasks = JoinSet::new();
            let mut draining = false;
            loop {
                let next = tokio::select! {
                    // On shutdown stop reading; what was read is still answered below.
                    _ = drained(&mut shutdown) => {
                        draining = true;
                        break;
                    }
                    next = inbound.message() => next,
                };
                let mut req = match next {
                    Ok(Some(req)) => req,
                    // The client closed its side, or the connection broke.
                    Ok(None) | Err(_) => break,
                };
                if let Err(e) = caller.bind(&mut req) {
                    let _ = tx.send(Ok(reply(req.request_id, Err(e)))).await;
                    continue;
                }
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { break };
                let (ingest, tx) = (Arc::clone(&ingest), tx.clone());
                tasks.spawn(async move {
                    let result = submit(&ingest, &req).await;
                    let _ = tx.send(Ok(reply(req.request_id, result))).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            if draining {
                // Explicit, so a client knows every request it sent without a reply was not
                // processed and can go elsewhere.
                let status = Status::unavailable(
                    "the daemon is shutting down: requests without a reply were not processed",
                );
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Decides one submission (an acceptance). A message that is not a submission is refused
/// before the decision path; a payment it cannot read is a refusal like any other.
async fn submit(ingest: &Ingest, req: &v1::SubmitRequest) -> Result<Decision, SubmitError> {
    match api::payment_request(req) {
        Ok(request) => ingest.decide(request, Intent::Accept).await,
        Err(e) if e.is_malformed_request() => {
            ingest.counted(Err(SubmitError::InvalidArgument(e.to_string())))
        }
        Err(e) => ingest.counted(Ok(Decision::Rejected { reason: e.reason(), message: e.to_string() })),
    }
}

/// The gRPC status of a system condition.
fn code(e: &SubmitError) -> tonic::Code {
    match e {
        SubmitError::InvalidArgument(_) => tonic::Code::InvalidArgument,
        SubmitError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
        SubmitError::Unavailable(_) => tonic::Code::Unavailable,
        SubmitError::PermissionDenied(_) => tonic::Code::PermissionDenied,
    }
}

fn status(e: &SubmitError) -> Status {
    Status::new(code(e), e.to_string())
}

/// The reply for a decision, or for a system condition on a stream.
fn reply(request_id: String, result: Result<Decision, SubmitError>) -> v1::SubmitReply {
    use v1::submit_reply::Outcome;
    let outcome = match result {
        Ok(Decision::Accepted { record, repeat }) => Outcome::Accepted(v1::Accepted {
            payment_id: record.payment_id().to_string(),
            status: api::status(record.status) as i32,
            duplicate: repeat != Repeat::New,
            repeat: api::repeat(repeat) as i32,
        }),
        // gRPC submissions always accept; a hold is the HTTP facilitator's.
        Ok(Decision::Held { .. }) => Outcome::Error(v1::SubmitError {
            code: tonic::Code::Internal as i32,
            message: "a gRPC submission was held instead of accepted".into(),
        }),
        Ok(Decision::Rejected { reason, message }) => {
            Outcome::Rejected(v1::Rejected { reason: reason.code().into(), message })
        }
        Err(e) => Outcome::Error(v1::SubmitError { code: code(&e) as i32, message: e.to_string() }),
    };
    v1::SubmitReply { request_id, outcome: Some(outcome) }
}

/// Who sent a submission: the authenticated API server, if authentication is on.
struct Caller {
    principal: Option<Arc<Principal>>,
    peer: String,
}

impl Caller {
    fn of<T>(request: &Request<T>) -> Caller {
        Caller {
            principal: request.extensions().get::<Arc<Principal>>().cloned(),
            peer: Peer::describe(request.extensions().get::<Peer>()),
        }
    }

    /// Names the submission after its authenticated sender: an empty `api_server` takes the
    /// credential's name; another name is refused (one server cannot record, or spend the
    /// limits of, another). Without authentication the field is the sender's own claim.
    fn bind(&self, req: &mut v1::SubmitRequest) -> Result<(), SubmitError> {
        let Some(principal) = &self.principal else { return Ok(()) };
        if !req.api_server.is_empty() && req.api_server != *principal.name {
            let why = format!(
                "api_server {:?} is not the authenticated caller {:?}; leave it empty or use your own name",
                req.api_server, principal.name
            );
            crate::auth::refused(Role::Api.as_str(), &self.peer, Some(tonic::Code::PermissionDenied), &why);
            return Err(SubmitError::PermissionDenied(why));
        }
        req.api_server = principal.name.to_string();
        Ok(())
    }
}

/// Resolves once the daemon starts draining (or the signal is gone).
async fn drained(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across the caller's awaits.
    let _ = shutdown.wait_for(|draining| *draining).await;
}

fn bad_request(what: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{what}: {e}"))
}

#[tonic::async_trait]
impl v1::payments_server::Payments for Services {
    async fn get_payment(
        &self,
        request: Request<v1::GetPaymentRequest>,
    ) -> Result<Response<v1::Payment>, Status> {
        use v1::get_payment_request::Key;
        let ledger = self.ledger.ledger();
        let found = match request.into_inner().key {
            None => return Err(Status::invalid_argument("set payment_id or authorization_key")),
            Some(Key::PaymentId(id)) => {
                let id: PaymentId = id
                    .parse()
                    .map_err(|_| bad_request("payment_id", "must be 0x followed by 32 hex digits"))?;
                ledger.get_by_id(&id)
            }
            Some(Key::AuthorizationKey(k)) => {
                let token = decode::parse_address("token", &k.token).map_err(|e| bad_request("token", e))?;
                let from = decode::parse_address("from", &k.from).map_err(|e| bad_request("from", e))?;
                let nonce = decode::parse_b256("nonce", &k.nonce).map_err(|e| bad_request("nonce", e))?;
                ledger.get(&AuthKey::new(k.chain_id, token, from, nonce))
            }
        };
        match found {
            Ok(Some(record)) => Ok(Response::new(api::payment(&record))),
            Ok(None) => Err(Status::not_found("no such payment")),
            Err(e) => Err(Status::unavailable(format!("ledger: {e}"))),
        }
    }

    type WatchPaymentsStream = BoxStream<v1::PaymentEvent>;

    async fn watch_payments(
        &self,
        request: Request<v1::WatchPaymentsRequest>,
    ) -> Result<Response<Self::WatchPaymentsStream>, Status> {
        let req = request.into_inner();
        let wanted: HashSet<i32> = req.statuses.iter().copied().collect();
        let (tx, rx) = mpsc::channel(WATCH_PAGE);
        // Subscribe before the first read: a change committed after it is always seen,
        // either by the read or by the notification.
        let mut changes = self.ledger.subscribe();
        let ledger = Arc::clone(self.ledger.ledger());
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut cursor = req.after_seq;
            loop {
                let page = {
                    let ledger = Arc::clone(&ledger);
                    tokio::task::spawn_blocking(move || ledger.events_after(cursor, WATCH_PAGE)).await
                };
                let events = match page {
                    Ok(Ok(events)) => events,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(Status::unavailable(format!("ledger: {e}")))).await;
                        return;
                    }
                    Err(_) => return,
                };
                if events.is_empty() {
                    tokio::select! {
                        changed = changes.recv() => match changed {
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        },
                        _ = drained(&mut shutdown) => {
                            let _ = tx.send(Err(Status::unavailable("the daemon is shutting down; resume from your last seq"))).await;
                            return;
                        }
                        _ = tx.closed() => return,
                    }
                }
                for record in events {
                    cursor = record.seq;
                    if !wanted.is_empty() && !wanted.contains(&(api::status(record.status) as i32)) {
                        continue;
                    }
                    let event = api::payment_event(&record);
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl v1::admin_server::Admin for Services {
    async fn get_status(&self, _: Request<v1::GetStatusRequest>) -> Result<Response<v1::Status>, Status> {
        let ledger = self.ledger.ledger();
        let chains = self.board.chains();
        Ok(Response::new(v1::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs(),
            paused: self.policy.get().paused,
            draining: self.ingest.is_draining(),
            verify_queue_depth: self.ingest.pool().queue_depth() as u64,
            pending_payments: ledger.pending(),
            ledger_seq: ledger.last_seq(),
            chains: chains.iter().map(api::chain_status).collect(),
            settlers: chains.iter().flat_map(api::settler_statuses).collect(),
        }))
    }

    async fn get_policy(&self, _: Request<v1::GetPolicyRequest>) -> Result<Response<v1::Policy>, Status> {
        Ok(Response::new(api::policy(&self.policy.get())))
    }

    async fn update_policy(
        &self,
        request: Request<v1::UpdatePolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let caller = Caller::of(&request);
        let source = match &caller.principal {
            Some(p) => format!("admin {} from {}", p.name, caller.peer),
            None => format!("admin from {}", caller.peer),
        };
        let req = request.into_inner();
        match self.policy.update(&source, |p| p.with_update(&api::policy_update(&req)?)) {
            Ok(p) => Ok(Response::new(api::policy(&p))),
            Err(e) => Err(Status::invalid_argument(format!("policy not changed: {e}"))),
        }
    }
}
