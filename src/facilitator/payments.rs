//! `GET /payments/{id}`: a payment as the facilitator shows it (the URL an `accepted` settle
//! answers with), and the transaction carrying a payment before its inclusion is known.

use super::Facilitator;
use crate::ledger::PaymentRecord;

impl Facilitator {
    /// The `/payments/{id}` view of a payment.
    pub(super) fn payment_view(&self, record: &PaymentRecord) -> serde_json::Value {
        let hash = |h: Option<alloy::primitives::B256>| h.map(|h| h.to_string());
        serde_json::json!({
            "paymentId": record.payment_id().to_string(),
            "status": record.status.as_str(),
            "payer": record.signed.authorization.from.to_checksum(None),
            "payTo": record.signed.authorization.to.to_checksum(None),
            "amount": record.value().to_string(),
            "asset": record.signed.token.to_checksum(None),
            "network": record.submission.network,
            "transaction": hash(record.tx_hash).or_else(|| self.transaction_of(record).map(|h| h.to_string())),
            "blockNumber": (record.block_number > 0).then_some(record.block_number),
            "failureReason": (!record.failure_reason.is_empty()).then_some(&record.failure_reason),
            "failureMessage": (!record.failure_message.is_empty()).then_some(&record.failure_message),
            "acceptedAtMs": record.accepted_at_ms,
        })
    }

    /// The hash of the transaction carrying `record` (its batch's newest signed attempt),
    /// before its inclusion is known.
    pub(super) fn transaction_of(&self, record: &PaymentRecord) -> Option<alloy::primitives::B256> {
        if let Some(hash) = record.tx_hash {
            return Some(hash);
        }
        let (chain, counter) = crate::ledger::BatchRecord::parse_id(&record.batch_id)?;
        let batch = self.ledger.ledger().batch(chain, counter).ok()??;
        batch.attempts.last().map(|a| a.tx_hash)
    }
}
