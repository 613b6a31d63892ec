#!/usr/bin/env bash
# TLS inspection side by side: HTTPS requests inside CONNECT tunnels decrypted, decided and
# forwarded by aml-egress ([inspect]) and by Squid (squid-openssl, ssl_bump), one worker each,
# no cache, no access log, against the same loopback HTTPS upstream; and the same requests
# sent directly to the upstream. Run from the project root after `cargo build --release`:
#   bash benches/inspect-side-by-side.sh [path/to/aml-egress]
# It builds the inspect_load bench (upstream and load generator), installs squid-openssl
# (which replaces Debian's GnuTLS squid) if `squid -v` lacks --with-openssl, makes the CAs
# (aml-egress's with `ca init`, Squid's with openssl; both ECDSA P-256), warms each proxy up
# (the first request mints the leaf and fills the upstream pool), then runs each of
# {direct, aml-egress, Squid peeking first, Squid bumping at step 1} x {a new connection per
# request, keep-alive} x {1, 16 clients} for DUR seconds (default 4), twice, and prints
# medians and ratios. About 2.5 minutes.
# The proxies get the same CONNECT target, bench.example.test:18444, and dial the upstream
# on 127.0.0.1:18444: Squid through a hosts_file of its own, aml-egress through
# upstream.connect_to. Both verify the upstream against its CA. Everything stays on
# loopback; every load loop is bounded by time; everything started here is stopped by PID.
set -u
bin=$(realpath "${1:-target/release/aml-egress}")
[ -x "$bin" ] || { echo "no aml-egress binary at $bin (cargo build --release first)"; exit 2; }
DUR=${DUR:-4}
case "$DUR" in [1-9]|[1-2][0-9]) ;; *) echo "DUR must be 1..29 seconds"; exit 2;; esac
UP=18444 AM=23130 SQ=13130 SB=13131
NAME=bench.example.test
work=$(mktemp -d)
chmod 755 "$work"   # Squid drops to user proxy and must reach its files
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
port_up() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q LISTEN; }
wait_port() { for _ in $(seq 1 100); do port_up "$1" && return 0; sleep 0.1; done; echo "port $1 never listened"; return 1; }
for p in $UP $AM $SQ $SB; do port_up "$p" && { echo "port $p is in use"; exit 1; }; done

if ! squid -v 2>/dev/null | grep -q -- --with-openssl; then
  echo "installing squid-openssl (replaces the GnuTLS squid) ..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq squid-openssl >/dev/null || exit 1
fi
certgen=/usr/lib/squid/security_file_certgen
[ -x $certgen ] || { echo "no $certgen"; exit 1; }

