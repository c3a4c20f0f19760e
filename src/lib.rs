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
//! x402 middlewares       (one         (cheap,       (ecrecover on    (RocksDB or PG, group
//!   ──HTTP──▶ facilitator  decision)   static)       N OS threads;    commit, fsync;
//!   /verify: hold                                    ERC-1271 on      holds in memory)
//!                                                    chain for payers
//!                                                    with code)
//!   /settle: accept, then wait for the batch                                │
//! finance ◀── export ◀── settlement log ◀── confirmer ◀── submitter ◀───────┴─ planner
//! ```
//!
//! ## Layers
//!
//! Each module uses only modules of its own layer or below, never one that uses it back
//! (`tests/it/layers.rs` reads the `crate::` paths of every file and checks both, against the
//! list below; it checks the files inside each module for loops too). Bottom up:
//!
//! 0. [`clock`], [`planner`], [`policy`], [`telemetry`]: time, the batch planner's pure
//!    decisions (its [`planner::CutRules`]) and what a settlement costs, the runtime
//!    settlement policy, Prometheus metrics.
//! 1. [`x402`], [`chain`], [`simulate`], [`payer`]: the protocol core (authorizations,
//!    requirements, header decoding, EIP-712, reason codes); the token and Multicall3
//!    interfaces, batch encoding, the one RPC error and a chain's several endpoints as one; pre-simulation of a batch; what a
//!    payer is on chain (its code) and how the token judges its signature (ECDSA or
//!    ERC-1271), read by deployless probes.
//! 2. [`config`]: the typed configuration, plain data plus validation (listeners,
//!    credentials and their parsers, connection caps and timeouts, the facilitator,
//!    settlement, tokens and their chains' endpoints); every default a named constant.
//! 3. [`ledger`]: the nonce ledger behind a seam that names no database
//!    ([`ledger::store`]: [`ledger::LedgerStore`], and [`ledger::Fleet`] for what only a
//!    ledger a fleet shares does), each backend a folder carrying its name
//!    ([`ledger::rocks`], the embedded default; [`ledger::postgres`], shared by a fleet):
//!    commands, the rules of a group (one code for both), records and the books, the
//!    group-commit writer, the holds of verified payments, followers of single payments,
//!    leases dividing settler accounts.
//! 4. [`admission`], [`verify`], [`balance`], [`auth`], [`limits`], [`tls`], [`connections`]:
//!    the cheap static checks and the validity window; the signature check and its pool of
//!    OS threads; payers' balances and code, cached; who may call (credentials, roles);
//!    per-server limits; the listeners' TLS; what a client may hold on a listener (caps,
//!    deadlines, headroom under the open-file limit).
//! 5. [`ingest`]: the decision path for one submission, whatever surface it came by.
//! 6. [`settle`], [`audit`], [`export`], [`reconcile`]: the settlement engine, one per chain
//!    ([`settle::Engine`]; chain reads behind a trait, decisions as functions of what was
//!    read, I/O in the round); the nonce audit; the settlement log as CSV or JSON Lines
//!    with its cursor protocol; the ledger proved against the chain.
//! 7. [`api`], [`server`], [`facilitator`], [`client`]: the edges: the generated gRPC
//!    contract and its conversions to domain types, the gRPC services, the x402 facilitator
//!    HTTP API (its caller checked once, by an extractor), the Rust client.
//! 8. [`daemon`]: assembly, start-up step by step, the drain.
//! 9. [`tools`]: not the daemon: the devnet, the demo, the load generator, test fixtures.
//!
//! In the order a payment meets them: [`connections`], [`tls`] and [`auth`] at the
//! connection, [`server`] (gRPC) or [`facilitator`] (HTTP), [`ingest`]: [`admission`],
//! [`verify`], [`balance`], then the [`ledger`] writer (the ack); later [`settle`] takes it to the chain and back, and
//! [`export`] to finance. The README says what works today.

pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod balance;
pub mod chain;
pub mod client;
pub mod clock;
pub mod config;
pub mod connections;
pub mod daemon;
pub mod export;
pub mod facilitator;
pub mod ingest;
pub mod ledger;
pub mod limits;
pub mod payer;
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
