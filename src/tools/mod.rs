//! Not the daemon: the tools around it, for trying, demonstrating, loading and testing it.
//! The binary's `devnet`, `demo` and `loadgen` commands and the test suites use them; an
//! embedder of the daemon has no need of them.
//!
//! - [`cpu_cap`]: a CPU cap for the benchmark's daemon processes (a Linux cgroup);
//! - [`devnet`]: a local chain (anvil) with the test token and Multicall3;
//! - [`demo`]: the whole product on a devnet, gRPC fleet and x402 middlewares;
//! - [`loadgen`]: pre-signed load over gRPC or a facilitator's `/verify`;
//! - [`postgres`]: a throw-away PostgreSQL server (tests, benchmarks, the fleet demo);
//! - [`status`]: Admin `GetStatus` for a person or a script;
//! - [`testkit`]: signed payments and requirements built to order.

pub mod cpu_cap;
pub mod demo;
pub mod devnet;
pub mod loadgen;
pub mod postgres;
pub mod status;
pub mod testkit;
pub mod wallets;
