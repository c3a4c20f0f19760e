//! The integration tests, one binary: the crate and its dependencies are linked once, not
//! once per area (each area was its own binary, and linking them was a large part of a warm
//! `./ops/test.sh` on two cores). One module per area; `cargo test --test it AREA::` runs
//! one. Apart, in binaries of their own: `interop` (needs Node and the x402 packages),
//! `policy` (reads the process-wide metrics of its in-process daemon's rounds, which other
//! areas' daemons would move) and `sim` (the deterministic simulation, also built in
//! release by `ops/simulate.sh`).
//!
//! Every area talks only to loopback: real anvil, real RocksDB on temp dirs, throw-away
//! PostgreSQL servers, real gRPC and HTTP on 127.0.0.1 port 0.

// A failed unwrap fails the test that made it.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod admission;
mod audit;
mod auth;
mod brownout;
mod connections;
mod crash;
mod decode_props;
mod demo;
mod disk_full;
mod efficiency;
mod endpoints;
mod export;
mod facilitator;
mod failover;
mod faults;
mod finality;
mod fleet;
mod gas;
mod heads;
mod ingest;
mod layers;
mod ledger_props;
mod ledger_tls;
mod limits;
mod loadgen;
mod metrics;
mod migrate;
mod ops_kit;
mod payers;
mod preconf;
mod reconcile;
mod settle_on_anvil;
mod settlement;
mod shared_ledger;
mod simulate;
mod vectors;
