//! The ingest path end to end: real gRPC on 127.0.0.1:0, balances read from a real anvil,
//! and the ledger on each backend in turn (RocksDB in a temp dir, a throw-away PostgreSQL):
//! the same assertions on both.

use crate::both_backends;
use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use common::daemon::TestDaemon;
use common::store::Backend;
use futures::StreamExt;
use x402_batcher::api::v1;
use x402_batcher::client;
use x402_batcher::clock::{Clock, SystemClock};
use x402_batcher::tools::testkit::{self, PaymentBuilder};
use x402_batcher::x402::Reason;

/// Every test is bounded; anvil and the daemon answer in milliseconds.
const LIMIT: Duration = Duration::from_secs(120);

fn now() -> u64 {
    SystemClock.now_unix()
}

fn request(b: &PaymentBuilder) -> v1::SubmitRequest {
    let signed = b.build();
    let mut req = client::typed_request(
        signed.authorization.nonce.to_string(),
        &signed,
        &testkit::requirements_for(&signed),
    );
    req.resource = "https://api.example/paid".into();
    req.api_server = "node-1".into();
    req
}

fn outcome(reply: &v1::SubmitReply) -> Result<(String, bool), String> {
    match reply.outcome.as_ref().expect("reply has an outcome") {
        v1::submit_reply::Outcome::Accepted(a) => Ok((a.payment_id.clone(), a.duplicate)),
        v1::submit_reply::Outcome::Rejected(r) => Err(r.reason.clone()),
        v1::submit_reply::Outcome::Error(e) => Err(format!("error {}: {}", e.code, e.message)),
    }
}

async fn submit(d: &TestDaemon, req: v1::SubmitRequest) -> Result<(String, bool), String> {
    let mut client = d.ingest().await;
    outcome(&client.submit(req).await.expect("no transport error").into_inner())
}

async fn accepts_and_refuses_each_kind_with_its_code(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |_| {}).await;
        let payer = d.payers("kinds", 1, 1_000_000).await.remove(0);
        let base = PaymentBuilder::new(&payer, &d.domain(), now());

        let (id, duplicate) = submit(&d, request(&base.clone().nonce_index(1))).await.expect("accepted");
        assert!(!duplicate);
        let payment = d
            .payments()
            .await
            .get_payment(v1::GetPaymentRequest {
                key: Some(v1::get_payment_request::Key::PaymentId(id.clone())),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(payment.status, v1::PaymentStatus::Accepted as i32);
        assert_eq!(payment.api_server, "node-1");

        let code = |r: Reason| Err(r.code().to_owned());
        assert_eq!(
            submit(&d, request(&base.clone().nonce_index(2).expired())).await,
            code(Reason::InvalidValidBefore)
        );
        assert_eq!(
            submit(&d, request(&base.clone().nonce_index(3).not_yet_valid())).await,
            code(Reason::InvalidValidAfter)
        );
        let mut wrong_recipient = request(&base.clone().nonce_index(4));
        wrong_recipient.requirements.as_mut().unwrap().pay_to = Address::repeat_byte(7).to_string();
        assert_eq!(submit(&d, wrong_recipient).await, code(Reason::RecipientMismatch));
        let mut wrong_amount = request(&base.clone().nonce_index(5));
        wrong_amount.requirements.as_mut().unwrap().amount = "1".into();
        assert_eq!(submit(&d, wrong_amount).await, code(Reason::ValueMismatch));
        let forged = base.clone().nonce_index(6).signed_by(&PrivateKeySigner::random());
        assert_eq!(submit(&d, request(&forged)).await, code(Reason::InvalidSignature));

        // A malformed request is a transport-level error, not a refusal.
        let mut client = d.ingest().await;
        let status = client.submit(v1::SubmitRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        // Only the one good payment is recorded.
        assert_eq!(d.devnet.as_ref().token(), base.build().token);
        d.stop().await;
    })
    .await
    .expect("bounded");
}

