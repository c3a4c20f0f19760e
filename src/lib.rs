//! # x402-batcher
//!
//! A daemon that sits behind a fleet of x402-protected API servers. Every paid HTTP request
//! carries an EIP-3009 `transferWithAuthorization` signed by the payer; the API servers
//! forward it here over gRPC, or call it as their x402 facilitator over HTTP (the
//! ecosystem's middlewares), the daemon decides within milliseconds whether it is good,
//! records it durably so it is never spent twice, and later settles many payments per
//! Multicall3 `aggregate3` transaction.
//!
//! ```text
//! API nodes ────gRPC───▶ ingest ────▶ admission ──▶ verify pool ───▶ ledger writer ──▶ ack
//! x402 middlewares       (one         (cheap,       (ecrecover on    (RocksDB, group
//!   ──HTTP──▶ facilitator  decision)   static)       N OS threads)    commit, fsync;
//!   /verify: hold                                                     holds in memory)
//!   /settle: accept, then wait for the batch                                │
//! finance ◀── export ◀── settlement log ◀── confirmer ◀── submitter ◀───────┴─ planner
//! ```
//!
//! ## Layout
//!
//! In the order a payment meets them:
//!
//! - [`tls`], [`auth`]: the listeners' connections (TLS through rustls, handshakes logged
//!   with their peer) and who may call: credentials by client certificate or bearer token,
//!   each with a role, checked on every call by an interceptor.
//! - [`server`]: the gRPC services (Ingest and Payments for API servers, Admin for operators
//!   on its own listener) over [`ingest`] and the ledger; [`daemon`] assembles everything,
//!   checks the tokens' domains at start-up, and drains on shutdown.
//! - [`facilitator`]: the x402 facilitator HTTP API (`/supported`, `/verify`, `/settle`)
//!   over the same decision and ledger: a verification holds the payment, a settlement
//!   accepts it and answers by settle mode; replays are refused before the API serves.
//! - [`api`]: the generated gRPC contract (`proto/x402/batcher/v1`) and the conversion of its
//!   messages into domain types, with typed errors.
//! - [`ingest`]: the decision path for one submission, and the one place decisions become
//!   replies and gRPC statuses.
//! - [`x402`]: the protocol core: authorizations and requirements, decoding of x402 v1 and v2
//!   payment headers, EIP-712 hashing, and the official x402 reason codes ([`x402::Reason`]).
//! - [`admission`]: the cheap, static checks (scheme, network, asset, payee, amount) and the
//!   validity window against a [`clock::Clock`], before any signature work.
//! - [`verify`]: the signature check (EIP-712 digest, libsecp256k1 recovery, low-s, v) and the
//!   pool of OS threads that runs it, fed by a bounded queue.
//! - [`balance`]: payers' on-chain balances, cached and refreshed in bulk.
//! - [`ledger`]: the RocksDB nonce ledger and its single group-commit writer: the double-spend
//!   guard, per-payer exposure, the holds of verified payments, the lifecycle, and the
//!   change log (and followers of single payments).
//! - [`audit`]: fails accepted payments whose nonce was used on chain outside the daemon.
//! - [`planner`]: the batch planner's deciding core (when to cut, what, and why), a pure
//!   function of the waiting payments, fees, gas model, caps, policy and time; and the gas
//!   model learnt from receipts.
//! - [`simulate`]: pre-simulation of a batch with `eth_call`, each refused item with its
//!   reason decoded from the token's revert string.
//! - [`settle`]: the settlement engine, one per chain: drives the planner, pre-simulates,
//!   signs and sends batches from settler accounts (nonces, EIP-1559 fees, replacement,
//!   resubmission), follows receipts to the confirmation depth through reorgs, and resumes
//!   from the ledger after a restart.
//! - [`export`]: the settlement log as CSV.
//! - [`chain`]: the on-chain interfaces (EIP-3009 token, Multicall3) and batch encoding.
//! - [`config`]: the typed configuration; every default is a named constant with its reason.
//! - [`client`], [`loadgen`]: the Rust client, and the load generator built on it.
//! - [`devnet`], [`testkit`], [`demo`]: a local anvil chain with the project's contracts,
//!   fixture builders, and the README's main job.
//!
//! Also: [`telemetry`] (Prometheus metrics), [`policy`] (the runtime settlement policy),
//! [`limits`] (per-API-server limits), [`reconcile`] (the ledger proved against the chain).
//! The README says what works today.

pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod balance;
pub mod chain;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod export;
pub mod facilitator;
pub mod ingest;
pub mod ledger;
pub mod limits;
pub mod planner;
pub mod policy;
pub mod reconcile;
pub mod server;
pub mod settle;
pub mod simulate;
pub mod telemetry;
pub mod tls;
pub mod tools;
pub mod verify;
pub mod x402;
