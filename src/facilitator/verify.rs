//! `POST /verify`: the whole decision of a submission, then a hold (nothing owed yet): the
//! payer's balance is reserved and the payment refused elsewhere until its `/settle` claims
//! it or the hold lapses.

use axum::http::StatusCode;

use super::wire::{self, VerifyReply};
use super::{Facilitator, count, error_status, replayed, wire_status};
use crate::ingest::{Decision, Intent};
use crate::ledger::Repeat;
use crate::x402::Reason;

impl Facilitator {
    /// `POST /verify`: the decision, then a hold.
    pub async fn verify(&self, api_server: String, body: &[u8]) -> (StatusCode, VerifyReply) {
        let req = match wire::request(body) {
            Ok(req) => req,
            Err(e) => {
                count("verify", e.reason().code());
                return (wire_status(&e), VerifyReply::invalid(e.reason().code(), e.to_string(), None));
            }
        };
        let payer = req.payment.authorization.from;
        let hold = Intent::Hold { hold_ms: self.config.hold_ms };
        let (status, reply) = match self.ingest.decide(Self::payment_request(req, api_server), hold).await {
            Ok(Decision::Held { payer, .. }) => (StatusCode::OK, VerifyReply::valid(payer)),
            // The same payment-identifier as the acceptance: the first answer again.
            Ok(Decision::Accepted { repeat: Repeat::Retry, .. }) => {
                (StatusCode::OK, VerifyReply::valid(payer))
            }
            Ok(Decision::Accepted { record, .. }) => (
                StatusCode::OK,
                VerifyReply::invalid(Reason::NonceAlreadyUsed.code(), replayed(&record), Some(payer)),
            ),
            Ok(Decision::Rejected { reason, message }) => {
                (StatusCode::OK, VerifyReply::invalid(reason.code(), message, Some(payer)))
            }
            Err(e) => (
                error_status(&e),
                VerifyReply::invalid(Reason::UnexpectedVerifyError.code(), e.to_string(), Some(payer)),
            ),
        };
        count("verify", reply.invalid_reason.as_deref().unwrap_or("valid"));
        (status, reply)
    }
}