echo "building the inspect_load bench ..."
lb=$(cargo bench --bench inspect_load --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "inspect_load" and m.get("executable"):
        print(m["executable"])')
[ -x "$lb" ] || { echo "could not build benches/inspect_load.rs"; exit 1; }

"$lb" upstream --listen 127.0.0.1:$UP --name $NAME --ca-out "$work" --lifetime 600 2>"$work/upstream.log" & pids+=($!)
wait_port $UP || exit 1
chmod 644 "$work/upstream-ca.pem"

# ---- aml-egress -------------------------------------------------------------------------
write_aml() { # with or without the CA lines
cat > "$work/aml.toml" <<EOT
[catalog]
cloud = "public"
[proxy]
listen = ["127.0.0.1:$AM"]
workers = 1
tls_ports = [$UP]
max_connections_per_client = 0
[admin]
listen = ""
[log]
level = "error"
[inspect]
$1
upstream_ca_file = "$work/upstream-ca.pem"
hosts = ["$NAME"]
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = { "$NAME:$UP" = "127.0.0.1:$UP" }
[[allow]]
host = "$NAME"
ports = [$UP]
EOT
}
write_aml ''
mkdir "$work/am-ca"
"$bin" ca init --out "$work/am-ca" --config "$work/aml.toml" --days 2 >/dev/null || exit 1
write_aml "ca_cert = \"$work/am-ca/ca.pem\"
ca_key = \"$work/am-ca/ca.key\""
"$bin" validate --config "$work/aml.toml" >"$work/validate.log" 2>&1 || { cat "$work/validate.log"; exit 1; }
"$bin" serve --config "$work/aml.toml" > "$work/aml.log" 2>&1 & pids+=($!); am_pid=$!
wait_port $AM || { tail -5 "$work/aml.log"; exit 1; }

# ---- Squid ------------------------------------------------------------------------------
# Two instances, one CA: "sq" peeks at the ClientHello first (ssl_bump peek step1, then bump),
# as a configuration that checks SNI would; "sb" bumps at step 1 (client-first, on the
# CONNECT's name alone). Squid 5 caches generated certificates in memory only for the
# second: ConnStateData::getSslContextStart() skips its SSL_CTX cache when step 1 peeked or
# stared, so "sq" asks the certificate helper on every connection.
sqca=$work/squid-ca
mkdir -p "$sqca"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=inspect bench Squid CA" -keyout "$sqca/ca.key" -out "$sqca/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" >/dev/null 2>&1 || { echo "openssl failed"; exit 1; }
chown -R proxy:proxy "$sqca"
start_squid() { # instance port step1-rule
local sq=$work/$1
mkdir -p "$sq"
echo "127.0.0.1 $NAME" > "$sq/hosts"
$certgen -c -s "$sq/ssl_db" -M 4MB >/dev/null || return 1
cat > "$sq/squid.conf" <<EOT
http_port 127.0.0.1:$2 ssl-bump tls-cert=$sqca/ca.pem tls-key=$sqca/ca.key generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program $certgen -s $sq/ssl_db -M 4MB
sslcrtd_children 4 startup=1 idle=1
tls_outgoing_options cafile=$work/upstream-ca.pem
visible_hostname inspect-bench-$1
workers 1
acl localclients src 127.0.0.1/32
acl bench_port port $UP
acl bench dstdomain -n $NAME
acl step1 at_step SslBump1
http_access deny !localclients
http_access allow bench bench_port
http_access deny all
$3
ssl_bump bump bench
ssl_bump terminate all
cache deny all
cache_mem 8 MB
hosts_file $sq/hosts
dns_nameservers 127.0.0.1
pinger_enable off
icp_port 0
htcp_port 0
netdb_filename none
client_db off
pid_filename $sq/squid.pid
cache_log $sq/cache.log
access_log none
cache_store_log none
coredump_dir $sq
max_filedescriptors 16384
shutdown_lifetime 1 seconds
EOT
chown -R proxy:proxy "$sq"
squid -k parse -f "$sq/squid.conf" > "$sq/parse.log" 2>&1 || { cat "$sq/parse.log"; return 1; }
squid --foreground -f "$sq/squid.conf" > "$sq/stdout.log" 2>&1 & pids+=($!)
wait_port "$2" || { tail -5 "$sq/cache.log"; return 1; }
}
start_squid sq $SQ 'ssl_bump peek step1' || exit 1
sq_pid=${pids[-1]}
start_squid sb $SB '' || exit 1
sb_pid=${pids[-1]}

# ---- load -------------------------------------------------------------------------------
j=$work/r.jsonl
declare -A addr=([am]=127.0.0.1:$AM [sq]=127.0.0.1:$SQ [sb]=127.0.0.1:$SB)
declare -A ca=([am]=$work/am-ca/ca.pem [sq]=$sqca/ca.pem [sb]=$sqca/ca.pem)
declare -A pid=([am]=$am_pid [sq]=$sq_pid [sb]=$sb_pid)
load() { "$lb" load --target $NAME:$UP "$@" >> "$j" 2>>"$work/load.log"; }
echo "warming up ..."
for w in am sq sb; do
  load --proxy "${addr[$w]}" --ca "${ca[$w]}" --mode new --conns 2 --duration 1 --label "warm-$w"
  load --proxy "${addr[$w]}" --ca "${ca[$w]}" --mode keepalive --conns 16 --duration 1 --label "warm-$w"
done
load --direct 127.0.0.1:$UP --ca "$work/upstream-ca.pem" --mode new --conns 1 --duration 1 --label warm-direct
grep warm "$work/load.log"
echo "measuring (two rounds of $DUR s each) ..."
for round in 1 2; do
  echo "round $round"
  for mode in new keepalive; do
    for c in 1 16; do
      load --direct 127.0.0.1:$UP --ca "$work/upstream-ca.pem" --mode $mode --conns $c --duration "$DUR" --label "direct-$mode-$c"
      for w in am sq sb; do
        load --proxy "${addr[$w]}" --ca "${ca[$w]}" --mode $mode --conns $c --duration "$DUR" --cpu-pid "${pid[$w]}" --label "$w-$mode-$c"
      done
    done
  done
done
grep -v warm "$work/load.log"
for w in am sq sb; do kill -0 "${pid[$w]}" 2>/dev/null || echo "warning: $w exited during the run"; done
for w in sq sb; do
  grep -hE "FATAL|ERROR|WARNING" "$work/$w/cache.log" | cut -c21- | sort | uniq -c | sort -rn | head -5
done
python3 - "$j" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(label, f):
    v = [f(r) for r in rows if r.get("label") == label]
    return st.median(v) if v else float("nan")
rate = lambda r: r["rate_per_s"]
p50 = lambda r: r["latency_us"]["p50"]
p99 = lambda r: r["latency_us"]["p99"]
cpu = lambda r: r["cpu"][0]["cpu_us_per_req"] if r["cpu"] else float("nan")
err = lambda r: r["errors"]
names = {"direct": "direct", "am": "aml-egress", "sq": "Squid, peek then bump", "sb": "Squid, bump at step 1"}
cases = [("new", 1), ("new", 16), ("keepalive", 1), ("keepalive", 16)]
print()
print("| path | requests | clients | req/s | p50 (µs) | p99 (µs) | proxy CPU per request (µs) | errors |")
print("|---|---|---|---|---|---|---|---|")
for m, c in cases:
    for w, n in names.items():
        l = f"{w}-{m}-{c}"
        cp = "" if w == "direct" else f"{med(l, cpu):,.0f}"
        kind = "new connection each" if m == "new" else "keep-alive"
        print(f"| {n} | {kind} | {c} | {med(l, rate):,.0f} | {med(l, p50):,.0f} | {med(l, p99):,.0f} | {cp} | {sum(err(r) for r in rows if r['label'] == l)} |")
print()
print("| ratio | target | " + " | ".join(f"{m} c={c}" for m, c in cases) + " |")
print("|---|---|" + "---|" * len(cases))
def row(label, target, f):
    print(f"| {label} | {target} | " + " | ".join(f(m, c) for m, c in cases) + " |")
for s in ("sq", "sb"):
    row(f"aml-egress / {names[s]}: CPU per request", "≤ 0.5 (new)",
        lambda m, c, s=s: f"{med(f'am-{m}-{c}', cpu) / med(f'{s}-{m}-{c}', cpu):.2f}")
    row(f"aml-egress / {names[s]}: req/s", "≥ 2",
        lambda m, c, s=s: f"{med(f'am-{m}-{c}', rate) / med(f'{s}-{m}-{c}', rate):.2f}")
for w in ("am", "sq", "sb"):
    row(f"{names[w]}: p50 added over direct (µs)", "",
        lambda m, c, w=w: f"{med(f'{w}-{m}-{c}', p50) - med(f'direct-{m}-{c}', p50):,.0f}")
PY
