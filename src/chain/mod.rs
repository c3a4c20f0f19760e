//! The on-chain side the daemon depends on: the EIP-3009 token and Multicall3 interfaces,
//! the encoding of a settlement batch, and reading each item's outcome from a receipt.
//!
//! A batch is one `aggregate3` call with `allowFailure = true` for every item, so one bad
//! authorization cannot sink the others. The transaction's success therefore says nothing
//! about a single item: each is judged by its own `AuthorizationUsed` log.

use alloy::primitives::{Address, B256, Bytes, address};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionReceipt;
use alloy::sol_types::{SolCall, SolEvent};
use alloy::transports::http::reqwest::Url as ReqwestUrl;

use crate::x402::SignedAuthorization;
use crate::x402::eip712::TokenDomain;

/// Multicall3's address, the same on every chain.
pub const MULTICALL3: Address = address!("0xcA11bde05977b3631167028862bE2a173976CA11");

/// The OP-stack `GasPriceOracle` predeploy: the L1 data fee of a transaction's bytes.
pub const GAS_PRICE_ORACLE: Address = address!("0x420000000000000000000000000000000000000F");

/// Ethereum's per-transaction gas cap since Osaka (EIP-7825).
pub const TX_GAS_CAP: u64 = 1 << 24;

mod pool;

pub use pool::Pool;

/// The generated bindings; a module of their own because the generated
/// `transferWithAuthorization` builder has the token's ten arguments.
#[allow(clippy::too_many_arguments)]
mod bindings {
    use alloy::sol;

    sol! {
        /// The part of an EIP-3009 token (USDC's FiatTokenV2_2 or the devnet's TestUSDC) the
        /// daemon calls.
        #[sol(rpc)]
        interface IEip3009 {
            event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
            event Transfer(address indexed from, address indexed to, uint256 value);

            function balanceOf(address account) external view returns (uint256);
            function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
            function DOMAIN_SEPARATOR() external view returns (bytes32);

            /// The (v, r, s) overload: present on every FiatToken version since V2, and 64 bytes
            /// of calldata cheaper than the `bytes signature` one.
            function transferWithAuthorization(
                address from,
                address to,
                uint256 value,
                uint256 validAfter,
                uint256 validBefore,
                bytes32 nonce,
                uint8 v,
                bytes32 r,
                bytes32 s
            ) external;
        }

        /// The token's `bytes signature` overload of `transferWithAuthorization` (FiatToken
        /// V2.2, selector 0xcf092995): any signature the payer's ERC-1271 check understands.
        /// An interface of its own so the `v, r, s` one keeps its plain binding name.
        interface IEip3009Bytes {
            function transferWithAuthorization(
                address from,
                address to,
                uint256 value,
                uint256 validAfter,
                uint256 validBefore,
                bytes32 nonce,
                bytes signature
            ) external;
        }

        /// Multicall3's `aggregate3`.
        #[sol(rpc)]
        interface IMulticall3 {
            struct Call3 {
                address target;
                bool allowFailure;
                bytes callData;
            }

            struct Result {
                bool success;
                bytes returnData;
            }

            function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData);
        }

        /// The OP-stack `GasPriceOracle` predeploy's fee of a transaction's bytes.
        #[sol(rpc)]
        interface IGasPriceOracle {
            function getL1Fee(bytes calldata data) external view returns (uint256);
        }
    }
}
pub use bindings::{IEip3009, IEip3009Bytes, IGasPriceOracle, IMulticall3};

/// An RPC call to a chain that failed: which chain, which call, and the node's or the
/// transport's words (redacted: node URLs carry keys). The one RPC error every module that
/// talks to a chain reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chain {chain_id}: RPC {call} failed: {detail}")]
pub struct RpcError {
    pub chain_id: u64,
    pub call: &'static str,
    pub detail: String,
}

/// Why a chain interaction failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("RPC call {call} failed")]
    Rpc {
        call: &'static str,
        #[source]
        source: alloy::contract::Error,
    },
    #[error(
        "token {token} on chain {chain_id}: on-chain DOMAIN_SEPARATOR {on_chain} differs from the one configured \
         (name {name:?}, version {version:?}) {configured}; check the token table"
    )]
    DomainMismatch {
        chain_id: u64,
        token: Address,
        name: String,
        version: String,
        on_chain: B256,
        configured: B256,
    },
}

