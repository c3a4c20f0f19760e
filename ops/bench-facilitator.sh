#!/usr/bin/env bash
# The facilitator benchmark (issues #12, #27): the same paid-request load through
# x402-batcher's facilitator HTTP API (built-in defaults) and through the official reference
# facilitator (@x402/core + @x402/evm, viem nonce manager on), on one devnet switched between
# automine, 1 s and 2 s blocks, and on a second devnet behind the flashblocks stand-in (2 s
# blocks, 200 ms preconfirmations, the daemon opted in), in one run: paid requests per
# second and their p50/p99 at concurrency 1, 10 and 100 in `included` mode, gas and RPC
# calls per payment, raw /verify throughput, and the `accepted` settle mode's latency (1 s
# blocks). Results are printed as JSON lines and written to the run's directory;
# BENCHMARKS.md records them.
#
# Usage: ops/bench-facilitator.sh [--requests N] [--verify-payments N]
#          [--only 1s-c100,preconf-c100,...] [--ours-only]
# `--only` re-measures just those `included` phases (chain-cN), `--ours-only` without the
# reference; BENCH_RUST_LOG sets the daemon's RUST_LOG (e.g. x402_batcher::settle=debug,
# which logs each cut and what its inclusion taught the send lead); BENCH_NO_WS=1 leaves
# the node's WebSocket URL out (heads polled).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$X402_ROOT"
cargo build --locked --release --quiet --bin x402-batcher
bin="$CARGO_TARGET_DIR/release/x402-batcher"
dir="$(mktemp -d /tmp/x402-bench-facilitator.XXXXXX)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
# Starts `x402-batcher devnet --dir DIR ARGS...` and waits for its "devnet on" line.
start_devnet() {
  local at="$1"; shift
  mkdir -p "$at"
  "$bin" devnet --dir "$at" --payers 300 "$@" > "$at/devnet.out" 2> "$at/devnet.err" &
  pids+=($!)
  for _ in $(seq 1 600); do
    grep -q "^devnet on" "$at/devnet.out" 2>/dev/null && return 0
    sleep 0.1
  done
  cat "$at/devnet.err"; return 1
}
field() { grep "^devnet on" "$1/devnet.out" | awk "{print \$$2}"; }
start_devnet "$dir" --block-time 1
rpc="$(field "$dir" 3)"; token="$(field "$dir" NF)"
echo "devnet $rpc, token $token, 1 s blocks; results in $dir"
# A second chain for preconfirmations: the flashblocks stand-in (a flashblock every 200 ms,
# a block sealed every 2 s, as on Base).
start_devnet "$dir/preconf" --block-time 2 --flashblocks-ms 200
prpc="$(field "$dir/preconf" 3)"; ptoken="$(field "$dir/preconf" NF)"
echo "flashblocks stand-in $prpc, token $ptoken"
node ops/interop/bench.mjs --bin "$bin" --dir "$dir" --rpc "$rpc" --token "$token" \
  --preconf-dir "$dir/preconf" --preconf-rpc "$prpc" --preconf-token "$ptoken" "$@"
