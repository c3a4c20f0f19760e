#!/usr/bin/env bash
# The main job: starts a local devnet, runs the daemon on it, drives a few thousand payments
# through gRPC and waits until they settle at depth. Installs what it needs first. Extra
# flags go to `x402-batcher demo` (see `--help`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$X402_ROOT"
# A cold first build takes ~20 minutes (RocksDB's C++): say so, and let cargo show its
# progress rather than a silent terminal.
if [ ! -x "$CARGO_TARGET_DIR/debug/x402-batcher" ]; then
  echo "building x402-batcher (the first build takes ~20 minutes on 2 cores: RocksDB's C++) ..."
fi
cargo build --locked --bin x402-batcher
"$CARGO_TARGET_DIR/debug/x402-batcher" demo "$@"
