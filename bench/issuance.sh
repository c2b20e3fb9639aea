#!/usr/bin/env bash
# The issuance benchmark: ca-server against cfssl (without and with its SQLite certdb), driven
# by the same client (h2load: 16 connections with one request in flight each, then one
# connection with 16 in flight, then a storm of STORM new TLS clients), one after the other on
# this machine, plus the crypto limit measured in-process and a 5,000-request burst. Each server's
# CPU (user + system, from /proc/PID/stat) over the timed part is divided by its answers.
#
#   bench/issuance.sh            # DURATION=8 WARMUP=2 INFLIGHT=16 by default
#
# Run it on a quiet machine (no cargo build in the background). It installs h2load
# (nghttp2-client) and cfssl (golang-cfssl) with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
INFLIGHT=${INFLIGHT:-16}
STORM=${STORM:-1000}
BURST=${BURST:-5000}

missing=()
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v cfssl >/dev/null || missing+=(golang-cfssl)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --release -q -p ca-server -p ca-tests --bin ca-server --bin ca-load
CA=target/release/ca-server
LOAD=target/release/ca-load
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_ready() { # URL
    for _ in $(seq 1 400); do curl -sf -o /dev/null "$1" && return 0; sleep 0.025; done
    echo "not ready: $1" >&2; return 1
}
peak_rss_mib() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# The CPU seconds (user + system, all threads) process PID has used so far.
cpu_seconds() {
    awk -v tck="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / tck }' "/proc/$1/stat"
}
# The CPU seconds process PID's threads have used so far, summed by role: "crypto tokio audit
# other" (ca-server names its threads crypto-N, tokio-rt-worker and audit-writer).
thread_seconds() {
    local tck; tck=$(getconf CLK_TCK)
    for t in /proc/"$1"/task/*; do
        { read -r comm < "$t/comm" && awk -v c="$comm" '{ print c, $14 + $15 }' "$t/stat"; } 2>/dev/null || true
    done | awk -v tck="$tck" '
        $1 ~ /^crypto-/ { c += $2; next } $1 == "tokio-rt-worker" { k += $2; next }
        $1 == "audit-writer" { a += $2; next } { o += $2 }
        END { printf "%.3f %.3f %.3f %.3f", c / tck, k / tck, a / tck, o / tck }'
}
# h2load NAME PID CONNECTIONS INFLIGHT URL BODY [HEADER...]: runs the load against server PID
# (INFLIGHT requests in flight on each of CONNECTIONS), leaves NAME.txt and NAME.log in $work,
# and in NAME.cpu the server's CPU seconds over the timed part (after the warm-up).
run_h2load() {
    local name=$1 pid=$2 conns=$3 inflight=$4 url=$5 body=$6; shift 6
    local headers=()
    for h in "$@"; do headers+=(-H "$h"); done
    h2load -c "$conns" -m "$inflight" ${RPS:+--rps "$RPS"} -D "$DURATION" --warm-up-time "$WARMUP" \
        -d "$body" "${headers[@]}" --log-file "$work/$name.log" "$url" > "$work/$name.txt" &
    local load=$!
    sleep "$WARMUP"
    local before threads; before=$(cpu_seconds "$pid"); threads=$(thread_seconds "$pid")
    wait "$load"
    echo "$before $(cpu_seconds "$pid")" | awk '{ printf "%.3f", $2 - $1 }' > "$work/$name.cpu"
    echo "$threads $(thread_seconds "$pid")" |
        awk '{ printf "%.3f %.3f %.3f %.3f", $5 - $1, $6 - $2, $7 - $3, $8 - $4 }' > "$work/$name.threads"
}
# thread_us NAME OK -> "crypto tokio audit other": each role's CPU per answer, microseconds.
thread_us() { awk -v ok="$2" '{ printf "%.0f %.0f %.0f %.0f", $1 * 1e6 / ok, $2 * 1e6 / ok, $3 * 1e6 / ok, $4 * 1e6 / ok }' "$work/$1.threads"; }
# storm NAME URL BODY [HEADER...]: STORM new TLS clients at once, one request each, as pods
# starting together; prints "ok seconds".
storm() {
    local name=$1 url=$2 body=$3; shift 3
    local headers=()
    for h in "$@"; do headers+=(-H "$h"); done
    h2load -c "$STORM" -n "$STORM" -m 1 -d "$body" "${headers[@]}" "$url" > "$work/$name.storm.txt" 2>&1 || true
    python3 - "$work/$name.storm.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"finished in ([\d.]+)(m?s)", text)
secs = float(m.group(1)) / (1000 if m and m.group(2) == "ms" else 1) if m else float("nan")
ok = re.search(r"(\d+) 2xx", text)
print(f"{int(ok.group(1)) if ok else 0} {secs:.2f}")
PY
}
# cpu_us NAME OK -> the server's CPU per answer in the timed part, microseconds.
cpu_us() { awk -v ok="$2" '{ printf "%.0f", (ok > 0) ? ($1 * 1e6 / ok) : 0 }' "$work/$1.cpu"; }
# stats NAME -> "rate p50_ms p99_ms max_ms ok"
stats() {
    python3 - "$work/$1.txt" "$work/$1.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text).group(1))
ok = int(re.search(r"(\d+) 2xx", text).group(1))
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[2])]
d = sorted(int(r[2]) / 1000 for r in rows if len(r) >= 3 and r[1].startswith("2") and r[2].isdigit())
pct = lambda p: d[min(len(d) - 1, int(len(d) * p))] if d else float("nan")
print(f"{rate:.0f} {pct(0.5):.2f} {pct(0.99):.2f} {d[-1] if d else float('nan'):.1f} {ok}")
PY
}

# --- ca-server -------------------------------------------------------------------------------
# One client identity at thousands a second: the per-identity limit is off for the benchmark.
# All the benchmark's clients come from one address; pods starting together come from many.
$CA run --dev --data-dir "$work/ca" --grpc-listen 127.0.0.1:25012 --http-listen 127.0.0.1:25014 \
    --identity-rate 0 --max-connections-per-ip 20000 2> "$work/ca-server.log" &
ca_pid=$!; pids+=("$ca_pid")
wait_ready http://127.0.0.1:25014/readyz
$CA token issue --data-dir "$work/ca" --namespace bench --service-account client --ttl 1h > "$work/token"
$LOAD body --out "$work/grpc.body"
ca_url=https://127.0.0.1:25012/istio.v1.auth.IstioCertificateService/CreateCertificate
ca_headers=("content-type: application/grpc" "te: trailers" "authorization: Bearer $(cat "$work/token")")
run_h2load ca "$ca_pid" 16 1 "$ca_url" "$work/grpc.body" "${ca_headers[@]}"
read -r ca_rate ca_p50 ca_p99 ca_max ca_ok <<< "$(stats ca)"
ca_cpu=$(cpu_us ca "$ca_ok")
ca_rss=$(peak_rss_mib "$ca_pid")
run_h2load ca1 "$ca_pid" 1 "$INFLIGHT" "$ca_url" "$work/grpc.body" "${ca_headers[@]}"
read -r ca1_rate ca1_p50 ca1_p99 ca1_max ca1_ok <<< "$(stats ca1)"
ca1_cpu=$(cpu_us ca1 "$ca1_ok")
read -r ca_crypto_us ca_tokio_us ca_audit_us ca_other_us <<< "$(thread_us ca "$ca_ok")"
# The transport alone: the same server, TLS, HTTP/2 and tonic answering a unary call that does
# nothing (GetTrustBundle, an empty request, a ~1 KiB answer) at the rate the issuance run
# reached, so the reactor wakes as often.
printf '\0\0\0\0\0' > "$work/empty.body"
RPS=$(( ${ca_rate%.*} / 16 + 1 )) run_h2load transport "$ca_pid" 16 1 \
    https://127.0.0.1:25012/ca.v1.TrustBundleService/GetTrustBundle "$work/empty.body" "${ca_headers[@]}"
read -r transport_rate _ _ _ transport_ok <<< "$(stats transport)"
transport_cpu=$(cpu_us transport "$transport_ok")
read -r ca_storm_ok ca_storm_s <<< "$(storm ca "$ca_url" "$work/grpc.body" "${ca_headers[@]}")"
ca_storm_rss=$(peak_rss_mib "$ca_pid")
issued=$($CA audit list --data-dir "$work/ca" --kind issued --spiffe-id spiffe://cluster.local/ns/bench/sa/client --limit 100000000 --format csv | tail -n +2 | wc -l)
denied=$($CA audit list --data-dir "$work/ca" --kind denied --limit 100000000 --format csv | tail -n +2 | wc -l)
verify=$($CA audit verify --data-dir "$work/ca")

# Burst: BURST requests at once.
$LOAD burst --server https://127.0.0.1:25012 --ca-bundle "$work/ca/trust-bundle.pem" \
    --token-file "$work/token" --requests "$BURST" > "$work/burst.txt" || burst_failed=1
burst_rss=$(peak_rss_mib "$ca_pid")

# Ready after a restart on the existing (now large) data dir.
kill -TERM "$ca_pid"; wait "$ca_pid" 2>/dev/null || true
start_ns=$(date +%s%N)
$CA run --dev --data-dir "$work/ca" --grpc-listen 127.0.0.1:25012 --http-listen 127.0.0.1:25014 \
    --identity-rate 0 2>> "$work/ca-server.log" &
pids+=("$!")
wait_ready http://127.0.0.1:25014/readyz
ready_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))

# --- ca-server on PostgreSQL (one replica, the local server) -----------------------------------
# The same runs against a fresh database on the local PostgreSQL (started, and installed if
# missing, by .ci/postgres-start); the server's CPU is ca-server's alone, and the PostgreSQL
# backends' CPU over the same run is reported beside it.
pg_rate=nan pg_p50=nan pg_p99=nan pg_max=nan pg_ok=0 pg_cpu=0 pg_db_cpu=0 pg_rss=nan
pg1_rate=nan pg_storm_ok=0 pg_storm_s=nan pg_issued=0 pg_answers=0
if [ -z "${NO_POSTGRES:-}" ]; then
    command -v pg_lsclusters >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
    bash .ci/postgres-start >/dev/null
    pg_db="bench_$$"
    su postgres -c "psql -qc 'CREATE DATABASE $pg_db'"
    pg_url="postgres://postgres:postgres@127.0.0.1:5432/$pg_db"
    pg_backends_cpu() { # the CPU seconds of every postgres process so far
        local tck; tck=$(getconf CLK_TCK)
        for p in $(pgrep -x postgres); do cat "/proc/$p/stat" 2>/dev/null; done |
            awk -v tck="$tck" '{ s += $14 + $15 } END { printf "%.3f", s / tck }'
    }
    kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
    $CA run --dev --data-dir "$work/pg" --database-url "$pg_url" --grpc-listen 127.0.0.1:25022 \
        --http-listen 127.0.0.1:25024 --identity-rate 0 --max-connections-per-ip 20000 2> "$work/ca-pg.log" &
    pg_pid=$!; pids+=("$pg_pid")
    wait_ready http://127.0.0.1:25024/readyz
    $CA token issue --data-dir "$work/pg" --database-url "$pg_url" --namespace bench --service-account client --ttl 1h > "$work/pg-token"
    pg_url_grpc=https://127.0.0.1:25022/istio.v1.auth.IstioCertificateService/CreateCertificate
    pg_headers=("content-type: application/grpc" "te: trailers" "authorization: Bearer $(cat "$work/pg-token")")
    db_before=$(pg_backends_cpu)
    run_h2load pg "$pg_pid" 16 1 "$pg_url_grpc" "$work/grpc.body" "${pg_headers[@]}"
    db_after=$(pg_backends_cpu)
    read -r pg_rate pg_p50 pg_p99 pg_max pg_ok <<< "$(stats pg)"
    pg_cpu=$(cpu_us pg "$pg_ok")
    # The backends over the whole run (warm-up included), per answer of the whole run.
    pg_db_cpu=$(awk -v a="$db_after" -v b="$db_before" -v n="$pg_ok" -v d="$DURATION" -v w="$WARMUP" \
        'BEGIN { printf "%.0f", (n > 0) ? ((a - b) * 1e6 / (n * (d + w) / d)) : 0 }')
    pg_rss=$(peak_rss_mib "$pg_pid")
    run_h2load pg1 "$pg_pid" 1 "$INFLIGHT" "$pg_url_grpc" "$work/grpc.body" "${pg_headers[@]}"
    read -r pg1_rate _ _ _ pg1_ok <<< "$(stats pg1)"
    read -r pg_storm_ok pg_storm_s <<< "$(storm pg "$pg_url_grpc" "$work/grpc.body" "${pg_headers[@]}")"
    pg_issued=$($CA audit list --data-dir "$work/pg" --database-url "$pg_url" --kind issued --limit 100000000 --format csv | tail -n +2 | wc -l)
    pg_answers=$((pg_ok + pg1_ok + pg_storm_ok))
    kill -TERM "$pg_pid"; wait "$pg_pid" 2>/dev/null || true
    su postgres -c "psql -qc 'DROP DATABASE $pg_db'" || true
fi

# --- cfssl -----------------------------------------------------------------------------------
cd "$work"
openssl ecparam -name prime256v1 -genkey -noout -out cfssl-ca-key.pem 2>/dev/null
openssl req -new -x509 -key cfssl-ca-key.pem -subj "/O=bench/CN=bench root" -days 3650 -out cfssl-ca.pem 2>/dev/null
openssl req -new -x509 -key cfssl-ca-key.pem -subj "/CN=localhost" -days 1 -out cfssl-tls.pem \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
authkey=$(openssl rand -hex 16)
cat > cfssl-config.json <<JSON
{"signing": {"default": {"auth_key": "bench", "expiry": "1h",
  "usages": ["digital signature", "server auth", "client auth"]}},
 "auth_keys": {"bench": {"type": "standard", "key": "$authkey"}}}
JSON
python3 - "$authkey" <<'PY'
import base64, hashlib, hmac, json, subprocess, sys
key = bytes.fromhex(sys.argv[1])
csr = subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", "/dev/null", "-subj", "/CN=bench"], capture_output=True, check=True).stdout.decode()
request = json.dumps({"certificate_request": csr, "hosts": ["bench.example"]}).encode()
token = hmac.new(key, request, hashlib.sha256).digest()
open("cfssl.body", "w").write(json.dumps({"token": base64.b64encode(token).decode(), "request": base64.b64encode(request).decode()}))
import sqlite3
db = sqlite3.connect("certdb.sqlite")
db.executescript("""
CREATE TABLE certificates (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL,
  ca_label blob, status blob NOT NULL, reason int, expiry timestamp, revoked_at timestamp,
  pem blob NOT NULL, issued_at timestamp, not_before timestamp, metadata text, sans text,
  common_name text, PRIMARY KEY(serial_number, authority_key_identifier));
CREATE TABLE ocsp_responses (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL,
  body blob NOT NULL, expiry timestamp, PRIMARY KEY(serial_number, authority_key_identifier));
""")
db.commit()
PY
echo '{"driver": "sqlite3", "data_source": "certdb.sqlite"}' > cfssl-db.json

run_cfssl() { # NAME PORT [extra cfssl flags]
    local name=$1 port=$2; shift 2
    cfssl serve -address 127.0.0.1 -port "$port" -ca cfssl-ca.pem -ca-key cfssl-ca-key.pem \
        -config cfssl-config.json -tls-cert cfssl-tls.pem -tls-key cfssl-ca-key.pem "$@" \
        2> "$name.server.log" &
    local pid=$!; pids+=("$pid")
    for _ in $(seq 1 200); do curl -sk -o /dev/null "https://127.0.0.1:$port/api/v1/cfssl/scaninfo" && break; sleep 0.05; done
    local url="https://127.0.0.1:$port/api/v1/cfssl/authsign"
    run_h2load "$name" "$pid" 16 1 "$url" cfssl.body "content-type: application/json"
    eval "${name}_rss=$(peak_rss_mib "$pid")"
    run_h2load "${name}1" "$pid" 1 "$INFLIGHT" "$url" cfssl.body "content-type: application/json"
    storm "$name" "$url" cfssl.body "content-type: application/json" > "$name.storm"
    eval "${name}_storm_rss=$(peak_rss_mib "$pid")"
    kill "$pid"
}
run_cfssl cfssl 28888
read -r cf_rate cf_p50 cf_p99 cf_max cf_ok <<< "$(stats cfssl)"
cf_cpu=$(cpu_us cfssl "$cf_ok")
read -r cf1_rate cf1_p50 cf1_p99 cf1_max cf1_ok <<< "$(stats cfssl1)"
read -r cf_storm_ok cf_storm_s < cfssl.storm
run_cfssl cfssldb 28889 -db-config cfssl-db.json
read -r cfdb_rate cfdb_p50 cfdb_p99 cfdb_max cfdb_ok <<< "$(stats cfssldb)"
cfdb_cpu=$(cpu_us cfssldb "$cfdb_ok")
read -r cfdb1_rate cfdb1_p50 cfdb1_p99 cfdb1_max cfdb1_ok <<< "$(stats cfssldb1)"
read -r cfdb_storm_ok cfdb_storm_s < cfssldb.storm
cfdb_rows=$(python3 -c "import sqlite3; print(sqlite3.connect('certdb.sqlite').execute('select count(*) from certificates').fetchone()[0])")
cd - >/dev/null

# --- crypto limit ----------------------------------------------------------------------------
eval "$($LOAD crypto --seconds 3 | sed 's/^/limit_/')"
limit=$(( limit_crypto_per_core_csr_sign_token * limit_cores ))

python3 - <<PY
rows = [
    ("ca-server (TLS, token, durable hash-chained audit)", $ca_rate, $ca_p50, $ca_p99, $ca_max, $ca_cpu, "$ca_rss"),
    ("cfssl serve (TLS, HMAC auth key, no record)", $cf_rate, $cf_p50, $cf_p99, $cf_max, $cf_cpu, "$cfssl_rss"),
    ("cfssl serve + SQLite certdb", $cfdb_rate, $cfdb_p50, $cfdb_p99, $cfdb_max, $cfdb_cpu, "$cfssldb_rss"),
]
rows.insert(1, ("ca-server on PostgreSQL (one replica, local server)", "$pg_rate", "$pg_p50", "$pg_p99", "$pg_max", $pg_cpu, "$pg_rss"))
rows = [(n, float(r), float(a), float(b), float(c), cpu, rss) for n, r, a, b, c, cpu, rss in rows]
print(f"\n16 connections, 1 request in flight each ($DURATION s after $WARMUP s):")
print(f"{'server':<52} {'issuances/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU/issuance µs':>16} {'peak RSS MiB':>13}")
for name, rate, p50, p99, mx, cpu, rss in rows:
    print(f"{name:<52} {rate:>12,.0f} {p50:>8.2f} {p99:>8.2f} {mx:>8.1f} {cpu:>16,} {rss:>13}")
print(f"\n1 connection, $INFLIGHT in flight: ca-server {$ca1_rate:,.0f}/s (p99 {$ca1_p99:.2f} ms, {$ca1_cpu:,} µs CPU each),"
      f" cfssl {$cf1_rate:,.0f}/s, cfssl + certdb {$cfdb1_rate:,.0f}/s")
print(f"storm of $STORM new TLS clients, one request each: ca-server {$ca_storm_ok:,} ok in {$ca_storm_s} s"
      f" (peak RSS $ca_storm_rss MiB), cfssl {$cf_storm_ok:,} ok in {$cf_storm_s} s ($cfssl_storm_rss MiB),"
      f" cfssl + certdb {$cfdb_storm_ok:,} ok in {$cfdb_storm_s} s ($cfssldb_storm_rss MiB)")
print(f"on PostgreSQL: 1 connection, $INFLIGHT in flight {float('$pg1_rate'):,.0f}/s; storm {$pg_storm_ok:,} ok in {'$pg_storm_s'} s;"
      f" the PostgreSQL backends' own CPU {$pg_db_cpu:,} µs per issuance on top of ca-server's;"
      f" {$pg_issued:,} issuance events for {$pg_answers:,} answers counted (plus the warm-ups')")
print()
floor = $limit_crypto_floor_us
print(f"crypto floor (CSR signature check + leaf signature + its check, aws-lc-rs, one core): {floor:.0f} µs")
print(f"ca-server CPU per issuance / crypto floor: {$ca_cpu / floor:.2f}x  (goal <= 1.5x); on PostgreSQL {$pg_cpu / floor:.2f}x")
print(f"  by thread, µs per issuance (16 x 1): crypto pool $ca_crypto_us (the floor {floor:.0f}), tokio workers $ca_tokio_us"
      f" (the transport alone {$transport_cpu} at {$transport_rate:,.0f}/s: TLS, HTTP/2, gRPC, a no-op unary call),"
      f" audit writer $ca_audit_us, other $ca_other_us")
print(f"  the floor + the transport alone: {floor + $transport_cpu:.0f} µs = {(floor + $transport_cpu) / floor:.2f}x the floor,"
      f" before any audit record; {(floor + $transport_cpu) / max($cf_cpu, 1):.2f}x cfssl's CPU")
print(f"ca-server CPU per issuance / cfssl's: {$ca_cpu / max($cf_cpu, 1):.2f}x  (goal <= 0.5x)")
print(f"ca-server / cfssl:              {$ca_rate / max($cf_rate, 1):.2f}x  (goal >= 1.5x); 1 connection x $INFLIGHT: {$ca1_rate / max($cf1_rate, 1):.2f}x")
print(f"storm: ca-server {$ca_storm_s} s / cfssl {$cf_storm_s} s (goal: less)")
print(f"ca-server / cfssl with certdb:  {$ca_rate / max($cfdb_rate, 1):.1f}x  (goal >= 15x)")
print(f"crypto limit ({$limit_cores} cores x {$limit_crypto_per_core_csr_sign_token:,} CSR verify + sign + token verify per core): {$limit:,}/s;"
      f" ca-server reaches {$ca_rate / $limit:.0%} of it"
      f" (without the token verify, which the token cache saves: {$limit_crypto_per_core_csr_sign * $limit_cores:,}/s)")
print(f"ready to serve after a restart on the existing data dir: $ready_ms ms (goal <= 200 ms)")
print(f"audit: {$issued:,} issuance events for the {$ca_ok + $ca1_ok + $ca_storm_ok:,} answers h2load counted"
      f" after warm-up in the two runs and the storm (plus the warm-ups'); {$denied} refusals; $verify")
print(f"cfssl certdb rows: {$cfdb_rows:,} for the {$cfdb_ok + $cfdb1_ok + $cfdb_storm_ok:,} answers counted (plus the warm-ups')")
PY
echo
cat "$work/burst.txt"
echo "peak RSS through the burst: $burst_rss MiB"
[ -z "${burst_failed:-}" ] || { echo "burst FAILED"; exit 1; }
