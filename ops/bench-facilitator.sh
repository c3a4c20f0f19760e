#!/usr/bin/env bash
# The facilitator benchmark (issues #12, #27): the same paid-request load through
# x402-batcher's facilitator HTTP API (built-in defaults) and through the official reference
# facilitator (@x402/core + @x402/evm, viem nonce manager on), on one devnet switched between
# automine, 1 s and 2 s blocks, in one run: paid requests per second and their p50/p99 at
# concurrency 1, 10 and 100 in `included` mode, gas and RPC calls per payment, raw /verify
# throughput, and the `accepted` settle mode's latency (1 s blocks). Results are
# printed as JSON lines and written to the run's directory; BENCHMARKS.md records them.
#
# Usage: ops/bench-facilitator.sh [--requests N] [--verify-payments N]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$X402_ROOT"
cargo build --locked --release --quiet --bin x402-batcher
bin="$CARGO_TARGET_DIR/release/x402-batcher"
dir="$(mktemp -d /tmp/x402-bench-facilitator.XXXXXX)"
"$bin" devnet --dir "$dir" --block-time 1 --payers 300 > "$dir/devnet.out" 2> "$dir/devnet.err" &
devnet=$!
trap 'kill $devnet 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "^devnet on" "$dir/devnet.out" 2>/dev/null && break
  sleep 0.1
done
line="$(grep "^devnet on" "$dir/devnet.out")" || { cat "$dir/devnet.err"; exit 1; }
rpc="$(echo "$line" | awk '{print $3}')"
token="$(echo "$line" | awk '{print $NF}')"
echo "devnet $rpc, token $token, 1 s blocks; results in $dir"
node ops/interop/bench.mjs --bin "$bin" --dir "$dir" --rpc "$rpc" --token "$token" "$@"