async fn retries_are_idempotent_even_when_concurrent_and_nonce_reuse_is_refused(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |_| {}).await;
        let payer = d.payers("idem", 1, 1_000_000).await.remove(0);
        let payment = PaymentBuilder::new(&payer, &d.domain(), now()).value(1000);
        let req = request(&payment);

        // Eight API servers submit the same payment at once.
        let replies = futures::future::join_all((0..8).map(|_| submit(&d, req.clone()))).await;
        let ids: HashSet<_> = replies.iter().map(|r| r.as_ref().expect("accepted").0.clone()).collect();
        assert_eq!(ids.len(), 1, "one payment id for one authorization");
        let fresh = replies.iter().filter(|r| !r.as_ref().unwrap().1).count();
        assert_eq!(fresh, 1, "exactly one submission records it; the others are duplicates");

        // Same nonce, different transfer: a double spend.
        let conflicting = payment.clone().value(2000);
        assert_eq!(submit(&d, request(&conflicting)).await, Err(Reason::NonceAlreadyUsed.code().to_owned()));

        // Same idempotency key on a different payment: refused.
        let mut first = request(&payment.clone().nonce_index(10));
        first.idempotency_key = "pay-abc".into();
        submit(&d, first.clone()).await.expect("accepted");
        let mut second = request(&payment.clone().nonce_index(11));
        second.idempotency_key = "pay-abc".into();
        assert_eq!(submit(&d, second).await, Err(Reason::InvalidPayload.code().to_owned()));

        // Whether to serve: the first acceptance and a retry under its key, yes; the same
        // authorization without that key (a resent header), no.
        let repeat = |req: v1::SubmitRequest| async {
            let mut client = d.ingest().await;
            match client.submit(req).await.unwrap().into_inner().outcome {
                Some(v1::submit_reply::Outcome::Accepted(a)) => v1::Repeat::try_from(a.repeat).unwrap(),
                other => panic!("{other:?}"),
            }
        };
        let fresh = request(&payment.clone().nonce_index(12));
        assert_eq!(repeat(fresh.clone()).await, v1::Repeat::New);
        assert_eq!(repeat(fresh).await, v1::Repeat::Replay);
        assert_eq!(repeat(first.clone()).await, v1::Repeat::Retry, "the same key: the same submission");
        first.idempotency_key.clear();
        assert_eq!(repeat(first).await, v1::Repeat::Replay, "without its key: a replay");
        d.stop().await;
    })
    .await
    .expect("bounded");
}

async fn concurrent_overspend_is_refused_exactly_at_the_balance(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |_| {}).await;
        let payer = d.payers("overspend", 1, 10).await.remove(0);
        let base = PaymentBuilder::new(&payer, &d.domain(), now()).value(1);
        let replies =
            futures::future::join_all((0..20).map(|i| submit(&d, request(&base.clone().nonce_index(i)))))
                .await;
        let accepted = replies.iter().filter(|r| r.is_ok()).count();
        let insufficient =
            replies.iter().filter(|r| **r == Err(Reason::InsufficientFunds.code().to_owned())).count();
        assert_eq!((accepted, insufficient), (10, 10), "{replies:?}");
        d.stop().await;
    })
    .await
    .expect("bounded");
}

async fn a_full_queue_answers_resource_exhausted_and_writes_nothing(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |c| {
            c.verify.threads = 1;
            c.verify.queue_capacity = 1;
        })
        .await;
        let payers = d.payers("full", 4, 1_000_000).await;
        let requests: Vec<_> = (0..200u64)
            .map(|i| {
                request(&PaymentBuilder::new(&payers[i as usize % 4], &d.domain(), now()).nonce_index(i))
            })
            .collect();
        let client = d.ingest().await;
        let replies = futures::future::join_all(requests.iter().map(|r| {
            let mut client = client.clone();
            async move { client.submit(r.clone()).await }
        }))
        .await;
        let exhausted: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Err(s) if s.code() == tonic::Code::ResourceExhausted))
            .map(|(i, _)| i)
            .collect();
        let accepted =
            replies.iter().filter(|r| matches!(r, Ok(ok) if outcome(ok.get_ref()).is_ok())).count();
        assert!(!exhausted.is_empty(), "a queue of one must overflow under 200 concurrent submissions");
        assert_eq!(accepted + exhausted.len(), 200, "every submission is either accepted or exhausted");

        // Nothing of a refused submission was written: each is accepted as new now.
        for &i in &exhausted {
            let (_, duplicate) = submit(&d, requests[i].clone()).await.expect("accepted on retry");
            assert!(!duplicate, "submission {i} was half-written before");
        }
        d.stop().await;
    })
    .await
    .expect("bounded");
}

async fn submit_stream_correlates_replies_by_request_id(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |_| {}).await;
        let payer = d.payers("stream", 1, 1_000_000).await.remove(0);
        let base = PaymentBuilder::new(&payer, &d.domain(), now());
        let mut requests: Vec<_> = (0..100).map(|i| request(&base.clone().nonce_index(i))).collect();
        requests[7] = request(&base.clone().nonce_index(7).expired());
        let expected: HashSet<String> = requests.iter().map(|r| r.request_id.clone()).collect();
        let mut client = d.ingest().await;
        let mut replies =
            client.submit_stream(futures::stream::iter(requests.clone())).await.unwrap().into_inner();
        let mut seen = HashSet::new();
        while let Some(reply) = replies.next().await {
            let reply = reply.unwrap();
            let ok = outcome(&reply);
            if reply.request_id == requests[7].request_id {
                assert_eq!(ok, Err(Reason::InvalidValidBefore.code().to_owned()));
            } else {
                ok.expect("accepted");
            }
            assert!(seen.insert(reply.request_id), "one reply per request");
        }
        assert_eq!(seen, expected);
        d.stop().await;
    })
    .await
    .expect("bounded");
}

