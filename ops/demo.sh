#!/usr/bin/env bash
# The main job: starts a local devnet, verifies a set of signed sample payments and settles
# one of them on chain. Installs what it needs first. Extra flags go to `x402-batcher demo`
# (see `--help`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$X402_ROOT"
cargo run --locked --quiet --bin x402-batcher -- demo "$@"
