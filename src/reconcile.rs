//! Reconciliation: the settlement log proved against the chain for a block range.
//!
//! Reads the configured tokens' `AuthorizationUsed` and `Transfer` logs in blocks
//! `from..=to` and the ledger (read-only), and reports every difference:
//!
//! - a payment the ledger says settled in the range without its `AuthorizationUsed` log
//!   (`missing_log`), with the log in another transaction or block than recorded
//!   (`evidence_mismatch`), or without a `Transfer` of its amount from its payer to its
//!   payee in that transaction (`transfer_mismatch`);
//! - an `AuthorizationUsed` log in one of our settlement transactions (a transaction of a
//!   recorded batch, or the evidence of a settled payment) whose payment the ledger does
//!   not hold (`unknown_payment`) or does not show settled by it (`not_settled_in_ledger`);
//! - an authorization the ledger holds that was used by someone else's transaction
//!   (`used_outside`): the payment was not paid through this daemon, whatever its status.
//!
//! Logs of authorizations the ledger does not know, in transactions not ours, are other
//! people's business and are not reported.

use std::collections::{HashMap, HashSet};

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log};
use alloy::sol_types::SolEvent;

use crate::chain::{IEip3009, RpcEndpoint};
use crate::ledger::{AuthKey, LedgerError, LedgerStore, Status};

/// Blocks per `eth_getLogs` call, within common node limits.
const LOG_CHUNK: u64 = 2_000;

/// Why reconciliation could not run (a discrepancy is not an error: it is the output).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("chain {chain_id}: eth_getLogs failed: {detail}")]
    Rpc { chain_id: u64, detail: String },
    #[error("--from-block {from} is after --to-block {to}")]
    Range { from: u64, to: u64 },
}

/// One difference between the ledger and the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discrepancy {
    pub kind: &'static str,
    pub payment_id: Option<String>,
    pub tx_hash: Option<B256>,
    pub detail: String,
}

