//! `x402-batcher status`: Admin `GetStatus` for a person (tables) or a script (`--json`).

use serde_json::{Value, json};

use crate::api::v1;
use crate::client::{Client, ClientAuth, ClientError};

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Connect(#[from] ClientError),
    #[error("the daemon refused GetStatus: {0}")]
    Refused(#[from] tonic::Status),
}

/// Reads the daemon's status from its Admin listener at `url`.
pub async fn fetch(url: String, auth: &ClientAuth) -> Result<v1::Status, StatusError> {
    let mut client = Client::connect_with(url, auth).await?;
    Ok(client.admin.get_status(v1::GetStatusRequest {}).await?.into_inner())
}

/// The status as tables: the daemon, then one line per chain, per token and per settler.
pub fn table(s: &v1::Status) -> String {
    let mut out = format!(
        "x402-batcher {}  up {}s  {}{}\nverify queue {}  pending payments {}  ledger seq {}\n",
        s.version,
        s.uptime_seconds,
        if s.paused { "settlement PAUSED" } else { "settling" },
        if s.draining { "  DRAINING" } else { "" },
        s.verify_queue_depth,
        s.pending_payments,
        s.ledger_seq,
    );
    if s.chains.is_empty() {
        out.push_str(
            "\nno settlement engine has reported yet (no settler keys, or its first round is running)\n",
        );
    }
    out.push_str(&rows(
        &["chain", "head", "head time", "base fee wei", "tip wei", "seen at ms"],
        s.chains.iter().map(|c| {
            vec![
                c.chain_id.to_string(),
                c.head_block.to_string(),
                c.head_time.to_string(),
                c.base_fee_wei.clone(),
                c.priority_fee_wei.clone(),
                c.updated_at_ms.to_string(),
            ]
        }),
    ));
    out.push_str(&rows(
        &[
            "chain",
            "token",
            "pending",
            "value",
            "gas fixed",
            "gas/payment",
            "direct gas",
            "l1 direct",
            "l1 fixed",
            "l1/payment",
        ],
        s.chains.iter().flat_map(|c| {
            c.tokens.iter().map(move |t| {
                vec![
                    c.chain_id.to_string(),
                    t.token.clone(),
                    t.pending_payments.to_string(),
                    t.pending_value.clone(),
                    t.batch_fixed_gas.to_string(),
                    t.batch_gas_per_payment.to_string(),
                    t.direct_gas.to_string(),
                    t.l1_fee_direct_wei.clone(),
                    t.l1_fee_batch_fixed_wei.clone(),
                    t.l1_fee_batch_per_payment_wei.clone(),
                ]
            })
        }),
    ));
    let unknown = |known: bool, v: String| if known { v } else { "?".to_owned() };
    out.push_str(&rows(
        &["chain", "settler", "balance wei", "next nonce", "pending tx", "open batch", "tx"],
        s.settlers.iter().map(|t| {
            vec![
                t.chain_id.to_string(),
                t.address.clone(),
                unknown(t.balance_known, t.native_balance_wei.clone()),
                unknown(t.nonce_known, t.next_nonce.to_string()),
                t.pending_transactions.to_string(),
                or_dash(&t.open_batch_id),
                or_dash(&t.open_tx_hash),
            ]
        }),
    ));
    out
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".to_owned() } else { s.to_owned() }
}

/// A table with a blank line before it; nothing when there are no rows.
fn rows(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = String::from("\n");
    out.push_str(&line(header.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The status as JSON (amounts stay decimal strings, as in the API).
pub fn json(s: &v1::Status) -> Value {
    json!({
        "version": s.version,
        "uptime_seconds": s.uptime_seconds,
        "paused": s.paused,
        "draining": s.draining,
        "verify_queue_depth": s.verify_queue_depth,
        "pending_payments": s.pending_payments,
        "ledger_seq": s.ledger_seq,
        "chains": s.chains.iter().map(|c| json!({
            "chain_id": c.chain_id,
            "head_block": c.head_block,
            "head_time": c.head_time,
            "base_fee_wei": c.base_fee_wei,
            "priority_fee_wei": c.priority_fee_wei,
            "updated_at_ms": c.updated_at_ms,
            "tokens": c.tokens.iter().map(|t| json!({
                "token": t.token,
                "pending_payments": t.pending_payments,
                "pending_value": t.pending_value,
                "batch_fixed_gas": t.batch_fixed_gas,
                "batch_gas_per_payment": t.batch_gas_per_payment,
                "direct_gas": t.direct_gas,
                "l1_fee_direct_wei": t.l1_fee_direct_wei,
                "l1_fee_batch_fixed_wei": t.l1_fee_batch_fixed_wei,
                "l1_fee_batch_per_payment_wei": t.l1_fee_batch_per_payment_wei,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "settlers": s.settlers.iter().map(|t| json!({
            "chain_id": t.chain_id,
            "address": t.address,
            "native_balance_wei": t.balance_known.then(|| t.native_balance_wei.clone()),
            "next_nonce": t.nonce_known.then_some(t.next_nonce),
            "pending_transactions": t.pending_transactions,
            "open_batch_id": (!t.open_batch_id.is_empty()).then(|| t.open_batch_id.clone()),
            "open_tx_hash": (!t.open_tx_hash.is_empty()).then(|| t.open_tx_hash.clone()),
        })).collect::<Vec<_>>(),
    })
}
