#!/usr/bin/env bash
# Proves the simulation catches bugs: puts each deliberate fault of ops/sim-faults/ into
# the engine (or the ledger) in turn, runs up to 1,000 seeds (stopping at the first that
# breaks an invariant), prints which seed caught it and how fast, and takes the fault out
# again. Outside the default CI path. Results: SIMULATION.md.
#
#   ops/sim-faults.sh [PATCH ...]     (default: every ops/sim-faults/*.patch)
#
# Needs a clean src/ and tests/ (it patches them in place, and reverts on exit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/x402-batcher-target}"
patches=("$@")
[ ${#patches[@]} -gt 0 ] || patches=(ops/sim-faults/*.patch)
git diff --quiet HEAD -- src tests || { echo "$0: src/ or tests/ has uncommitted changes; commit or stash them first" >&2; exit 1; }
applied=""
revert() { [ -z "$applied" ] || git apply -R "$applied"; applied=""; }
trap revert EXIT
printf '%-38s %-8s %-6s %-8s %s\n' fault caught seeds seconds violation
status=0
for p in "${patches[@]}"; do
  git apply "$p"
  applied="$p"
  bin="$(cargo test --release --locked --test sim --no-run 2>&1 | sed -n 's/.*Executable tests\/sim.rs (\(.*\))/\1/p' | tail -1)"
  [ -x "$bin" ] || { echo "$0: $p does not build" >&2; exit 1; }
  started=$(date +%s%N)
  out="$(SIM_SEEDS=1000 RUST_BACKTRACE=0 "$bin" every_invariant_holds_in_every_seeded_world --exact --nocapture 2>&1 || true)"
  ms=$(( ($(date +%s%N) - started) / 1000000 ))
  revert
  name="$(basename "$p" .patch)"
  line="$(grep -m1 -E '^seed [0-9]+: ' <<<"$out" || true)"
  if [ -n "$line" ]; then
    seed="${line#seed }"
    seed="${seed%%:*}"
    printf '%-38s %-8s %-6s %-8s %s\n' "$name" "seed $seed" "$seed" "$(awk -v ms="$ms" 'BEGIN { printf "%.1f", ms / 1000 }')" "$(cut -c1-160 <<<"${line#*: }")"
  else
    printf '%-38s %-8s %-6s %-8s %s\n' "$name" "MISSED" 1000 "$(awk -v ms="$ms" 'BEGIN { printf "%.1f", ms / 1000 }')" "no seed of 1,000 broke an invariant"
    status=1
  fi
done
exit "$status"
