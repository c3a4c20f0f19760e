//! The tokens payments may be made in, the chains' RPC endpoints, and the token table
//! admission reads.

use std::collections::HashMap;

use alloy::primitives::Address;
use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::x402::eip712::TokenDomain;

/// One token on one chain, with the EIP-712 domain its signatures use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub chain_id: u64,
    pub address: Address,
    /// EIP-712 domain `name` ("USD Coin" for USDC on Base; "USDC" on Base Sepolia).
    pub eip712_name: String,
    /// EIP-712 domain `version` ("2" for USDC).
    pub eip712_version: String,
    /// Decimals of the token, for display and export only; amounts stay in base units.
    pub decimals: u8,
    #[serde(default)]
    pub symbol: String,
    /// How the token checks a payer's signature. `true` (the default; FiatToken V2.2 and
    /// later: USDC): by ECDSA for a payer without code, by ERC-1271 for a payer with code,
    /// and it has the `bytes` overload of `transferWithAuthorization` for signatures other
    /// than 65 bytes: smart wallets and EIP-7702 accounts are judged on chain. `false`
    /// (FiatToken V2.1 and other ECDSA-only tokens): every payer by ECDSA whatever its code,
    /// and a signature that is not 65 bytes is refused.
    #[serde(default = "yes")]
    pub contract_signatures: bool,
}

fn yes() -> bool {
    true
}

/// One chain's RPC endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub chain_id: u64,
    /// HTTP(S) JSON-RPC URL. May embed an API key: errors that quote it are redacted
    /// before they are logged or sent to clients (`chain::RpcEndpoint::redact`). Either this
    /// or `rpc_urls`.
    #[serde(default)]
    pub rpc_url: String,
    /// Several providers' HTTP(S) URLs for the chain, instead of `rpc_url`: reads go to the
    /// best one that answers and is not behind the others' head, signed transactions to all
    /// (`chain::Pool`; RUNBOOK "When the RPC node fails").
    #[serde(default)]
    pub rpc_urls: Vec<String>,
    /// An OP-stack chain (Base, Optimism, ...): each transaction also pays an L1 data fee,
    /// read from the `GasPriceOracle` predeploy, and the planner counts it in the cost of
    /// a batch.
    #[serde(default)]
    pub op_stack: bool,
    /// When a settled payment's block is final: `"finalized"` (the default: the chain's own
    /// finality, the `finalized` block tag of Ethereum and OP-stack chains), `"safe"`, or a
    /// number of blocks (the block and that many minus one on top). Until then a settled
    /// payment is watched, and a reorg corrects or reverses it.
    #[serde(default)]
    pub finality: Finality,
    /// ERC-6492 wallet factories trusted on this chain (empty by default): a payer whose
    /// wallet is not deployed yet may pay with a 6492-wrapped signature naming one of these;
    /// its settlement batch calls the factory first (same transaction). Only factories whose
    /// deployment call is bounded and harmless belong here (e.g. Coinbase Smart Wallet's).
    #[serde(default)]
    pub erc6492_factories: Vec<Address>,
    /// Opt-in, OP-stack chains with flashblocks (Base: one every 200 ms): `rpc_url` is a
    /// flashblocks-aware endpoint, serving a transaction's receipt as soon as the
    /// sequencer preconfirms it, and this is its flashblock interval (milliseconds). A
    /// payment then counts as `included` at its preconfirmation, before its block is
    /// sealed: the sequencer's promise, not yet the chain's (RUNBOOK: "Preconfirmations").
    /// Without it, a receipt from a block the endpoint does not serve yet is not counted.
    #[serde(default)]
    pub preconfirmation_ms: Option<u64>,
    /// The same node's WebSocket URL (`ws://` or `wss://`), optional: the settlement engine
    /// subscribes to its new heads and is woken by each the moment the node has it,
    /// instead of polling for it (the polling returns while the subscription is down). May
    /// embed an API key: never logged.
    #[serde(default)]
    pub ws_url: Option<String>,
}

impl ChainConfig {
    /// `rpc_url` or `rpc_urls`, not both, each an http(s) URL (this is `chains[i]`).
    pub(super) fn validate_urls(&self, i: usize) -> Result<(), ConfigError> {
        let field = |f: &str| format!("chains[{i}].{f}");
        match (self.rpc_url.is_empty(), self.rpc_urls.is_empty()) {
            (true, true) => return Err(invalid(field("rpc_url"), "is required (or rpc_urls)")),
            (false, false) => {
                return Err(invalid(field("rpc_urls"), "replaces rpc_url: give one or the other"));
            }
            _ => {}
        }
        let name = if self.rpc_urls.is_empty() { "rpc_url" } else { "rpc_urls" };
        if self.urls().into_iter().any(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            return Err(invalid(field(name), "must be an http:// or https:// URL"));
        }
        Ok(())
    }

    /// The chain's RPC URLs: `rpc_url`, or `rpc_urls`.
    pub fn urls(&self) -> Vec<&str> {
        if self.rpc_urls.is_empty() {
            vec![self.rpc_url.as_str()]
        } else {
            self.rpc_urls.iter().map(String::as_str).collect()
        }
    }
}

/// See [`ChainConfig::finality`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Finality {
    Tag(FinalityTag),
    Depth(u64),
}

impl Default for Finality {
    fn default() -> Self {
        Finality::Tag(FinalityTag::Finalized)
    }
}

/// The block tags a chain's finality can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalityTag {
    Finalized,
    Safe,
}

/// A configured token, ready for verification.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub domain: TokenDomain,
    pub decimals: u8,
    pub symbol: String,
    /// See [`TokenConfig::contract_signatures`].
    pub contract_signatures: bool,
}

/// Lookup of configured tokens by `(chain id, address)`.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    by_key: HashMap<(u64, Address), TokenEntry>,
}

impl TokenTable {
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let by_key = tokens
            .iter()
            .map(|t| {
                let entry = TokenEntry {
                    domain: TokenDomain::new(&t.eip712_name, &t.eip712_version, t.chain_id, t.address),
                    decimals: t.decimals,
                    symbol: t.symbol.clone(),
                    contract_signatures: t.contract_signatures,
                };
                ((t.chain_id, t.address), entry)
            })
            .collect();
        Self { by_key }
    }

    pub fn get(&self, chain_id: u64, token: Address) -> Option<&TokenEntry> {
        self.by_key.get(&(chain_id, token))
    }

    pub fn iter(&self) -> impl Iterator<Item = &TokenEntry> {
        self.by_key.values()
    }
}
