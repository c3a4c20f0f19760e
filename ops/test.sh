#!/usr/bin/env bash
# Runs the whole test suite: unit, integration (real anvil, real gRPC on loopback, real
# RocksDB in temp dirs), property and doc tests. Installs what it needs first.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$X402_ROOT"
cargo test --locked "$@"