async fn watch_resumes_from_a_cursor_without_gaps_or_duplicates(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |_| {}).await;
        let payer = d.payers("watch", 1, 1_000_000).await.remove(0);
        let base = PaymentBuilder::new(&payer, &d.domain(), now());
        for i in 0..30 {
            submit(&d, request(&base.clone().nonce_index(i))).await.unwrap();
        }
        let mut payments = d.payments().await;

        // Read part of the history, then disconnect.
        let mut stream = payments
            .watch_payments(v1::WatchPaymentsRequest { after_seq: 0, statuses: vec![] })
            .await
            .unwrap()
            .into_inner();
        let mut seqs = Vec::new();
        for _ in 0..12 {
            seqs.push(stream.next().await.unwrap().unwrap().seq);
        }
        drop(stream);

        // Resume from the last seq seen; more payments arrive while watching.
        let cursor = *seqs.last().unwrap();
        let mut stream = payments
            .watch_payments(v1::WatchPaymentsRequest { after_seq: cursor, statuses: vec![] })
            .await
            .unwrap()
            .into_inner();
        for i in 30..40 {
            submit(&d, request(&base.clone().nonce_index(i))).await.unwrap();
        }
        while seqs.len() < 40 {
            seqs.push(stream.next().await.unwrap().unwrap().seq);
        }
        assert_eq!(seqs, (1..=40).collect::<Vec<u64>>(), "every change exactly once, in order");
        d.stop().await;
    })
    .await
    .expect("bounded");
}

async fn a_restart_recovers_every_acknowledged_payment(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |_| {}).await;
        let payer = d.payers("restart", 1, 1_000_000).await.remove(0);
        let base = PaymentBuilder::new(&payer, &d.domain(), now());
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(submit(&d, request(&base.clone().nonce_index(i))).await.unwrap().0);
        }
        let (devnet, ledger) = (d.devnet.clone(), d.ledger.clone());
        d.stop().await;

        let d = TestDaemon::start_on_ledger(devnet, ledger, |_| {}).await;
        for (i, id) in ids.iter().enumerate() {
            let (again, duplicate) = submit(&d, request(&base.clone().nonce_index(i as u64))).await.unwrap();
            assert_eq!((&again, duplicate), (id, true), "payment {i} survived the restart");
        }
        let conflicting = base.clone().nonce_index(3).value(1);
        assert_eq!(submit(&d, request(&conflicting)).await, Err(Reason::NonceAlreadyUsed.code().to_owned()));
        d.stop().await;
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start(|_| {}).await;
        let channel = tonic::transport::Channel::from_shared(d.url()).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        let status = health
            .check(HealthCheckRequest { service: "x402.batcher.v1.Ingest".into() })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32);

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = reflection
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            replies.next().await.unwrap().unwrap().message_response
        else {
            panic!("a service list")
        };
        let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in ["x402.batcher.v1.Ingest", "x402.batcher.v1.Payments", "x402.batcher.v1.Admin"] {
            assert!(names.contains(service), "{service} missing from {names:?}");
        }
        d.stop().await;
    })
    .await
    .expect("bounded");
}

/// Shutdown answers what it read and then says UNAVAILABLE, on the open stream; a request
/// is never left without either an answer or that explicit status.
async fn draining_answers_in_flight_then_says_unavailable(backend: Backend) {
    tokio::time::timeout(LIMIT, async {
        let d = TestDaemon::start_with(backend, |_| {}).await;
        let payer = d.payers("drain", 1, 1_000_000).await.remove(0);
        let base = PaymentBuilder::new(&payer, &d.domain(), now());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut client = d.ingest().await;
        let mut replies =
            client.submit_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        for i in 0..20 {
            tx.send(request(&base.clone().nonce_index(i))).await.unwrap();
        }
        let mut answered = HashSet::new();
        while answered.len() < 20 {
            let reply = replies.next().await.unwrap().unwrap();
            outcome(&reply).expect("accepted");
            answered.insert(reply.request_id);
        }

        // Shut down with the stream still open, then keep sending on it.
        let stop = tokio::spawn(d.stop());
        let mut ended_with = None;
        for i in 20..40 {
            if tx.send(request(&base.clone().nonce_index(i))).await.is_err() {
                break;
            }
        }
        while let Some(item) = replies.next().await {
            match item {
                Ok(reply) => {
                    outcome(&reply).expect("whatever was read before the drain is accepted");
                }
                Err(status) => {
                    ended_with = Some(status.code());
                    break;
                }
            }
        }
        assert_eq!(
            ended_with,
            Some(tonic::Code::Unavailable),
            "the stream ends with an explicit UNAVAILABLE"
        );
        drop(tx);
        stop.await.unwrap();
    })
    .await
    .expect("bounded");
}

both_backends!(
    #[tokio::test]
    accepts_and_refuses_each_kind_with_its_code,
    #[tokio::test]
    retries_are_idempotent_even_when_concurrent_and_nonce_reuse_is_refused,
    #[tokio::test]
    concurrent_overspend_is_refused_exactly_at_the_balance,
    #[tokio::test]
    a_full_queue_answers_resource_exhausted_and_writes_nothing,
    #[tokio::test]
    submit_stream_correlates_replies_by_request_id,
    #[tokio::test]
    watch_resumes_from_a_cursor_without_gaps_or_duplicates,
    #[tokio::test]
    a_restart_recovers_every_acknowledged_payment,
    #[tokio::test]
    draining_answers_in_flight_then_says_unavailable,
);
