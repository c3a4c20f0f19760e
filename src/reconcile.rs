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
//!   (`used_outside`): the payment was not paid through this daemon, whatever its status;
//! - a mined batch's transaction in the range whose payments' fee shares do not add up
//!   to what its receipt says it cost (`gasUsed × effectiveGasPrice`, plus its `l1Fee` on
//!   an OP-stack chain) or whose gas shares
//!   do not add up to its gas used (`fee_share_mismatch`), or that no payment carries a
//!   share of (`fee_unattributed`: every item went back to the queue).
//!
//! A mismatch of a settled payment whose block is not final on chain yet is a reorg the
//! daemon is following (it corrects the evidence or reverses the settlement itself): it is
//! listed apart, as not final yet, and does not fail the run.
//!
//! Logs of authorizations the ledger does not know, in transactions not ours, are other
//! people's business and are not reported.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log};
use alloy::sol_types::SolEvent;

use crate::chain::{IEip3009, RpcEndpoint, RpcError};
use crate::config::Config;
use crate::ledger::{AuthKey, BatchRecord, BatchStatus, LedgerError, LedgerStore, PaymentRecord, Status};

/// Blocks per `eth_getLogs` call, within common node limits.
const LOG_CHUNK: u64 = 2_000;

/// Why reconciliation could not run (a discrepancy is not an error: it is the output).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("--from-block {from} is after --to-block {to}")]
    Range { from: u64, to: u64 },
    #[error("chain {chain_id}: no configured token on that chain")]
    NoToken { chain_id: u64 },
    #[error("chain {chain_id} has no [[chains]] rpc_url")]
    NoRpcUrl { chain_id: u64 },
    #[error("chain {chain_id}: rpc_url is not a valid URL")]
    BadRpcUrl { chain_id: u64 },
    #[error("cannot write the report")]
    Write(#[from] std::io::Error),
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
    /// Mined batches' transactions whose fee shares were checked against their receipts.
    pub fees_checked: usize,
    pub discrepancies: Vec<Discrepancy>,
    /// Mismatches of settled payments whose block is not final on chain yet: a reorg the
    /// daemon is following, and will correct (or reverse) itself. Not discrepancies; a
    /// later run after finality shows whether any remains.
    pub pending_corrections: Vec<Discrepancy>,
}

/// What one chain's reconciliation needs from the config: its RPC URLs and its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPlan {
    pub chain_id: u64,
    pub rpc_urls: Vec<String>,
    pub tokens: Vec<Address>,
    /// Transactions also pay an L1 data fee (see [`crate::config::ChainConfig::op_stack`]).
    pub op_stack: bool,
}

/// The chains to reconcile: every chain with a configured token, or only `only` (which
/// must have one), each with its RPC URL and tokens, in chain id order.
pub fn plan(config: &Config, only: Option<u64>) -> Result<Vec<ChainPlan>, ReconcileError> {
    let mut chains: Vec<u64> = config.tokens.iter().map(|t| t.chain_id).collect();
    chains.sort_unstable();
    chains.dedup();
    if let Some(chain_id) = only {
        if !chains.contains(&chain_id) {
            return Err(ReconcileError::NoToken { chain_id });
        }
        chains = vec![chain_id];
    }
    chains
        .into_iter()
        .map(|chain_id| {
            let rpc = config
                .chains
                .iter()
                .find(|c| c.chain_id == chain_id)
                .ok_or(ReconcileError::NoRpcUrl { chain_id })?;
            let tokens = config.tokens.iter().filter(|t| t.chain_id == chain_id).map(|t| t.address).collect();
            let rpc_urls = rpc.urls().into_iter().map(str::to_owned).collect();
            Ok(ChainPlan { chain_id, rpc_urls, tokens, op_stack: rpc.op_stack })
        })
        .collect()
}

/// Reconciles each chain of `config` (or only `only`) over blocks `from..=to`, writing
/// every discrepancy and a summary line per chain to `out`; `Ok(true)` when nothing differs.
pub async fn run(
    ledger: &dyn LedgerStore,
    config: &Config,
    from: u64,
    to: u64,
    only: Option<u64>,
    out: &mut impl Write,
) -> Result<bool, ReconcileError> {
    let mut clean = true;
    for chain in plan(config, only)? {
        let chain_id = chain.chain_id;
        let urls: Vec<&str> = chain.rpc_urls.iter().map(String::as_str).collect();
        let endpoint =
            RpcEndpoint::connect_all(chain_id, &urls).ok_or(ReconcileError::BadRpcUrl { chain_id })?;
        let report = reconcile(ledger, &endpoint, &chain.tokens, chain.op_stack, from, to).await?;
        for d in &report.discrepancies {
            writeln!(out, "chain {chain_id}: {d}")?;
        }
        for d in &report.pending_corrections {
            writeln!(out, "chain {chain_id}: not final yet, the daemon is following a reorg: {d}")?;
        }
        writeln!(
            out,
            "chain {chain_id}: blocks {from}..={to}: {} settled payments, {} AuthorizationUsed logs and {} transactions' fee shares checked, {} discrepancies, {} not final yet",
            report.settled_checked,
            report.logs_checked,
            report.fees_checked,
            report.discrepancies.len(),
            report.pending_corrections.len()
        )?;
        clean &= report.discrepancies.is_empty();
    }
    Ok(clean)
}

