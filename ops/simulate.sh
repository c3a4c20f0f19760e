#!/usr/bin/env bash
# Runs the deterministic simulation (tests/sim.rs) over a long range of seeds, split over
# several processes, and adds up what they report: seeds per second, payments by outcome,
# faults injected by kind, and every seed that broke an invariant (replay one with
# `SIM_SEED=S SIM_TRACE=1 cargo test --release --test sim every`). Outside the default CI
# path (CI runs 300 seeds in `cargo test`). Results: SIMULATION.md.
#
#   ops/simulate.sh [--seeds N] [--from S] [--jobs J] [--faults all|none|KIND,...]
#
# Defaults: 10,000 seeds from 1, 4 jobs (the simulation waits on its ledger's disk writes
# as much as it computes: on 2 cores, 4 jobs run ~1.7x as many seeds per second as 2),
# every fault kind. Ledgers live under $TMPDIR (a tmpfs such as /dev/shm is faster).
# Exit status 1 if any seed broke an invariant.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/x402-batcher-target}"
seeds=10000 from=1 jobs=4 faults=all
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="$2"; shift 2 ;;
    --from) from="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --faults) faults="$2"; shift 2 ;;
    *) echo "usage: $0 [--seeds N] [--from S] [--jobs J] [--faults all|none|KIND,...]" >&2; exit 2 ;;
  esac
done
for n in "$seeds" "$from" "$jobs"; do
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -gt 0 ] || { echo "$0: --seeds, --from and --jobs take positive integers" >&2; exit 2; }
done
[ "$jobs" -le "$seeds" ] || jobs="$seeds"

# Build once, then run a private copy: a rebuild meanwhile cannot swap the binary under a
# run of an hour.
bin="$(cargo test --release --locked --test sim --no-run 2>&1 | sed -n 's/.*Executable tests\/sim.rs (\(.*\))/\1/p' | tail -1)"
[ -x "$bin" ] || { echo "$0: could not build the simulation" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/sim"
echo "simulating seeds $from..$((from + seeds - 1)) in $jobs jobs, faults: $faults, at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tests || echo ' (with uncommitted changes)')"
started=$(date +%s%N)
per=$(( (seeds + jobs - 1) / jobs ))
pids=()
for ((j = 0; j < jobs; j++)); do
  start=$((from + j * per))
  count=$(( seeds - j * per < per ? seeds - j * per : per ))
  [ "$count" -gt 0 ] || break
  SIM_ALL=1 SIM_FROM="$start" SIM_SEEDS="$count" SIM_FAULTS="$faults" RUST_BACKTRACE=0 \
    "$work/sim" every_invariant_holds_in_every_seeded_world --exact --nocapture >"$work/job$j.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))

grep -h '^sim-failing' "$work"/job*.log | sort -t= -k2 -n || true
grep -h '^sim-totals' "$work"/job*.log | awk -v secs="$(awk -v ms="$elapsed_ms" 'BEGIN { print ms / 1000 }')" -v want="$seeds" '
  {
    for (i = 2; i <= NF; i++) {
      split($i, kv, "=")
      if (kv[1] != "from" && kv[1] != "secs") sum[kv[1]] += kv[2]
    }
  }
  END {
    printf "seeds %d in %.1f s (%.1f seeds/s); failing %d\n", sum["seeds"], secs, sum["seeds"] / secs, sum["failing"]
    printf "payments: %d accepted, %d settled, %d failed, %d expired\n", sum["accepted"], sum["settled"], sum["failed"], sum["expired"]
    printf "faults injected:"
    for (k in sum) if (k ~ /^fault\./) printf " %s=%d", substr(k, 7), sum[k]
    printf "\n"
    if (sum["seeds"] != want) { printf "only %d of %d seeds reported: a job died (see its log)\n", sum["seeds"], want; exit 1 }
    if (sum["failing"] > 0) exit 1
  }' || { for f in "$work"/job*.log; do grep -q '^sim-totals' "$f" || tail -20 "$f"; done; exit 1; }
