#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 600 s each, two at a time on two
# cores) and prints each one's result. Outside the default CI path. Needs cargo-fuzz
# (`cargo install cargo-fuzz`); works on the stable toolchain without sanitizers
# (`-s none`: libFuzzer's coverage guidance, Rust's own panics and debug assertions).
#
#   ops/fuzz.sh [SECONDS] [TARGET ...]
#
# The corpus lives in fuzz/corpus/TARGET (committed: each run starts where the last one
# stopped); a crash leaves its input in fuzz/artifacts/TARGET. Results: FUZZING.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. ops/setup.sh >/dev/null
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(header payload_json submit_request ledger_record facilitator_body facilitator_auth)
fi
# Its own build directory: instrumented code must not replace the main build's artifacts.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/tmp/x402-batcher-fuzz-target}"
cargo fuzz build -s none -O
run() {
  local t="$1"
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  if cargo fuzz run -s none -O "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 \
      > "fuzz/artifacts/$t/last-run.log" 2>&1; then
    echo "$t: ok, $(grep -E '^stat::number_of_executed_units' "fuzz/artifacts/$t/last-run.log" | awk '{print $2}') runs in ${secs}s, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs"
  else
    echo "$t: FAILED, see fuzz/artifacts/$t/last-run.log"
    return 1
  fi
}
status=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  run "${targets[i]}" &
  a=$!
  b=""
  if [ $((i + 1)) -lt ${#targets[@]} ]; then
    run "${targets[i + 1]}" &
    b=$!
  fi
  wait "$a" || status=1
  [ -z "$b" ] || wait "$b" || status=1
done
exit "$status"