/// Checks one settled payment against the chain's logs and transfers of the range.
fn check_settled(
    r: &PaymentRecord,
    by_auth: &HashMap<(Address, Address, B256), &UsedLog>,
    transfers: &mut HashMap<B256, Vec<(Address, Address, Address, U256)>>,
    from: u64,
    to: u64,
    report: &mut Report,
) {
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
        return;
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

struct UsedLog {
    token: Address,
    authorizer: Address,
    nonce: B256,
    tx: B256,
    block_number: u64,
    block_hash: B256,
}

/// Reconciles `tokens` on `endpoint`'s chain (an OP-stack one if `op_stack`) over blocks
/// `from..=to`.
pub async fn reconcile(
    ledger: &dyn LedgerStore,
    endpoint: &RpcEndpoint,
    tokens: &[Address],
    op_stack: bool,
    from: u64,
    to: u64,
) -> Result<Report, ReconcileError> {
    if from > to {
        return Err(ReconcileError::Range { from, to });
    }
    let chain_id = endpoint.chain_id;
    let (used, mut transfers) = chain_logs(endpoint, tokens, from, to).await?;

    // The ledger's side: settled payments in range, and our settlement transactions.
    let token_set: HashSet<Address> = tokens.iter().copied().collect();
    let settled: Vec<_> =
        crate::ledger::books(ledger.settlement_log(0, usize::MAX)?.into_iter().map(|(_, r)| r))
            .into_iter()
            .filter(|r| r.signed.chain_id == chain_id && token_set.contains(&r.signed.token))
            .filter(|r| r.status == Status::Settled && (from..=to).contains(&r.block_number))
            .collect();
    let mut ours: HashSet<B256> = settled.iter().filter_map(|r| r.tx_hash).collect();
    let batches = ledger.batches(chain_id)?;
    for b in &batches {
        ours.extend(b.attempts.iter().map(|a| a.tx_hash));
        ours.extend(b.inclusion.map(|i| i.tx_hash));
    }

    let mut report = Report { settled_checked: settled.len(), logs_checked: used.len(), ..Report::default() };

    check_fees(ledger, endpoint, op_stack, &batches, &token_set, (from, to), &mut report).await?;
    let by_auth: HashMap<(Address, Address, B256), &UsedLog> =
        used.iter().map(|u| ((u.token, u.authorizer, u.nonce), u)).collect();
    // Settled payments the daemon still watches (their block not final): a mismatch of
    // their evidence is a reorg it is following.
    let watched: HashSet<_> = ledger.watched()?.iter().map(PaymentRecord::key).collect();
    let mut found = Vec::new();
    for r in &settled {
        let before = report.discrepancies.len();
        check_settled(r, &by_auth, &mut transfers, from, to, &mut report);
        if watched.contains(&r.key()) {
            // Where its log is (or is not) a reorg can change; its amount and parties, never.
            let (moved, real): (Vec<_>, Vec<_>) = report
                .discrepancies
                .drain(before..)
                .partition(|d| matches!(d.kind, "missing_log" | "evidence_mismatch"));
            found.extend(moved);
            report.discrepancies.extend(real);
        }
    }
    report.pending_corrections = found;

    check_used(ledger, chain_id, &used, &ours, &mut report)?;
    Ok(report)
}

/// Transfers per transaction: (token, from, to, value), each matched at most once.
type Transfers = HashMap<B256, Vec<(Address, Address, Address, U256)>>;

/// The chain's side over blocks `from..=to`: every `AuthorizationUsed` of `tokens`, and their
/// transfers by transaction.
async fn chain_logs(
    endpoint: &RpcEndpoint,
    tokens: &[Address],
    from: u64,
    to: u64,
) -> Result<(Vec<UsedLog>, Transfers), ReconcileError> {
    let mut used = Vec::new();
    // Transfers per transaction: (token, from, to, value), each matched at most once.
    let mut transfers = Transfers::new();
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
    Ok((used, transfers))
}

/// Fee shares: the payments a mined batch settled (or failed) share its fee; each carries
/// its share from the moment its transaction is known to be mined. Every batch of `tokens`
/// mined in `range` is checked against its receipt.
async fn check_fees(
    ledger: &dyn LedgerStore,
    endpoint: &RpcEndpoint,
    op_stack: bool,
    batches: &[BatchRecord],
    token_set: &HashSet<Address>,
    (from, to): (u64, u64),
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let chain_id = endpoint.chain_id;
    let mut shares: HashMap<B256, (U256, u64)> = HashMap::new();
    for r in ledger.records()?.iter().filter(|r| r.signed.chain_id == chain_id) {
        if let Some(tx) = r.tx_hash {
            let s = shares.entry(tx).or_default();
            s.0 += r.fee_share_wei;
            s.1 += r.gas_share;
        }
    }
    let mined = |b: &&BatchRecord| matches!(b.status, BatchStatus::Included | BatchStatus::Done);
    for b in batches.iter().filter(mined).filter(|b| token_set.contains(&b.token)) {
        let Some(inc) = b.inclusion.filter(|i| (from..=to).contains(&i.block_number)) else { continue };
        let receipt = crate::chain::receipt_with_l1_fee(endpoint, inc.tx_hash, op_stack).await?;
        let Some((receipt, l1_fee)) = receipt else { continue }; // reorged away: missing_log says so
        let fee = U256::from(receipt.gas_used) * U256::from(receipt.effective_gas_price) + U256::from(l1_fee);
        let (fee_shares, gas_shares) = shares.get(&inc.tx_hash).copied().unwrap_or_default();
        report.fees_checked += 1;
        if !shares.contains_key(&inc.tx_hash) {
            report.discrepancies.push(Discrepancy {
                kind: "fee_unattributed",
                payment_id: None,
                tx_hash: Some(inc.tx_hash),
                detail: format!(
                    "batch {}: no payment carries a share of its fee ({fee} wei): every item went back to the queue (a gas limit too low?)",
                    b.id()
                ),
            });
        } else if fee_shares != fee || gas_shares != receipt.gas_used {
            report.discrepancies.push(Discrepancy {
                kind: "fee_share_mismatch",
                payment_id: None,
                tx_hash: Some(inc.tx_hash),
                detail: format!(
                    "batch {}: its payments' shares sum to {fee_shares} wei and {gas_shares} gas; its receipt says {fee} wei ({} gas at {} wei, L1 fee {l1_fee} wei)",
                    b.id(),
                    receipt.gas_used,
                    receipt.effective_gas_price
                ),
            });
        }
    }
    Ok(())
}

/// Every authorization used on chain against the ledger: one our transactions used must be
/// settled (or on its way) in the ledger; one used by others is reported with what the
/// ledger shows.
fn check_used(
    ledger: &dyn LedgerStore,
    chain_id: u64,
    used: &[UsedLog],
    ours: &HashSet<B256>,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    for log in used {
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
    Ok(())
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
        let page = endpoint.provider.get_logs(&filter).await.map_err(|e| endpoint.error("eth_getLogs", e))?;
        out.extend(page.into_iter().filter(|l| !l.removed));
        if end == u64::MAX {
            break;
        }
        start = end + 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    const TWO_CHAINS: &str = r#"
        [[tokens]]
        chain_id = 8453
        address = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
        eip712_name = "USD Coin"
        eip712_version = "2"
        decimals = 6
        symbol = "USDC"
        [[tokens]]
        chain_id = 84532
        address = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
        eip712_name = "USDC"
        eip712_version = "2"
        decimals = 6
        symbol = "USDC"
        [[chains]]
        chain_id = 84532
        rpc_url = "http://127.0.0.1:8545"
        [[chains]]
        chain_id = 8453
        rpc_url = "http://127.0.0.1:8546"
    "#;

    #[test]
    fn every_chain_with_a_token_is_reconciled_in_order_or_only_the_one_asked_for() {
        let c = config(TWO_CHAINS);
        let all = plan(&c, None).unwrap();
        assert_eq!(all.iter().map(|p| p.chain_id).collect::<Vec<_>>(), [8453, 84532]);
        assert_eq!(all[0].rpc_urls, vec!["http://127.0.0.1:8546".to_owned()]);
        assert_eq!(all[0].tokens, [c.tokens[0].address]);
        let one = plan(&c, Some(84532)).unwrap();
        assert_eq!((one.len(), one[0].chain_id), (1, 84532));
    }

    #[test]
    fn a_chain_without_a_token_or_an_rpc_url_is_named() {
        let c = config(TWO_CHAINS);
        assert!(matches!(plan(&c, Some(1)), Err(ReconcileError::NoToken { chain_id: 1 })));
        let mut no_rpc = c.clone();
        no_rpc.chains.retain(|ch| ch.chain_id != 8453);
        assert!(matches!(plan(&no_rpc, None), Err(ReconcileError::NoRpcUrl { chain_id: 8453 })));
    }
}
