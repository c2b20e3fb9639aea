#!/usr/bin/env bash
# Fuzzes the parsers that face callers and operators, SECONDS each (default 60):
#
#   fuzz/run.sh                # every target, 60 s each
#   fuzz/run.sh 300 csr token  # chosen targets, 300 s each
#
# Targets: csr (CSR parser and checks), token (bearer token parser and verifier), spiffe_id,
# cacerts (the `root prepare --import-dir` checks). Findings land in fuzz/artifacts/TARGET/;
# reproduce one with `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-…`.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(csr token spiffe_id cacerts)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo fuzz builds with -Z sanitizer flags; this lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

# Seeds, so that the fuzzer starts from real inputs rather than from nothing.
mkdir -p corpus/csr corpus/spiffe_id corpus/token corpus/cacerts
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
for curve in prime256v1 secp384r1; do
    openssl req -new -newkey ec -pkeyopt "ec_paramgen_curve:$curve" -nodes -keyout /dev/null \
        -subj / -addext "subjectAltName=critical,URI:spiffe://cluster.local/ns/a/sa/b" \
        -outform DER -out "corpus/csr/$curve.der" 2>/dev/null
done
openssl req -new -newkey rsa:2048 -nodes -keyout /dev/null -subj /CN=x -outform PEM \
    -out corpus/csr/rsa.pem 2>/dev/null
printf 'spiffe://cluster.local/ns/default/sa/web' > corpus/spiffe_id/sa
printf 'eyJhbGciOiJFUzI1NiIsImtpZCI6ImEifQ.eyJpc3MiOiJ4In0.c2ln' > corpus/token/jwt
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/O=fuzz/CN=root" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$seeds/key.pem" -out "$seeds/root.pem" 2>/dev/null
{ cat "$seeds/root.pem"; printf '\xff'; cat "$seeds/key.pem"; printf '\xff'; cat "$seeds/root.pem";
  printf '\xff'; cat "$seeds/root.pem"; } > corpus/cacerts/self-signed

for target in "${targets[@]}"; do
    echo "== $target ($seconds s)"
    cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=4096
done
