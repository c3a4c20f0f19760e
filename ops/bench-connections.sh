#!/usr/bin/env bash
# What the connection guard (issue #28: caps, per-connection deadlines, requests counted in
# flight) costs the facilitator's hot path: raw /verify throughput of this checkout's
# release binary against a base commit's, on one devnet, alternating A B A B ... so both
# see the same machine state. Each round starts a fresh daemon (holds are in memory) and
# runs `x402-batcher loadgen --facilitator` (pre-signed v2 bodies, 64 in flight).
#
# Usage: ops/bench-connections.sh BASE_COMMIT [ROUNDS] [PAYMENTS]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$X402_ROOT"
base="${1:?usage: ops/bench-connections.sh BASE_COMMIT [ROUNDS] [PAYMENTS]}"
rounds="${2:-3}"
payments="${3:-20000}"
dir="$(mktemp -d /tmp/x402-bench-connections.XXXXXX)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; git worktree remove --force "$dir/base-tree" 2>/dev/null || true' EXIT

cargo build --locked --release --quiet --bin x402-batcher
cp "$CARGO_TARGET_DIR/release/x402-batcher" "$dir/new"
git worktree add --quiet --detach "$dir/base-tree" "$base"
(cd "$dir/base-tree" && cargo build --locked --release --quiet --bin x402-batcher)
cp "$CARGO_TARGET_DIR/release/x402-batcher" "$dir/old"

"$dir/new" devnet --dir "$dir/net" --payers 300 --block-time 1 > "$dir/devnet.out" 2> "$dir/devnet.err" &
pids+=($!)
for _ in $(seq 1 600); do grep -q "^devnet on" "$dir/devnet.out" 2>/dev/null && break; sleep 0.1; done
line="$(grep "^devnet on" "$dir/devnet.out")"
chain="$(echo "$line" | sed -E 's/.*\(chain ([0-9]+)\).*/\1/')"
token="$(echo "$line" | awk '{print $NF}')"

# Runs one round with binary $1; prints its loadgen summary line.
round() {
  local bin="$1" at="$dir/round.$RANDOM"
  mkdir -p "$at"
  sed -e "s#^path = .*#path = \"$at/ledger\"#" -e 's#127.0.0.1:50051#127.0.0.1:0#' \
      -e 's#127.0.0.1:8402#127.0.0.1:0#' -e 's#^listen = "127.0.0.1:9464"#listen = "127.0.0.1:0"#' \
      "$dir/net/config.toml" > "$at/config.toml"
  "$bin" run --config "$at/config.toml" > "$at/out" 2> "$at/err" &
  local pid=$!
  for _ in $(seq 1 600); do grep -q "^facilitator on" "$at/out" 2>/dev/null && break; sleep 0.1; done
  local url="http://$(grep "^facilitator on" "$at/out" | awk '{print $3}')"
  "$dir/new" loadgen --facilitator "$url" --chain-id "$chain" --token "$token" --payments "$payments" \
    --payers 300 --concurrency 64 --ceiling-seconds 0 | grep "verifications/s"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "base $(git rev-parse --short "$base"), this $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'); $rounds rounds of $payments"
for r in $(seq 1 "$rounds"); do
  echo "round $r base: $(round "$dir/old")"
  echo "round $r this: $(round "$dir/new")"
done
