#!/usr/bin/env bash
# Ingest throughput of the daemon binary, plaintext against TLS with a bearer token: the
# same devnet, config and load, alternating, RUNS times each. Prints the load generator's
# summary per run (acks/s, ack latency, share of the raw recovery ceiling).
#
#   ./ops/bench-auth.sh            # after a release build (cargo build --release)
#   RUNS=5 PAYMENTS=30000 ./ops/bench-auth.sh
#
# Needs openssl (for a throw-away CA and server certificate) and anvil (ops/devnet).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=/var/tmp/x402-batcher-target}"
BIN=${BIN:-$CARGO_TARGET_DIR/release/x402-batcher}
RUNS=${RUNS:-3}
PAYMENTS=${PAYMENTS:-20000}
PAYERS=500
D=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT

"$BIN" devnet --dir "$D/net" --payers "$PAYERS" >"$D/devnet.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do grep -q "run:" "$D/devnet.log" 2>/dev/null && break; sleep 0.1; done
grep -q "run:" "$D/devnet.log" || { cat "$D/devnet.log"; echo "devnet did not start" >&2; exit 1; }
chain_id=$(awk '/^chain_id/ {print $3; exit}' "$D/net/config.toml")
token=$(awk -F'"' '/^address/ {print $2; exit}' "$D/net/config.toml")

# A CA, a server certificate for localhost, a token.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
    -keyout "$D/ca.key" -out "$D/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$D/server.key" -out "$D/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$D/ext"
openssl x509 -req -in "$D/server.csr" -CA "$D/ca.pem" -CAkey "$D/ca.key" -CAcreateserial -days 1 \
    -extfile "$D/ext" -out "$D/server.pem" 2>/dev/null
chmod 600 "$D/server.key"
"$BIN" new-token --name bench >"$D/token"
BENCH_TOKEN=$(awk '/^token \(/ {print $NF; exit}' "$D/token")
export BENCH_TOKEN
admin_hash=$("$BIN" new-token --name ops --role admin | awk -F'"' '/token_sha256/ {print $2}')

# Settlement and metrics off: only ingest is measured.
base=$(grep -v -e '^settler_keys_file' -e '^listen = "127.0.0.1:9464"' "$D/net/config.toml" |
    sed 's/^listen = "127.0.0.1:50051"/listen = "127.0.0.1:0"/')

for run in $(seq "$RUNS"); do
    for mode in plain tls; do
        dir="$D/$mode-$run"
        mkdir -p "$dir"
        {
            printf '%s\n' "$base" | sed "s|^path = .*|path = \"$dir/ledger\"|"
            printf '\n[admin]\nlisten = "127.0.0.1:0"\n'
            if [ "$mode" = tls ]; then
                printf '\n[tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$D/server.pem" "$D/server.key"
                sed -n '/^\[\[credentials\]\]/,$p' "$D/token"
                printf '\n[[credentials]]\nname = "ops"\nrole = "admin"\ntoken_sha256 = "%s"\n' "$admin_hash"
            fi
        } >"$dir/config.toml"
        RUST_LOG=warn "$BIN" run --config "$dir/config.toml" >"$dir/out" 2>"$dir/err" &
        daemon=$!
        pids+=("$daemon")
        for _ in $(seq 600); do grep -q "^listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
        addr=$(awk '/^listening on/ {print $3; exit}' "$dir/out")
        [ -n "$addr" ] || { cat "$dir/err"; echo "daemon did not start" >&2; exit 1; }
        flags=(--target "http://$addr")
        if [ "$mode" = tls ]; then
            flags=(--target "https://$addr" --ca-file "$D/ca.pem" --server-name localhost --token-env BENCH_TOKEN)
        fi
        echo "== run $run: $mode"
        "$BIN" loadgen "${flags[@]}" --chain-id "$chain_id" --token "$token" --eip712-name "USD Coin" \
            --seed loadgen --payers "$PAYERS" --payments "$PAYMENTS" --streams 4 --ceiling-seconds 3 |
            grep -v '^pre-signed'
        kill -TERM "$daemon"
        wait "$daemon" || true
    done
done
