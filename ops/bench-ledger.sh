#!/usr/bin/env bash
# Ingest throughput (fsync'd acks) by ledger backend, interleaved, RUNS rounds of:
#   rocksdb          one daemon, RocksDB in a temp dir (the embedded default)
#   postgres         one daemon, a throw-away PostgreSQL on this machine
#   postgres+standby one daemon, the same with a synchronous standby on this machine
#   postgres x3      three daemons sharing one PostgreSQL, the streams spread over them
# Each run is `x402-batcher loadgen --devnet` (its own anvil, daemons in process, the raw
# recovery ceiling measured before and after); one line per run.
#
#   ./ops/bench-ledger.sh                 # after a release build (cargo build --release)
#   RUNS=5 PAYMENTS=50000 ./ops/bench-ledger.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=/var/tmp/x402-batcher-target}"
BIN=${BIN:-$CARGO_TARGET_DIR/release/x402-batcher}
RUNS=${RUNS:-5}
PAYMENTS=${PAYMENTS:-50000}

run() {
    local name=$1
    shift
    local out
    out=$("$BIN" loadgen --devnet --payments "$PAYMENTS" --payers 500 --streams 4 --ceiling-seconds 3 "$@" 2>/dev/null)
    local acks ratio
    acks=$(grep -o '[0-9]* acks/s' <<<"$out" | head -n 1)
    ratio=$(grep -o '[0-9.]*%$' <<<"$out" | tail -n 1)
    echo "$(date -u +%H:%M:%S) round $round  $name: $acks, $ratio of the ceiling; $(grep -o 'latency.*' <<<"$out")"
}

for round in $(seq "$RUNS"); do
    run "rocksdb         " --ledger rocksdb
    run "postgres        " --ledger postgres
    run "postgres+standby" --ledger postgres --sync-standby
    run "postgres x3     " --ledger postgres --daemons 3
done