/// Longest an RPC call may take, connection included.
pub const RPC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest a connection to the node may take to open.
pub const RPC_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// One chain's RPC connection, and how to speak of it without its secret: node URLs often
/// carry an API key (in the path, the query or the user info), and transport errors quote
/// the URL. Every error text that leaves the process goes through [`RpcEndpoint::redact`].
#[derive(Clone)]
pub struct RpcEndpoint {
    pub chain_id: u64,
    pub provider: DynProvider,
    secrets: Vec<String>,
}

impl std::fmt::Debug for RpcEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcEndpoint").field("chain_id", &self.chain_id).finish_non_exhaustive()
    }
}

impl RpcEndpoint {
    /// An HTTP(S) endpoint; `None` if `url` does not parse.
    pub fn connect_http(chain_id: u64, url: &str) -> Option<RpcEndpoint> {
        Self::connect_all(chain_id, &[url])
    }

    /// The chain's HTTP(S) endpoints as one: with several, a [`Pool`] (reads to the best,
    /// signed transactions to all; its probe runs on the current Tokio runtime). `None` if
    /// there is none or one does not parse.
    pub fn connect_all(chain_id: u64, urls: &[&str]) -> Option<RpcEndpoint> {
        let parsed: Vec<ReqwestUrl> = urls.iter().map(|u| u.parse().ok()).collect::<Option<_>>()?;
        let mut secrets = Vec::new();
        for url in urls {
            secrets.extend(url_secrets(url)?);
        }
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        // A node that accepts and never answers must not hang a submission or a settlement
        // round: every call ends within RPC_TIMEOUT, as an error.
        let client = alloy::transports::http::reqwest::Client::builder()
            .timeout(RPC_TIMEOUT)
            .connect_timeout(RPC_CONNECT_TIMEOUT)
            .build()
            .ok()?;
        let provider = match parsed.as_slice() {
            [] => return None,
            [one] => ProviderBuilder::new().connect_reqwest(client, one.clone()).erased(),
            many => {
                let pool = Pool::new(chain_id, many, &client);
                ProviderBuilder::new()
                    .connect_client(alloy::rpc::client::RpcClient::new(pool, false))
                    .erased()
            }
        };
        Some(RpcEndpoint { chain_id, provider, secrets })
    }

    /// An endpoint over an existing provider, with no URL to redact (tests: alloy's mock
    /// transport).
    pub fn from_provider(chain_id: u64, provider: DynProvider) -> RpcEndpoint {
        RpcEndpoint { chain_id, provider, secrets: Vec::new() }
    }

    /// `call` failed with `e`, redacted.
    pub fn error(&self, call: &'static str, e: impl std::fmt::Display) -> RpcError {
        RpcError { chain_id: self.chain_id, call, detail: self.redact(&e.to_string()) }
    }

    /// `text` with the endpoint's URL and its secret-bearing parts replaced.
    pub fn redact(&self, text: &str) -> String {
        redact(&self.secrets, text)
    }
}

/// The parts of a node URL that may carry a secret (the URL itself, its path, query and
/// password), longest first; `None` if it does not parse.
pub fn url_secrets(url: &str) -> Option<Vec<String>> {
    let parsed: ReqwestUrl = url.parse().ok()?;
    let mut secrets = vec![url.to_owned(), parsed.as_str().to_owned()];
    if parsed.path().len() > 1 {
        secrets.push(parsed.path().to_owned());
    }
    secrets.extend(parsed.query().map(str::to_owned));
    secrets.extend(parsed.password().map(str::to_owned));
    // Longest first, so a URL is replaced whole before its parts are.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    Some(secrets)
}

/// `text` with every one of `secrets` replaced.
pub fn redact(secrets: &[String], text: &str) -> String {
    secrets.iter().fold(text.to_owned(), |t, s| t.replace(s.as_str(), "<rpc url redacted>"))
}

/// A mined (or pending) transaction's receipt, with the L1 data fee it paid besides gas:
/// OP-stack receipts carry it as `l1Fee`, read only when `op_stack` (0 otherwise). `None`:
/// the node knows no receipt.
pub async fn receipt_with_l1_fee(
    endpoint: &RpcEndpoint,
    tx: B256,
    op_stack: bool,
) -> Result<Option<(TransactionReceipt, u128)>, RpcError> {
    const CALL: &str = "eth_getTransactionReceipt";
    if !op_stack {
        let receipt =
            endpoint.provider.get_transaction_receipt(tx).await.map_err(|e| endpoint.error(CALL, e))?;
        return Ok(receipt.map(|r| (r, 0)));
    }
    let raw: Option<serde_json::Value> =
        endpoint.provider.raw_request(CALL.into(), (tx,)).await.map_err(|e| endpoint.error(CALL, e))?;
    let Some(raw) = raw else { return Ok(None) };
    let l1_fee = match raw.get("l1Fee") {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => v
            .as_str()
            .and_then(|s| u128::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| endpoint.error(CALL, format!("the receipt's l1Fee {v} is not a hex quantity")))?,
    };
    let receipt = serde_json::from_value(raw).map_err(|e| endpoint.error(CALL, e))?;
    Ok(Some((receipt, l1_fee)))
}

