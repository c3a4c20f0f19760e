#!/usr/bin/env bash
# The main job: starts a local devnet, runs the daemon on it, drives a few thousand payments
# through gRPC and waits until they settle at depth. Installs what it needs first. Extra
# flags go to `x402-batcher demo` (see `--help`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$X402_ROOT"
cargo run --locked --quiet --bin x402-batcher -- demo "$@"
