#!/usr/bin/env bash
# Ingest throughput (fsync'd acks) by ledger backend, interleaved, RUNS rounds of:
#   rocksdb          one daemon, RocksDB in a temp dir (the embedded default)
#   postgres         one daemon, a throw-away PostgreSQL on this machine
#   postgres+standby one daemon, the same with a synchronous standby on this machine
#   postgres x3      three daemons sharing one PostgreSQL, the streams spread over them
# Each run is `x402-batcher loadgen --devnet` (its own anvil, daemons in process, the raw
# recovery ceiling measured before and after); one line per run, with how busy the
# machine's CPU was during the load and the CPU (every process) per ack.
#
#   ./ops/bench-ledger.sh                 # after a release build (cargo build --release)
#   RUNS=5 PAYMENTS=50000 ./ops/bench-ledger.sh
# Payment i is payer (i mod PAYERS)'s and goes on stream (i mod STREAMS), stream s to daemon
# (s mod daemons). By default (500 payers, 4 streams) each stream carries a quarter of the
# payers, so each of three daemons has payers of its own, and the first gets two streams.
#   STREAMS=3 ./ops/bench-ledger.sh              # a stream per daemon, each with every payer
#   PAYERS=501 STREAMS=3 ./ops/bench-ledger.sh   # a stream per daemon, each with its own payers
#   DAEMON_CPU=0.4 ./ops/bench-ledger.sh         # each daemon a process capped at 0.4 cores
#                                                 # (a cgroup; as root), as on machines of its own
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=/var/tmp/x402-batcher-target}"
BIN=${BIN:-$CARGO_TARGET_DIR/release/x402-batcher}
RUNS=${RUNS:-5}
PAYMENTS=${PAYMENTS:-50000}
STREAMS=${STREAMS:-4}
PAYERS=${PAYERS:-500}
DAEMON_CPU=${DAEMON_CPU:-}

run() {
    local name=$1
    shift
    local out
    local cap=()
    [ -n "$DAEMON_CPU" ] && cap=(--daemon-cpu "$DAEMON_CPU")
    out=$("$BIN" loadgen --devnet --payments "$PAYMENTS" --payers "$PAYERS" --streams "$STREAMS" --ceiling-seconds 3 "${cap[@]}" "$@" 2>/dev/null)
    local acks ratio
    acks=$(grep -o '[0-9]* acks/s' <<<"$out" | head -n 1)
    ratio=$(grep -o '[0-9.]*%$' <<<"$out" | tail -n 1)
    echo "$(date -u +%H:%M:%S) round $round  $name: $acks, $ratio of the ceiling; $(grep -o 'latency.*' <<<"$out"); CPU $(grep -o '[0-9]*% busy.*' <<<"$out")"
}

for round in $(seq "$RUNS"); do
    run "rocksdb         " --ledger rocksdb
    run "postgres        " --ledger postgres
    run "postgres+standby" --ledger postgres --sync-standby
    run "postgres x3     " --ledger postgres --daemons 3
done