impl std::fmt::Display for Discrepancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(id) = &self.payment_id {
            write!(f, " payment {id}")?;
        }
        if let Some(tx) = &self.tx_hash {
            write!(f, " tx {tx}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// What a run checked and found.
#[derive(Debug, Default)]
pub struct Report {
    pub settled_checked: usize,
    pub logs_checked: usize,
    pub discrepancies: Vec<Discrepancy>,
}

struct UsedLog {
    token: Address,
    authorizer: Address,
    nonce: B256,
    tx: B256,
    block_number: u64,
    block_hash: B256,
}

/// Reconciles `tokens` on `endpoint`'s chain over blocks `from..=to`.
pub async fn reconcile(
    ledger: &dyn LedgerStore,
    endpoint: &RpcEndpoint,
    tokens: &[Address],
    from: u64,
    to: u64,
) -> Result<Report, ReconcileError> {
    if from > to {
        return Err(ReconcileError::Range { from, to });
    }
    let chain_id = endpoint.chain_id;
    let mut used = Vec::new();
    // Transfers per transaction: (token, from, to, value), each matched at most once.
    let mut transfers: HashMap<B256, Vec<(Address, Address, Address, U256)>> = HashMap::new();
    for (event, topic) in [
        ("AuthorizationUsed", IEip3009::AuthorizationUsed::SIGNATURE_HASH),
        ("Transfer", IEip3009::Transfer::SIGNATURE_HASH),
    ] {
        for log in logs(endpoint, tokens, topic, from, to).await? {
            let (Some(tx), Some(block_number), Some(block_hash)) =
                (log.transaction_hash, log.block_number, log.block_hash)
            else {
                continue;
            };
            let token = log.address();
            if event == "AuthorizationUsed" {
                if let Ok(ev) = IEip3009::AuthorizationUsed::decode_log(&log.inner) {
                    used.push(UsedLog {
                        token,
                        authorizer: ev.authorizer,
                        nonce: ev.nonce,
                        tx,
                        block_number,
                        block_hash,
                    });
                }
            } else if let Ok(ev) = IEip3009::Transfer::decode_log(&log.inner) {
                transfers.entry(tx).or_default().push((token, ev.from, ev.to, ev.value));
            }
        }
    }

    // The ledger's side: settled payments in range, and our settlement transactions.
    let token_set: HashSet<Address> = tokens.iter().copied().collect();
    let settled: Vec<_> = ledger
        .settlement_log(0, usize::MAX)?
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.signed.chain_id == chain_id && token_set.contains(&r.signed.token))
        .filter(|r| r.status == Status::Settled && (from..=to).contains(&r.block_number))
        .collect();
    let mut ours: HashSet<B256> = settled.iter().filter_map(|r| r.tx_hash).collect();
    for b in ledger.batches(chain_id)? {
        ours.extend(b.attempts.iter().map(|a| a.tx_hash));
        ours.extend(b.inclusion.map(|i| i.tx_hash));
    }

    let mut report = Report { settled_checked: settled.len(), logs_checked: used.len(), ..Report::default() };
    let by_auth: HashMap<(Address, Address, B256), &UsedLog> =
        used.iter().map(|u| ((u.token, u.authorizer, u.nonce), u)).collect();
    for r in &settled {
        let a = &r.signed.authorization;
        let id = Some(r.payment_id().to_string());
        let Some(log) = by_auth.get(&(r.signed.token, a.from, a.nonce)) else {
            report.discrepancies.push(Discrepancy {
                kind: "missing_log",
                payment_id: id,
                tx_hash: r.tx_hash,
                detail: format!(
                    "settled in the ledger (block {}) but no AuthorizationUsed log in blocks {from}..={to}",
                    r.block_number
                ),
            });
            continue;
        };
        if Some(log.tx) != r.tx_hash || Some(log.block_hash) != r.block_hash {
            report.discrepancies.push(Discrepancy {
                kind: "evidence_mismatch",
                payment_id: id.clone(),
                tx_hash: Some(log.tx),
                detail: format!(
                    "the chain used it in tx {} block {}; the ledger records tx {} block {}",
                    log.tx,
                    log.block_number,
                    r.tx_hash.map(|h| h.to_string()).unwrap_or_default(),
                    r.block_number
                ),
            });
        }
        let in_tx = transfers.entry(log.tx).or_default();
        let wanted = (r.signed.token, a.from, a.to, a.value);
        match in_tx.iter().position(|t| *t == wanted) {
            Some(i) => {
                in_tx.swap_remove(i);
            }
            None => report.discrepancies.push(Discrepancy {
                kind: "transfer_mismatch",
                payment_id: id,
                tx_hash: Some(log.tx),
                detail: format!(
                    "no Transfer of {} from {} to {} in that transaction (the ledger's amount or parties differ from the chain's)",
                    a.value, a.from, a.to
                ),
            }),
        }
    }

    for log in &used {
        let key = AuthKey::new(chain_id, log.token, log.authorizer, log.nonce);
        let record = ledger.get(&key)?;
        let mine = ours.contains(&log.tx);
        match (mine, record) {
            (true, None) => report.discrepancies.push(Discrepancy {
                kind: "unknown_payment",
                payment_id: Some(key.payment_id().to_string()),
                tx_hash: Some(log.tx),
                detail: format!(
                    "our settlement transaction used authorization {} of {} that the ledger does not hold",
                    log.nonce, log.authorizer
                ),
            }),
            (true, Some(r)) => {
                let settled_here = r.status == Status::Settled && r.tx_hash == Some(log.tx);
                // Still on its way (included, not yet deep enough) is not a discrepancy.
                let in_flight = r.status == Status::Included;
                if !settled_here && !in_flight {
                    report.discrepancies.push(Discrepancy {
                        kind: "not_settled_in_ledger",
                        payment_id: Some(r.payment_id().to_string()),
                        tx_hash: Some(log.tx),
                        detail: format!(
                            "our settlement transaction used it, but the ledger shows it {:?}{}",
                            r.status,
                            r.tx_hash.map(|h| format!(" by tx {h}")).unwrap_or_default()
                        ),
                    });
                }
            }
            (false, Some(r)) => report.discrepancies.push(Discrepancy {
                kind: "used_outside",
                payment_id: Some(r.payment_id().to_string()),
                tx_hash: Some(log.tx),
                detail: format!(
                    "its authorization was used by a transaction not ours (block {}); the ledger shows it {:?}{}",
                    log.block_number,
                    r.status,
                    if r.failure_reason.is_empty() { String::new() } else { format!(" ({})", r.failure_reason) }
                ),
            }),
            (false, None) => {}
        }
    }
    Ok(report)
}

async fn logs(
    endpoint: &RpcEndpoint,
    tokens: &[Address],
    topic: B256,
    from: u64,
    to: u64,
) -> Result<Vec<Log>, ReconcileError> {
    let mut out = Vec::new();
    let mut start = from;
    while start <= to {
        let end = start.saturating_add(LOG_CHUNK - 1).min(to);
        let filter =
            Filter::new().address(tokens.to_vec()).event_signature(topic).from_block(start).to_block(end);
        let page = endpoint.provider.get_logs(&filter).await.map_err(|e| ReconcileError::Rpc {
            chain_id: endpoint.chain_id,
            detail: endpoint.redact(&e.to_string()),
        })?;
        out.extend(page.into_iter().filter(|l| !l.removed));
        if end == u64::MAX {
            break;
        }
        start = end + 1;
    }
    Ok(out)
}