/// The `transferWithAuthorization` calldata that settles one authorization: the `v, r, s`
/// overload for a 65-byte signature (a key's; the token still asks an EIP-7702 account's
/// code by ERC-1271), the `bytes` overload for any other (a contract wallet's; an ERC-6492
/// wrapper is unwrapped: its wallet is deployed by the call before it in the batch).
pub fn transfer_calldata(s: &SignedAuthorization) -> Bytes {
    let a = &s.authorization;
    let Some(sig) = s.signature.ecdsa() else {
        return IEip3009Bytes::transferWithAuthorizationCall {
            from: a.from,
            to: a.to,
            value: a.value,
            validAfter: a.valid_after,
            validBefore: a.valid_before,
            nonce: a.nonce,
            signature: s.signature.for_token(),
        }
        .abi_encode()
        .into();
    };
    IEip3009::transferWithAuthorizationCall {
        from: a.from,
        to: a.to,
        value: a.value,
        validAfter: a.valid_after,
        validBefore: a.valid_before,
        nonce: a.nonce,
        v: sig[64],
        r: B256::from_slice(&sig[..32]),
        s: B256::from_slice(&sig[32..64]),
    }
    .abi_encode()
    .into()
}

/// Where a settlement of `items` (one token's) is sent and its calldata: one item is the
/// token's own `transferWithAuthorization`, sent to the token (cheaper than through
/// Multicall3, same `AuthorizationUsed` evidence); more, or one that deploys its wallet
/// first, are one `aggregate3`.
pub fn settlement_call(items: &[SignedAuthorization]) -> (Address, Bytes) {
    match items {
        [one] if deployment(one).is_none() => (one.token, transfer_calldata(one)),
        _ => (MULTICALL3, aggregate3_calldata(items)),
    }
}

/// The call that deploys an ERC-6492 payer's wallet, run before its transfer in the same
/// batch. The ledger holds a 6492 wrapper only for a wallet that was not deployed when it
/// was accepted, from a factory on the chain's allow-list (ingest unwraps the others).
pub fn deployment(item: &SignedAuthorization) -> Option<IMulticall3::Call3> {
    let w = item.signature.erc6492()?.ok()?;
    // Allowed to fail: the wallet may have been deployed meanwhile (by anyone); the transfer
    // after it is judged on its own.
    Some(IMulticall3::Call3 { target: w.factory, allowFailure: true, callData: w.factory_calldata })
}

/// How many wallets a settlement of `items` deploys.
pub fn deployments(items: &[SignedAuthorization]) -> usize {
    items.iter().filter(|i| deployment(i).is_some()).count()
}

/// The `aggregate3` calldata of a batch of `items`.
pub fn aggregate3_calldata(items: &[SignedAuthorization]) -> Bytes {
    IMulticall3::aggregate3Call { calls: batch_calls(items) }.abi_encode().into()
}

/// The `aggregate3` calls of a batch, each allowed to fail on its own: per item, its
/// wallet's deployment if it has one ([`deployment`]), then its transfer.
pub fn batch_calls(items: &[SignedAuthorization]) -> Vec<IMulticall3::Call3> {
    let mut calls = Vec::with_capacity(items.len() + deployments(items));
    for s in items {
        calls.extend(deployment(s));
        calls.push(IMulticall3::Call3 {
            target: s.token,
            allowFailure: true,
            callData: transfer_calldata(s),
        });
    }
    calls
}

/// Where each item's transfer is among [`batch_calls`]`(items)`.
pub fn transfer_positions(items: &[SignedAuthorization]) -> Vec<usize> {
    let mut at = 0;
    items
        .iter()
        .map(|s| {
            at += usize::from(deployment(s).is_some());
            let here = at;
            at += 1;
            here
        })
        .collect()
}

/// The `(authorizer, nonce)` pairs of every `AuthorizationUsed` log `token` emitted in a
/// receipt: the evidence that those authorizations settled.
pub fn authorizations_used(receipt: &TransactionReceipt, token: Address) -> Vec<(Address, B256)> {
    authorization_logs(receipt, token).into_iter().map(|(from, nonce, _)| (from, nonce)).collect()
}

