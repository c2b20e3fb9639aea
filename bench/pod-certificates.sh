#!/usr/bin/env bash
# The pod-certificate storm: the release binary as --pod-certificate-signer against the
# test suite's fake Kubernetes API (tests/src/podcert.rs, which checks every status write as
# the API server would), STORM PodCertificateRequests created at once (50 service accounts,
# one node). Prints how long until every one was answered, the server's CPU (user + system,
# from /proc/PID/stat) per answer, its peak RSS, and checks each request issued once in the
# audit log. The fake runs in the test process on the same cores, so the wall time is partly
# its own; the CPU per answer is the server's alone.
#
#   bench/pod-certificates.sh        # STORM=1000 by default; RUNS=3
#
# Run it on a quiet machine (no cargo build in the background).
set -euo pipefail
cd "$(dirname "$0")/.."
STORM=${STORM:-1000}
RUNS=${RUNS:-3}
cargo build --release -q -p ca-server
for _ in $(seq 1 "$RUNS"); do
    CA_SERVER_BIN="$PWD/target/release/ca-server" STORM="$STORM" \
        cargo test -q --release -p ca-tests --test pod_certificates -- \
        --ignored pod_certificate_storm_figures --nocapture 2>&1 |
        grep '^pod certificate storm'
done
