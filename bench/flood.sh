#!/usr/bin/env bash
# The hostile-peer figure: one peer (127.0.0.2) floods the CSR endpoint at full speed with
# garbage (no token, forged and malformed tokens, 2 KiB claimed identities with terminal
# escapes) while honest clients (127.0.0.1) keep asking for certificates; `ca-load flood`
# prints the honest clients' success rate and latency, the audit rows and bytes the flood
# added, and the server's peak RSS.
#
#   bench/flood.sh               # SECONDS_=60 LEGIT_RATE=50 by default
#
# Run it on a quiet machine (no cargo build in the background).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_=${SECONDS_:-60}
LEGIT_RATE=${LEGIT_RATE:-50}

cargo build --release -q -p ca-server -p ca-tests --bin ca-server --bin ca-load
CA=target/release/ca-server
LOAD=target/release/ca-load
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=$(port); http=$(port)
RUST_LOG=warn "$CA" run --dev --data-dir "$work/data" --grpc-listen "127.0.0.1:$grpc" \
    --http-listen "127.0.0.1:$http" 2> "$work/server.log" &
pid=$!
for _ in $(seq 1 400); do
    curl -sf -o /dev/null "http://127.0.0.1:$http/readyz" && break
    sleep 0.025
done
# Eight honest workloads, one token each.
tokens=()
for i in $(seq 1 8); do
    "$CA" token issue --data-dir "$work/data" --namespace shop --service-account "web-$i" \
        --ttl 1h > "$work/token-$i"
    tokens+=(--token-file "$work/token-$i")
done
"$LOAD" flood --server-addr "127.0.0.1:$grpc" --ca-bundle "$work/data/trust-bundle.pem" \
    "${tokens[@]}" --database-url "sqlite://$work/data/ca.db" --pid "$pid" \
    --seconds "$SECONDS_" --legit-rate "$LEGIT_RATE"
echo "store_bytes=$(du -cb "$work"/data/ca.db* | tail -1 | cut -f1)"