/// [`authorizations_used`] with each log's index in its block.
pub fn authorization_logs(receipt: &TransactionReceipt, token: Address) -> Vec<(Address, B256, u64)> {
    receipt
        .logs()
        .iter()
        .filter(|log| log.address() == token)
        .filter_map(|log| {
            let ev = IEip3009::AuthorizationUsed::decode_log(&log.inner).ok()?;
            Some((ev.authorizer, ev.nonce, log.log_index.unwrap_or_default()))
        })
        .collect()
}

/// Compares a token's on-chain `DOMAIN_SEPARATOR()` with the configured domain. Signatures
/// are checked offline against the configured one, so a mismatch would refuse every valid
/// payment (or accept ones the token refuses): the daemon must not start.
pub async fn check_domain<P: Provider>(provider: &P, domain: &TokenDomain) -> Result<(), ChainError> {
    let token = IEip3009::new(domain.verifying_contract, provider);
    let on_chain = token
        .DOMAIN_SEPARATOR()
        .call()
        .await
        .map_err(|source| ChainError::Rpc { call: "DOMAIN_SEPARATOR", source })?;
    if on_chain != domain.separator() {
        return Err(ChainError::DomainMismatch {
            chain_id: domain.chain_id,
            token: domain.verifying_contract,
            name: domain.name.clone(),
            version: domain.version.clone(),
            on_chain,
            configured: domain.separator(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x402::{Authorization, ERC6492_SUFFIX, RawSignature};
    use alloy::primitives::U256;
    use alloy::sol_types::SolValue;

    fn item(signature: Vec<u8>) -> SignedAuthorization {
        SignedAuthorization {
            chain_id: 1,
            token: Address::repeat_byte(0x70),
            authorization: Authorization {
                from: Address::repeat_byte(1),
                to: Address::repeat_byte(2),
                value: U256::from(5),
                valid_after: U256::ZERO,
                valid_before: U256::MAX,
                nonce: B256::repeat_byte(3),
            },
            signature: RawSignature::new(signature).unwrap(),
        }
    }

    #[test]
    fn a_wallet_to_deploy_is_deployed_before_its_transfer_in_the_same_batch() {
        let factory = Address::repeat_byte(0xfa);
        let inner = vec![7u8; 192];
        let mut wrapped =
            (factory, Bytes::from(vec![0xc0, 0xde]), Bytes::from(inner.clone())).abi_encode_params();
        wrapped.extend_from_slice(&ERC6492_SUFFIX);
        let items = [item(vec![1; 65]), item(wrapped), item(vec![9; 192])];
        let calls = batch_calls(&items);
        assert_eq!(calls.len(), 4);
        assert_eq!(transfer_positions(&items), [0, 2, 3]);
        assert_eq!((calls[1].target, calls[1].callData.as_ref()), (factory, &[0xc0, 0xde][..]));
        assert!(calls.iter().all(|c| c.allowFailure));
        // The token is given the inner signature, through the `bytes` overload.
        let transfer = IEip3009Bytes::transferWithAuthorizationCall::abi_decode(&calls[2].callData).unwrap();
        assert_eq!(transfer.signature.as_ref(), inner.as_slice());
        // A 65-byte signature keeps the cheaper (v, r, s) overload.
        assert!(IEip3009::transferWithAuthorizationCall::abi_decode(&calls[0].callData).is_ok());
        // Alone, a payment that deploys its wallet still goes through aggregate3.
        assert_eq!(settlement_call(&items[1..2]).0, MULTICALL3);
        assert_eq!(settlement_call(&items[2..3]).0, items[2].token);
        assert_eq!(deployments(&items), 1);
    }

    #[tokio::test]
    async fn rpc_errors_do_not_quote_the_url() {
        // Nothing listens on port 1: the call fails with a transport error quoting the URL.
        let ep =
            RpcEndpoint::connect_http(1, "http://user:pw@127.0.0.1:1/v2/SECRETKEY?apikey=QUERYKEY").unwrap();
        let domain = TokenDomain::new("USD Coin", "2", 1, Address::repeat_byte(1));
        let err = check_domain(&ep.provider, &domain).await.unwrap_err();
        let raw = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(raw.contains("SECRETKEY"), "the raw transport error quotes the URL, key included: {raw}");
        let shown = ep.redact(&raw);
        for secret in ["SECRETKEY", "QUERYKEY", "pw@"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(!format!("{ep:?}").contains("SECRETKEY"));
    }
}
