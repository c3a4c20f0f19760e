#!/usr/bin/env bash
# Installs what x402-batcher needs to build, test and run its demo on a fresh Debian machine
# that has Rust and Node: libclang (RocksDB's bindgen), prometheus (its promtool checks
# the alert rules in ops/prometheus) and postgresql (the tests start throw-away servers
# from its binaries for the PostgreSQL ledger) through apt-get, anvil and the x402 packages through
# npm. protoc needs nothing: the build uses a vendored copy. Safe to run again: it installs
# only what is missing.
#
# Source it (`. ops/setup.sh`) to also get CARGO_TARGET_DIR: one build directory outside
# the repository, shared by every checkout on the machine, so a fresh clone (CI) reuses an
# earlier build instead of spending ~20 minutes compiling RocksDB again.
set -euo pipefail

X402_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/x402-batcher-target}"

missing=()
for pkg in libclang-dev g++ make prometheus postgresql; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]} with apt-get"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # Recommends left out: prometheus would pull in node-exporter and friends.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

anvil="$X402_ROOT/ops/devnet/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
if [ ! -x "$anvil" ]; then
  echo "setup: installing anvil from the npm registry"
  # Only the runtime dependency (anvil); solc, viem and the x402 packages are dev tools
  # for regenerating contracts and vectors, whose outputs are committed. `npm install`
  # rather than `npm ci`: the lock pins every version, but anvil's other-platform packages
  # (darwin, win32, linux-arm64) are absent from the registry here, which `npm ci` refuses.
  npm install --prefix "$X402_ROOT/ops/devnet" --omit=dev --no-save --no-audit --no-fund >/dev/null
fi
"$anvil" --version | head -n 1

# The x402 ecosystem's own packages (x402-express, @x402/express, their clients), pinned in
# ops/interop/package-lock.json: the interop tests, the demo's middleware flow and the
# facilitator benchmark run them against the daemon.
if [ ! -d "$X402_ROOT/ops/interop/node_modules/@x402/express" ] || [ ! -d "$X402_ROOT/ops/interop/node_modules/x402-express" ]; then
  echo "setup: installing the x402 packages (ops/interop) from the npm registry"
  npm install --prefix "$X402_ROOT/ops/interop" --no-audit --no-fund >/dev/null
fi
