//! # x402-batcher
//!
//! A daemon that sits behind a fleet of x402-protected API servers. Every paid HTTP request
//! carries an EIP-3009 `transferWithAuthorization` signed by the payer; the API servers
//! forward it here over gRPC, the daemon decides within milliseconds whether it is good,
//! records it durably so it is never spent twice, and later settles many payments per
//! Multicall3 `aggregate3` transaction.
//!
//! ```text
//! API nodes ──gRPC──▶ ingest ──▶ admission ──▶ verify pool ──▶ ledger writer ──▶ ack
//!                                (cheap,        (ecrecover on   (RocksDB, group
//!                                 static)        N OS threads)   commit, fsync)
//!                                                                    │
//! finance ◀── export ◀── settlement log ◀── confirmer ◀── submitter ◀┴─ planner
//! ```
//!
//! ## Layout
//!
//! What exists today (the foundation), in the order a payment meets it:
//!
//! - [`api`]: the generated gRPC contract (`proto/x402/batcher/v1`) and the conversion of
//!   its messages into domain types, with typed errors.
//! - [`x402`]: the protocol core: authorizations and requirements, decoding of x402 v1 and v2
//!   payment headers, EIP-712 hashing, and the official x402 reason codes ([`x402::Reason`]).
//! - [`config`]: the typed configuration, including the network/token table; every default is
//!   a named constant with its reason, validated once at start-up.
//! - [`admission`]: the cheap, static checks (scheme, network, asset, payee, amount, validity
//!   window against a [`clock::Clock`]) that run before any signature work.
//! - [`verify`]: the signature check (EIP-712 digest, libsecp256k1 recovery, low-s, v) and the
//!   pool of OS threads that runs it, fed by a bounded queue.
//! - [`chain`]: the on-chain interfaces the daemon calls (EIP-3009 token, Multicall3) and the
//!   encoding of a settlement batch.
//! - [`devnet`]: a local anvil chain with the project's own token and aggregate3 contract, for
//!   the tests and the demo.
//! - [`testkit`]: fixture builders (signed payments, requirements, headers) for tests,
//!   benchmarks and the demo.
//! - [`demo`]: the README's main job.
//!
//! The ledger, ingest service, planner, submitter, confirmer and export arrive with the
//! issues that build them; see the README for what works today.

pub mod admission;
pub mod api;
pub mod audit;
pub mod balance;
pub mod chain;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod devnet;
pub mod ingest;
pub mod ledger;
pub mod loadgen;
pub mod server;
pub mod testkit;
pub mod verify;
pub mod x402;
