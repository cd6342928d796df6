#!/usr/bin/env bash
# Load benchmark: flaggate against hand-rolled nginx peers and the static upstream itself, all measured in
# the same run, alternating, several rounds, reported as ratios (never as absolute goals: the box is shared).
#
#   benches/load/run.sh                                   # everything below, defaults
#   ROUNDS=5 DURATION=5s benches/load/run.sh              # more, shorter rounds
#   PARTS="compare storm" benches/load/run.sh             # only some parts
#   FLAGGATE_BIN=/path/flaggate BASE_BIN=/other/flaggate PARTS=ab benches/load/run.sh   # A/B two builds
#
# Two builds for an A/B, each in its own worktree and target directory (release builds are slow here):
#   git worktree add /work/bench-base <commit>
#   (cd /work/bench-base && CARGO_TARGET_DIR=/work/bench-target-base cargo build --release --locked)
#   BASE_BIN=/work/bench-target-base/release/flaggate FLAGGATE_BIN=… PARTS=ab benches/load/run.sh
#
# Targets, all on 127.0.0.1, all in front of the same static upstream (GET /api/client/features, 28.9 kB
# JSON, 85 flags; a precompressed 0.9 kB gzip copy for clients that accept it):
#   static nginx (direct)     wrk straight at the upstream: nginx serving the file (strong ETag, 304s)
#   nginx token-map proxy     map $http_authorization + proxy_pass with upstream keep-alive
#   nginx token-map + cache   the same map + proxy_cache keyed by token + URI + Unleash-Client-Spec, 1 s
#                             validity, proxy_cache_revalidate, proxy_cache_lock, use_stale error timeout updating
#   flaggate pass-through     --shield off: every request forwarded
#   flaggate shielded         the shield on (the default), --shield-ttl $SHIELD_TTL
#
# Parts (PARTS, space-separated; default "compare storm junk tokens", plus "ab" when BASE_BIN is set):
#   compare  ROUNDS rounds; each round runs every target for DURATION, once per encoding (ENCODINGS:
#            identity = no Accept-Encoding, gzip = `Accept-Encoding: gzip`), the order rotated per round.
#            Prints req/s, p50/p99, non-2xx, CPU µs per request (user + kernel, from /proc/<pid>/stat), the
#            upstream's and wrk's CPU per request, and for the caches the requests their upstream saw
#            (counted in the upstream's access log). The summary gives medians and the median of the
#            per-round ratios (rounds back to back share the machine's mood; separate runs do not).
#   storm    STORM (60s) of wrk at flaggate shielded on STORM_TOKENS cold tokens x 2 spec headers (no header,
#            5.2.0) = keys, identity and gzip mixed; counts the upstream's requests per key (access log)
#            against ceil(STORM / SHIELD_TTL) + 1.
#   junk     a junk-token flood (random well-formed tokens, all 401) at flaggate pass-through.
#   tokens   flaggate (pass-through) with 1,000, 10,000 and 1,000,000 tokens side by side, alternating.
#   profile  (not in the default) per-request counts from `perf stat` (malloc calls through a uprobe on
#            glibc's malloc, syscalls, futex calls, context switches) and a flat `perf record` profile, for
#            flaggate pass-through, shielded (identity and gzip) and BASE_BIN when set. Needs `perf`
#            (Debian: linux-perf) and root (the uprobe).
#   ab       AB_ROUNDS (8) rounds of BASE_BIN vs FLAGGATE_BIN, both pass-through (--shield off where the
#            binary knows it), positions swapped every round (ABBA), AB_ENCODINGS (identity), both
#            restarted before every round (AB_FRESH=1; 0 keeps the first two instances). Prints how each
#            instance's upstream connections are spread over the static upstream's two workers.
#            Prints the per-round and median ratios of req/s and of CPU µs per request, and non-2xx counts.
#
# Knobs: ROUNDS=3 DURATION=8s CONNECTIONS=64 THREADS=2 ENCODINGS="identity gzip" SHIELD_TTL=5s STORM=60s
#   STORM_TOKENS=4 AB_ROUNDS=8 AB_ENCODINGS=identity FLAGGATE_BIN (default: cargo build --release here)
#   BASE_BIN (none) QUIET_BUSY=15 (a round starts when the two CPUs were at most this % busy over 1 s)
#   QUIET_WAIT=900 (seconds to wait for that, then the round runs and is marked noisy) QUIET_PROCS (regex of
#   process names that mean other work: cargo, rustc, node, postgres, browsers) KEEP=1 (keep the work
#   directory: logs, configs, results).
#
# Before every measured round the script waits for a quiet machine (no build, no end-to-end suite, CPUs
# idle) and records how busy it was. Installs wrk and nginx (Debian) if missing. Everything is stopped
# on exit.
set -euo pipefail
{ # the whole script is one block, read before it runs: editing this file during a run cannot derail it
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ENCODINGS=${ENCODINGS:-identity gzip}
SHIELD_TTL=${SHIELD_TTL:-5s}
STORM=${STORM:-60s}
STORM_TOKENS=${STORM_TOKENS:-4}
AB_ROUNDS=${AB_ROUNDS:-8}
AB_ENCODINGS=${AB_ENCODINGS:-identity}
BASE_BIN=${BASE_BIN:-}
QUIET_BUSY=${QUIET_BUSY:-15}
QUIET_WAIT=${QUIET_WAIT:-900}
if [ -z "${PARTS:-}" ]; then
  PARTS="compare storm junk tokens"
  [ -n "$BASE_BIN" ] && PARTS="$PARTS ab"
fi
has_part() { [[ " $PARTS " == *" $1 "* ]]; }
WORK=$(mktemp -d /tmp/flaggate-load.XXXXXX)
chmod 755 "$WORK" # nginx workers run as an unprivileged user and must read the static file
STATIC_PORT=18080 NGINX_PORT=18081 CACHE_PORT=18084
# The static upstream's counted doors: same files, same workers, but with an access log, for the two
# caches (their upstream requests are few, so logging them costs nothing measurable).
STATIC_SHIELD_PORT=18090 STATIC_CACHE_PORT=18091
FG_PORT=18082 FG_ADMIN=18083 # pass-through; shielded +100, base (A/B) +200, token counts +10/+20
TOKEN='*:development.66ef8778ad0df979785e382aca6edd2ca06181d44add8325306afe17'
pids=()

cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for c in static proxy cache; do [ -f "$WORK/$c.pid" ] && kill "$(cat "$WORK/$c.pid")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -n "${FLAGGATE_BIN:-}" ]; then
  FG=$FLAGGATE_BIN
else
  echo "== building flaggate (release)"
  cargo build --release --locked -q
  FG="${CARGO_TARGET_DIR:-$ROOT/target}/release/flaggate"
fi
echo "flaggate: $FG"
[ -n "$BASE_BIN" ] && echo "base:     $BASE_BIN"
# --shield off where the binary has a shield (builds before it are pass-through anyway).
pass_args() { if "$1" run --help 2>/dev/null | grep -q -- '--shield '; then echo "--shield off"; fi; }

secs() { python3 -c "import sys,re; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?', sys.argv[1]); v=float(m[1]); print(v/1000 if m[2]=='ms' else v*60 if m[2]=='m' else v)" "$1"; }

# --- nginx: three instances (static upstream, token-map proxy, token-map + cache), each with its own
# master + workers so that each one's CPU can be measured apart. Every listener has `reuseport`: the
# kernel spreads connections over the workers by hash. Without it, whichever worker wakes first accepts a
# burst of them, and a proxy's 64 keep-alive connections could stay split 16/49 between the upstream's
# two workers for the whole run (seen; see BENCHMARKS.md).
mkdir -p "$WORK/www/api/client" "$WORK/logs" "$WORK/cache"
cp benches/load/features.json "$WORK/www/api/client/features"
gzip -9 -c benches/load/features.json > "$WORK/www/api/client/features.gz"
touch -r "$WORK/www/api/client/features" "$WORK/www/api/client/features.gz"
common_http() { cat <<EOF
  access_log off;
  map_hash_bucket_size 128;
  default_type application/json;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 100000;
  client_body_temp_path $WORK/tmp_body; proxy_temp_path $WORK/tmp_proxy;
  fastcgi_temp_path $WORK/tmp_fcgi; uwsgi_temp_path $WORK/tmp_uwsgi; scgi_temp_path $WORK/tmp_scgi;
  log_format counted '\$msec \$status "\$http_authorization" "\$http_unleash_client_spec" "\$http_if_none_match" "\$http_accept_encoding"';
EOF
}
# Storm tokens: cold keys for the storm, in every token file and in the nginx maps.
storm_tokens=()
for i in $(seq 1 "$STORM_TOKENS"); do
  storm_tokens+=("*:development.$(printf 'storm-%d' "$i" | sha256sum | cut -c1-56)")
done
token_map() {
  echo "  map \$http_authorization \$token_ok { default 0; \"$TOKEN\" 1;"
  for t in "${storm_tokens[@]}"; do echo "    \"$t\" 1;"; done
  echo "  }"
}
# The static upstream: what Unleash's /api/client/features would return. nginx's ETag for a file is
# strong ("mtime-size"), and it answers a matching If-None-Match with 304. Clients that accept gzip get a
# precompressed copy (gzip_static: its own strong ETag, Vary: Accept-Encoding), at no CPU cost: the most
# generous upstream there is.
static_location="location / { root $WORK/www; etag on; gzip_static on; gzip_vary on; }"
cat > "$WORK/static.conf" <<EOF
worker_processes auto;
pid $WORK/static.pid;
error_log $WORK/logs/static-error.log warn;
events { worker_connections 4096; }
http {
$(common_http)
  server { listen 127.0.0.1:$STATIC_PORT reuseport; $static_location }
  server { listen 127.0.0.1:$STATIC_SHIELD_PORT reuseport; access_log $WORK/logs/upstream-shield.log counted; $static_location }
  server { listen 127.0.0.1:$STATIC_CACHE_PORT reuseport; access_log $WORK/logs/upstream-cache.log counted; $static_location }
}
EOF
touch "$WORK/logs/upstream-shield.log" "$WORK/logs/upstream-cache.log" "$WORK/results"
# The hand-rolled gateway an operator might write: a map of tokens and proxy_pass with keep-alive.
# (map compares case-insensitively: it accepts an upper-cased token — sloppier than flaggate.)
cat > "$WORK/proxy.conf" <<EOF
worker_processes auto;
pid $WORK/proxy.pid;
error_log $WORK/logs/proxy-error.log warn;
events { worker_connections 4096; }
http {
$(common_http)
$(token_map)
  upstream static { server 127.0.0.1:$STATIC_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT reuseport;
    location /api/client/ {
      if (\$token_ok = 0) { return 401; }
      proxy_pass http://static;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
# The same gateway with nginx's cache in front: what an operator would write to shield Unleash by hand.
# The key holds the token (documents are per token), the URI (query variants) and the spec header; the
# upstream's Vary: Accept-Encoding keeps gzip and identity apart. 1 s validity, then a conditional
# revalidation (If-None-Match / If-Modified-Since); one request fills a key while the others wait
# (lock) or are served stale while it updates.
cat > "$WORK/cache.conf" <<EOF
worker_processes auto;
pid $WORK/cache.pid;
error_log $WORK/logs/cache-error.log warn;
events { worker_connections 4096; }
http {
$(common_http)
$(token_map)
  upstream static { server 127.0.0.1:$STATIC_CACHE_PORT; keepalive 128; }
  proxy_cache_path $WORK/cache levels=1:2 keys_zone=features:10m max_size=256m inactive=10m use_temp_path=off;
  server {
    listen 127.0.0.1:$CACHE_PORT reuseport;
    location /api/client/ {
      if (\$token_ok = 0) { return 401; }
      proxy_pass http://static;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache features;
      proxy_cache_key "\$http_authorization|\$request_uri|\$http_unleash_client_spec";
      proxy_cache_valid 200 1s;
      proxy_cache_revalidate on;
      proxy_cache_lock on;
      proxy_cache_use_stale error timeout updating;
      add_header X-Cache-Status \$upstream_cache_status;
    }
  }
}
EOF
for c in static proxy cache; do
  "$NGINX" -c "$WORK/$c.conf" -p "$WORK" -e "$WORK/logs/$c-error.log" || { cat "$WORK/logs/$c-error.log"; exit 1; }
done
sleep 0.5
nginx_pids() { # master and workers of one instance
  local master
  master=$(cat "$WORK/$1.pid")
  echo "$master $(pgrep -P "$master" | tr '\n' ' ')"
}

# --- flaggate with a token file of N tokens (the benchmark token and the storm tokens among them).
write_tokens() {
  local n=$1 f=$2
  python3 - "$n" "$TOKEN" "${storm_tokens[@]}" > "$f" <<'PY'
import sys, hashlib
n, tok, storm = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
out = ["tokens:", f'  - {{secret: "{tok}", type: client, environment: development}}']
out += [f'  - {{secret: "{t}", type: client, environment: development}}' for t in storm]
for i in range(n - 1 - len(storm)):
    h = hashlib.sha256(f"*:development.bench{i:056x}".encode()).hexdigest()
    out.append(f"  - {{sha256: {h}, type: client}}")
print("\n".join(out))
PY
}
# Each flaggate runs side by side with the others, so rounds can alternate and be compared pairwise
# within one run instead of across restarts.
declare -A fg_pids fg_ports fg_admins
start_flaggate() { # start_flaggate NAME BIN TOKENS PORT ADMIN_PORT UPSTREAM_PORT ARGS...
  local name=$1 bin=$2 n=$3 port=$4 admin=$5 up=$6 pid
  shift 6
  [ -f "$WORK/tokens-$n.yaml" ] || write_tokens "$n" "$WORK/tokens-$n.yaml"
  # shellcheck disable=SC2068
  "$bin" run --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin \
    --upstream http://127.0.0.1:$up --token-file "$WORK/tokens-$n.yaml" --log-level warn $@ \
    > "$WORK/logs/flaggate-$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  fg_pids[$name]=$pid fg_ports[$name]=$port fg_admins[$name]=$admin
  for _ in $(seq 1 1200); do
    curl -fs "http://127.0.0.1:$admin/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "flaggate $name did not become ready"; tail -20 "$WORK/logs/flaggate-$name.log"; exit 1
}

cpu_ticks() { # "utime stime" summed over pids, in clock ticks
  local u=0 s=0 a b
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat")
    u=$((u + a)) s=$((s + b))
  done
  echo "$u $s"
}
# CPU seconds of this shell's finished children (wrk among them): `times` in this shell, not a subshell.
children_cpu() { # sets CHILDREN_CPU
  times >"$WORK/times"
  CHILDREN_CPU=$(tail -1 "$WORK/times" | awk '{ for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] } print s }')
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)
STATIC_PIDS=$(nginx_pids static)

# How busy both CPUs were over one second (percent), everything on the machine included.
busy_pct() {
  local a b
  a=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  sleep 1
  b=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  python3 -c "import sys; a=list(map(int,sys.argv[1].split())); b=list(map(int,sys.argv[2].split())); \
busy=b[0]-a[0]; idle=b[1]-a[1]; print(round(100*busy/max(busy+idle,1)))" "$a" "$b"
}
# Other work on the machine: a build, an end-to-end suite (Unleash on Node, PostgreSQL, browsers).
QUIET_PROCS=${QUIET_PROCS:-'^(cargo|rustc|cc1.*|node|postgres|chrom.*|headless_shell|playwright.*)$'}
foreign() { # names of the other work running now (empty: none)
  { pgrep -l "$QUIET_PROCS" 2>/dev/null | awk '{print $2}'; pgrep -f 'tests/e2e/run.sh' >/dev/null && echo e2e-suite; } |
    sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}' || true
}
# Waits for a quiet machine before a measured round: none of that work running and both CPUs at most
# QUIET_BUSY % busy over one second. Sets BUSY (the last sample, %) and NOISY.
quiet() {
  local waited=0 others
  NOISY=""
  while :; do
    others=$(foreign)
    BUSY=$(busy_pct)
    [ -z "$others" ] && [ "$BUSY" -le "$QUIET_BUSY" ] && return 0
    if [ "$waited" -ge "$QUIET_WAIT" ]; then
      echo "   (machine still ${BUSY}% busy after ${waited}s, running: ${others:-nothing named}; measuring anyway, round marked noisy)"
      NOISY="noisy"
      return 0
    fi
    [ $((waited % 60)) -eq 0 ] && echo "   waiting for a quiet machine: ${BUSY}% busy, running: ${others:-nothing named}"
    sleep 4
    waited=$((waited + 5))
  done
}
enc_headers() { # sets HDRS: the wrk/curl header arguments for an encoding
  case $1 in
    identity) HDRS=() ;;
    gzip) HDRS=(-H "Accept-Encoding: gzip") ;;
    *) echo "unknown encoding $1" >&2; exit 1 ;;
  esac
}

# run NAME PORT ENC LOG PIDS... -> one result line; appends to results:
#   name|enc|rps|cpu|user|sys|static|wrk|non2xx|sockerr|busy|upstream_reqs|noisy|round
# A round is noisy when the machine was not quiet before it (see quiet) or other work was running when it
# ended; the summary leaves noisy rounds out.
# CPU per request is split into user and kernel time, and the static upstream's and wrk's share of the
# same run are measured too: on a shared 2-core box they are the rest of the budget. LOG (or -) is the
# upstream access log whose new lines are this target's upstream requests.
run() {
  local name=$1 port=$2 enc=$3 log=$4; shift 4
  local b0 a0 b1 a1 s0 s1 w0 w1 out rps p50 p99 reqs non2xx sockerr l0=0 l1=0 after
  quiet
  enc_headers "$enc"
  [ "$log" != - ] && l0=$(wc -l < "$log")
  read -r b0 a0 < <(cpu_ticks "$@")
  read -r s0 < <(cpu_ticks $STATIC_PIDS | awk '{print $1 + $2}')
  children_cpu
  w0=$CHILDREN_CPU
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: $TOKEN" "${HDRS[@]}" \
    "http://127.0.0.1:$port/api/client/features")
  children_cpu
  w1=$CHILDREN_CPU
  after=$(foreign)
  [ -n "$after" ] && [ -z "$NOISY" ] && NOISY="during: $after"
  read -r b1 a1 < <(cpu_ticks "$@")
  read -r s1 < <(cpu_ticks $STATIC_PIDS | awk '{print $1 + $2}')
  [ "$log" != - ] && l1=$(wc -l < "$log")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  sockerr=$(echo "$out" | awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}')
  python3 - "$name" "$enc" "$rps" "$reqs" "$p50" "$p99" "${non2xx:-0}" "${sockerr:-0}" "$HZ" "$b0" "$b1" "$a0" "$a1" \
    "$s0" "$s1" "$w0" "$w1" "$BUSY" "$([ "$log" != - ] && echo $((l1 - l0)) || echo -)" "${NOISY:--}" "$WORK/results" "${ROUND:-0}" <<'PY'
import sys
name, enc, rps, reqs, p50, p99, non2xx, sockerr, hz = sys.argv[1:10]
b0, b1, a0, a1, s0, s1 = map(int, sys.argv[10:16])
w0, w1, busy, up, noisy, results, rnd = float(sys.argv[16]), float(sys.argv[17]), *sys.argv[18:23]
reqs, hz = max(int(reqs), 1), int(hz)
us = lambda ticks: ticks / hz * 1e6 / reqs
user, sys_, static, wrk = us(b1 - b0), us(a1 - a0), us(s1 - s0), (w1 - w0) * 1e6 / reqs
print(f"{name:26} {enc:8} {float(rps):9,.0f} req/s  p50 {p50:>7}  p99 {p99:>7}  non-2xx {non2xx}"
      + (f" sock-err {sockerr}" if sockerr != "0" else "")
      + f"  cpu/req {user + sys_:5.1f} µs ({user:4.1f} + {sys_:4.1f})  upstream {static:4.1f}, wrk {wrk:4.1f} µs"
      + (f"  upstream requests {up}" if up != "-" else "") + f"  [busy before {busy}%{' NOISY (' + noisy + ')' if noisy != '-' else ''}]")
with open(results, "a") as f:
    f.write(f"{name}|{enc}|{rps}|{user + sys_}|{user}|{sys_}|{static}|{wrk}|{non2xx}|{sockerr}|{busy}|{up}|{noisy}|{rnd}\n")
PY
}

echo "== machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), $(uname -r)"
PASS_ARGS=$(pass_args "$FG")
start_flaggate pass "$FG" 1000 $FG_PORT $FG_ADMIN $STATIC_PORT $PASS_ARGS
if has_part compare || has_part storm || has_part profile; then
  start_flaggate shield "$FG" 1000 $((FG_PORT + 100)) $((FG_ADMIN + 100)) $STATIC_SHIELD_PORT --shield on --shield-ttl "$SHIELD_TTL"
fi
if has_part ab && [ -z "$BASE_BIN" ]; then echo "PARTS has ab but BASE_BIN is not set"; exit 1; fi
if has_part profile && [ -n "$BASE_BIN" ]; then
  start_flaggate base "$BASE_BIN" 1000 $((FG_PORT + 200)) $((FG_ADMIN + 200)) $STATIC_PORT $(pass_args "$BASE_BIN")
fi

echo "== sanity"
etag=$(curl -s -D - -o /dev/null "http://127.0.0.1:$STATIC_PORT/api/client/features" | awk -F': ' 'tolower($1)=="etag" {print $2}' | tr -d '\r')
case $etag in
  W/*) echo "static upstream ETag $etag is WEAK: the shield would not store it"; exit 1 ;;
  '"'*'"') echo "static upstream ETag: $etag (strong)" ;;
  *) echo "static upstream sends no usable ETag ($etag)"; exit 1 ;;
esac
curl -s -o /dev/null -w "static upstream, If-None-Match: %{http_code}\n" -H "If-None-Match: $etag" "http://127.0.0.1:$STATIC_PORT/api/client/features"
curl -s -o /dev/null -w "static upstream, gzip: %{http_code} %{size_download} bytes\n" -H 'Accept-Encoding: gzip' "http://127.0.0.1:$STATIC_PORT/api/client/features"
for t in "pass-through:${fg_ports[pass]}" "shielded:${fg_ports[shield]:-}" "nginx proxy:$NGINX_PORT" "nginx cache:$CACHE_PORT"; do
  [ -n "${t#*:}" ] || continue
  for enc in identity gzip; do
    enc_headers "$enc"
    curl -s -o /dev/null -D "$WORK/h" -w "${t%%:*}, valid token, $enc: %{http_code} %{size_download} bytes" \
      -H "Authorization: $TOKEN" "${HDRS[@]}" "http://127.0.0.1:${t#*:}/api/client/features"
    echo "  $(grep -i -E '^(content-encoding|x-cache-status|etag):' "$WORK/h" | tr -d '\r' | tr '\n' ' ')"
  done
done
if [ -n "${fg_ports[shield]:-}" ]; then
  echo "shield after the sanity requests: $(curl -s "http://127.0.0.1:$((FG_ADMIN + 100))/metrics" | grep '^flaggate_shield_requests_total' | tr '\n' ' ')"
fi
curl -s -o /dev/null -w 'flaggate, upper-cased token: %{http_code}\n' -H "Authorization: ${TOKEN^^}" "http://127.0.0.1:$FG_PORT/api/client/features"
curl -s -o /dev/null -w 'nginx map,  upper-cased token: %{http_code}\n' -H "Authorization: ${TOKEN^^}" "http://127.0.0.1:$NGINX_PORT/api/client/features"

if has_part compare; then
  echo "== compare: $ROUNDS rounds x encodings ($ENCODINGS), alternating, order rotated per round (wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
  targets=("static nginx (direct)|$STATIC_PORT|-|$STATIC_PIDS"
    "nginx token-map proxy|$NGINX_PORT|-|$(nginx_pids proxy)"
    "nginx token-map + cache|$CACHE_PORT|$WORK/logs/upstream-cache.log|$(nginx_pids cache)"
    "flaggate pass-through|$FG_PORT|-|${fg_pids[pass]}"
    "flaggate shielded|${fg_ports[shield]}|$WORK/logs/upstream-shield.log|${fg_pids[shield]}")
  n=${#targets[@]}
  for r in $(seq 1 "$ROUNDS"); do
    ROUND=$r
    echo "-- round $r"
    for enc in $ENCODINGS; do
      for i in $(seq 0 $((n - 1))); do
        IFS='|' read -r name port log tpids <<< "${targets[$(((i + r - 1) % n))]}"
        # shellcheck disable=SC2086
        run "$name" "$port" "$enc" "$log" $tpids
      done
    done
  done
fi

if has_part storm; then
  storm_s=$(secs "$STORM")
  ttl_s=$(secs "$SHIELD_TTL")
  echo "== storm: $STORM at flaggate shielded (TTL $SHIELD_TTL), $STORM_TOKENS cold tokens x 2 spec headers, identity + gzip mixed"
  cat > "$WORK/storm.lua" <<EOF
local tokens = { $(printf '"%s", ' "${storm_tokens[@]}") }
local specs = { "", "5.2.0" }
local n = 0
request = function()
  n = n + 1
  local k = n % (#tokens * #specs)
  local h = { ["Authorization"] = tokens[k % #tokens + 1] }
  local s = specs[math.floor(k / #tokens) + 1]
  if s ~= "" then h["Unleash-Client-Spec"] = s end
  if math.floor(n / (#tokens * #specs)) % 2 == 1 then h["Accept-Encoding"] = "gzip" end
  return wrk.format("GET", "/api/client/features", h)
end
EOF
  quiet
  log=$WORK/logs/upstream-shield.log
  l0=$(wc -l < "$log")
  read -r b0 a0 < <(cpu_ticks "${fg_pids[shield]}")
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$STORM" -s "$WORK/storm.lua" "http://127.0.0.1:${fg_ports[shield]}/api/client/features")
  read -r b1 a1 < <(cpu_ticks "${fg_pids[shield]}")
  after=$(foreign)
  [ -n "$after" ] && [ -z "$NOISY" ] && NOISY="during: $after"
  NOISY=${NOISY:--}
  tail -n +$((l0 + 1)) "$log" > "$WORK/storm-upstream.log"
  storm_rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  storm_reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  storm_non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  python3 - "$WORK/storm-upstream.log" "$storm_s" "$ttl_s" "$storm_rps" "$storm_reqs" "${storm_non2xx:-0}" \
    "$(( (b1 + a1 - b0 - a0) ))" "$HZ" "$BUSY" "$WORK/results" "$NOISY" "${storm_tokens[@]}" <<'PY'
import sys, math, re, collections
log, storm_s, ttl_s, rps, reqs, non2xx, ticks, hz, busy, results, noisy = sys.argv[1:12]
tokens = sys.argv[12:]
storm_s, ttl_s, reqs = float(storm_s), float(ttl_s), int(reqs)
bound = math.ceil(storm_s / ttl_s) + 1
per_key, statuses = collections.Counter(), collections.Counter()
for line in open(log):
    m = re.match(r'(\S+) (\d+) "([^"]*)" "([^"]*)"', line)
    if not m:
        continue
    auth, spec = m[3], m[4] if m[4] != "-" else ""
    per_key[(tokens.index(auth) + 1 if auth in tokens else auth, spec or "(none)")] += 1
    statuses[m[2]] += 1
keys = [(i + 1, s) for s in ("(none)", "5.2.0") for i in range(len(tokens))]
worst = max((per_key[k] for k in keys), default=0)
cpu = int(ticks) / int(hz) * 1e6 / max(reqs, 1)
print(f"storm: {float(rps):,.0f} req/s, {reqs:,} requests, non-2xx {non2xx}, flaggate {cpu:.1f} µs/request  [busy before {busy}%"
      + (f" NOISY ({noisy})" if noisy != "-" else "") + "]")
print(f"upstream requests per key (token, spec): " + ", ".join(f"{k[0]}/{k[1]}: {per_key[k]}" for k in keys))
print(f"upstream statuses: {dict(statuses)}; other keys: {sum(v for k, v in per_key.items() if k not in keys)}")
print(f"most upstream requests for one key: {worst}   (goal <= ceil({storm_s:g} / {ttl_s:g}) + 1 = {bound}: "
      f"{'met' if worst <= bound else 'NOT met'})")
with open(results, "a") as f:
    f.write(f"storm|mixed|{rps}|{cpu}|0|0|0|0|{non2xx}|0|{busy}|{worst}|{noisy}|0\n")
PY
fi

if has_part junk; then
  echo "== junk-token flood (random well-formed tokens, all 401) at flaggate pass-through"
  cat > "$WORK/junk.lua" <<'EOF'
math.randomseed(os.time())
request = function()
  local t = string.format("*:development.%08x%08x%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff), math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
  return wrk.format("GET", "/api/client/features", { ["Authorization"] = t })
end
EOF
  fg_pid=${fg_pids[pass]}
  upstream_count() { curl -s "http://127.0.0.1:$FG_ADMIN/metrics" | awk '/^flaggate_upstream_duration_seconds_count/ {s+=$2} END {print s+0}'; }
  quiet
  up_before=$(upstream_count)
  rss_before=$(rss_kb "$fg_pid")
  read -r b0 a0 < <(cpu_ticks "$fg_pid")
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$WORK/junk.lua" "http://127.0.0.1:$FG_PORT/api/client/features")
  read -r b1 a1 < <(cpu_ticks "$fg_pid")
  after=$(foreign)
  [ -n "$after" ] && [ -z "$NOISY" ] && NOISY="during: $after"
  up_after=$(upstream_count)
  rss_after=$(rss_kb "$fg_pid")
  junk_rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  junk_reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  junk_cpu=$(python3 -c "print(f'{($b1 + $a1 - $b0 - $a0) / $HZ * 1e6 / max($junk_reqs, 1):.1f}')")
  printf '%-26s %10s req/s   upstream requests %s   RSS %s → %s kB   cpu/req %s µs  [busy before %s%%]\n' "flaggate junk flood" \
    "$junk_rps" "$((up_after - up_before))" "$rss_before" "$rss_after" "$junk_cpu" "$BUSY"
  [ -n "$NOISY" ] && echo "   NOISY ($NOISY)"
  echo "flaggate-junk|identity|$junk_rps|$junk_cpu|0|0|0|0|0|0|$BUSY|$((up_after - up_before))|${NOISY:--}|0" >> "$WORK/results"
fi

if has_part tokens; then
  echo "== token count: 1,000 vs 10,000 vs 1,000,000 tokens loaded (pass-through), $ROUNDS rounds alternating"
  start_flaggate 10000 "$FG" 10000 $((FG_PORT + 10)) $((FG_ADMIN + 10)) $STATIC_PORT $PASS_ARGS
  start_flaggate 1000000 "$FG" 1000000 $((FG_PORT + 20)) $((FG_ADMIN + 20)) $STATIC_PORT $PASS_ARGS
  echo "   RSS: 1k $(rss_kb "${fg_pids[pass]}") kB, 10k $(rss_kb "${fg_pids[10000]}") kB, 1M $(rss_kb "${fg_pids[1000000]}") kB"
  for r in $(seq 1 "$ROUNDS"); do
    ROUND=$r
    run "flaggate (1000 tokens)" "${fg_ports[pass]}" identity - "${fg_pids[pass]}"
    for n in 10000 1000000; do
      run "flaggate ($n tokens)" "${fg_ports[$n]}" identity - "${fg_pids[$n]}"
    done
  done
fi

# How a client process's connections to the static upstream are spread over its workers ("a/b").
upstream_split() {
  local pid=$1
  python3 - "$pid" "$STATIC_PORT" <<'PY'
import re, subprocess, sys, collections
pid, port = sys.argv[1], sys.argv[2]
ss = lambda f: subprocess.run(["ss", "-tnpH", "state", "established", f], capture_output=True, text=True).stdout
mine = {l.split()[2].rsplit(":", 1)[1] for l in ss(f"( dport = :{port} )").splitlines() if f"pid={pid}," in l}
split = collections.Counter(re.search(r"pid=(\d+)", l).group(1) for l in ss(f"( sport = :{port} )").splitlines()
                            if l.split()[3].rsplit(":", 1)[1] in mine)
print("/".join(str(v) for _, v in sorted(split.items())) or "none")
PY
}

if has_part ab; then
  # Fresh instances of both builds for every round (AB_FRESH=1): a long-lived instance keeps its upstream
  # connections, and with them its luck in how they are spread over the upstream's workers, for the whole
  # run; restarted, that luck is drawn again every round and averages out.
  ab_start() { # ab_start base|head: (re)start that build's instance
    local who=$1 bin port
    if [ "$who" = base ]; then bin=$BASE_BIN port=$((FG_PORT + 300)); else bin=$FG port=$((FG_PORT + 400)); fi
    if [ -n "${fg_pids[ab-$who]:-}" ]; then
      kill "${fg_pids[ab-$who]}" 2>/dev/null || true
      wait "${fg_pids[ab-$who]}" 2>/dev/null || true
    fi
    start_flaggate "ab-$who" "$bin" 1000 "$port" $((port + 1)) $STATIC_PORT $(pass_args "$bin")
  }
  echo "== A/B: base ($BASE_BIN) vs head ($FG), both pass-through, $AB_ROUNDS rounds, positions alternating," \
    "$([ "${AB_FRESH:-1}" = 1 ] && echo "fresh instances every round" || echo "the same instances throughout")"
  ab_start base
  ab_start head
  for r in $(seq 1 "$AB_ROUNDS"); do
    ROUND=$r
    if [ "$r" -gt 1 ] && [ "${AB_FRESH:-1}" = 1 ]; then ab_start base; ab_start head; fi
    for enc in $AB_ENCODINGS; do
      if [ $((r % 2)) -eq 1 ]; then order="base head"; else order="head base"; fi
      for who in $order; do
        run "A/B $who" "${fg_ports[ab-$who]}" "$enc" - "${fg_pids[ab-$who]}"
        echo "   ($who: upstream connections over the static workers $(upstream_split "${fg_pids[ab-$who]}"))"
      done
    done
  done
fi

if has_part profile; then
  # Where the time goes: per-request counts (malloc calls through a uprobe on glibc's malloc, syscalls,
  # futex calls, context switches) from `perf stat`, then a flat `perf record` profile, for each flaggate
  # under the same wrk load. Counts are counts: the machine's mood does not move them (the uprobe slows the
  # process, so its req/s here mean nothing).
  LIBC=$(ldd "$FG" | awk '/libc.so.6/ {print $3}')
  perf probe -q -x "$LIBC" malloc 2>/dev/null || true
  events=probe_libc:malloc,raw_syscalls:sys_enter,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,context-switches
  profile_target() { # NAME PORT PID ENC
    local name=$1 port=$2 pid=$3 enc=$4 out reqs
    enc_headers "$enc"
    quiet
    perf stat -x, -o "$WORK/stat" -e "$events" -p "$pid" -- sleep "$(secs "$DURATION")" &
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Authorization: $TOKEN" "${HDRS[@]}" "http://127.0.0.1:$port/api/client/features")
    wait $!
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    python3 - "$name" "$enc" "$reqs" "$WORK/stat" <<'PY2'
import sys
name, enc, reqs, f = sys.argv[1], sys.argv[2], max(int(sys.argv[3]), 1), sys.argv[4]
c = {}
for line in open(f):
    p = line.strip().split(",")
    if len(p) > 2 and p[0].replace(".", "").isdigit():
        c[p[2]] = float(p[0])
g = lambda k: c.get(k, 0) / reqs
print(f"{name:26} {enc:8} per request: malloc {g('probe_libc:malloc'):5.1f}  syscalls {g('raw_syscalls:sys_enter'):5.2f}"
      f"  futex {g('syscalls:sys_enter_futex'):5.3f}  epoll_wait {g('syscalls:sys_enter_epoll_wait'):5.3f}"
      f"  context switches {g('context-switches'):5.3f}   ({reqs:,} requests)")
PY2
    quiet
    perf record -q -F 1999 -o "$WORK/perf-$pid.data" -p "$pid" -- sleep "$(secs "$DURATION")" 2>/dev/null &
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Authorization: $TOKEN" "${HDRS[@]}" "http://127.0.0.1:$port/api/client/features" >/dev/null
    wait $!
    echo "   top symbols ($name, $enc; % of its samples, kernel and user):"
    perf report -q -i "$WORK/perf-$pid.data" --no-children --sort dso,symbol --stdio --percent-limit 1.2 2>/dev/null |
      grep -v '^$' | head -25 | sed -E 's/[ -]+$//; s/^/     /'
    perf report -q -i "$WORK/perf-$pid.data" --no-children --sort dso --stdio 2>/dev/null | grep -v '^$' | head -4 | sed -E 's/[ -]+$//; s/^ */     by dso: /'
  }
  echo "== profile (perf): per-request counts and top symbols, identity unless said"
  [ -n "${fg_pids[base]:-}" ] && profile_target "base pass-through" "${fg_ports[base]}" "${fg_pids[base]}" identity
  profile_target "flaggate pass-through" "${fg_ports[pass]}" "${fg_pids[pass]}" identity
  profile_target "flaggate shielded" "${fg_ports[shield]}" "${fg_pids[shield]}" identity
  profile_target "flaggate shielded" "${fg_ports[shield]}" "${fg_pids[shield]}" gzip
fi

echo "== summary"
python3 - "$WORK/results" "$(nproc)" "$ENCODINGS" "$AB_ENCODINGS" "$(secs "$STORM")" "$(secs "$SHIELD_TTL")" <<'PY'
import sys, statistics, math
rows, noisy = {}, 0
for line in open(sys.argv[1]):
    name, enc, *vals = line.rstrip("\n").split("|")
    if vals[10] != "-":  # noisy rounds are printed above, and left out here
        noisy += 1
        continue
    rows.setdefault((name, enc), []).append(vals)
cores = int(sys.argv[2])
encodings, ab_encodings = sys.argv[3].split(), sys.argv[4].split()
storm_bound = math.ceil(float(sys.argv[5]) / float(sys.argv[6])) + 1
RPS, CPU, USER, SYS, UP, WRK, NON2XX, SOCK, BUSY, UPREQ, NOISY, ROUND = range(12)
def col(name, enc, i):
    return [float(r[i]) for r in rows.get((name, enc), [])]
def by_round(name, enc, i):
    return {r[ROUND]: float(r[i]) for r in rows.get((name, enc), [])}
def med(name, enc, i=RPS):
    v = col(name, enc, i)
    return statistics.median(v) if v else float("nan")
def paired(a, b, enc, i=RPS):  # per-round ratios b/a, rounds run back to back (both quiet)
    x, y = by_round(a, enc, i), by_round(b, enc, i)
    return [y[k] / x[k] for k in sorted(x, key=int) if k in y and x[k]]
def show(rs, goal=None, lower_is_better=False):
    if not rs:
        return "n/a"
    m = statistics.median(rs)
    s = f"{m:.2f}x (rounds {min(rs):.2f}-{max(rs):.2f})"
    if goal is not None:
        ok = m <= goal if lower_is_better else m >= goal
        s += f"   goal {'<=' if lower_is_better else '>='} {goal}x: {'met' if ok else 'NOT met'}"
    return s
ST, NP, NC, FP, FS = ("static nginx (direct)", "nginx token-map proxy", "nginx token-map + cache",
                      "flaggate pass-through", "flaggate shielded")
for enc in encodings:
    if (FS, enc) not in rows:
        continue
    print(f"-- {enc}: medians")
    for n in (ST, NP, NC, FP, FS):
        up = col(n, enc, UPREQ) if n in (NC, FS) else []
        print(f"   {n:26} {med(n, enc):9,.0f} req/s  {med(n, enc, CPU):5.1f} µs/request "
              f"({med(n, enc, USER):4.1f} + {med(n, enc, SYS):4.1f}), its upstream {med(n, enc, UP):4.1f} µs/request"
              f"  non-2xx {int(sum(col(n, enc, NON2XX)))}"
              + (f"  upstream requests per round {', '.join(str(int(u)) for u in up)}" if up else ""))
    print(f"   flaggate shielded / nginx token-map + cache  = {show(paired(NC, FS, enc), 1.0)}")
    print(f"   flaggate shielded / static nginx (direct)    = {show(paired(ST, FS, enc), 0.9)}")
    print(f"   flaggate shielded / flaggate pass-through    = {show(paired(FP, FS, enc), 1.8)}")
    print(f"   flaggate pass-through / nginx token-map proxy = {show(paired(NP, FP, enc))}")
    print(f"   nginx token-map + cache / static direct       = {show(paired(ST, NC, enc))}")
    rest = med(FP, enc, UP) + med(FP, enc, WRK)
    print(f"   pass-through CPU budget for 1.2x nginx: upstream + wrk take {rest:.1f} µs/request, leaving "
          f"{cores * 1e6 / (1.2 * med(NP, enc)) - rest:.1f} µs for the proxy")
if ("storm", "mixed") in rows:
    r = rows[("storm", "mixed")][-1]
    print(f"-- storm: most upstream requests for one key {r[UPREQ]} (bound {storm_bound}), {float(r[RPS]):,.0f} req/s")
if ("flaggate-junk", "identity") in rows and (FP, "identity") in rows:
    print(f"-- junk flood / pass-through valid = {med('flaggate-junk', 'identity') / med(FP, 'identity'):.2f}x (target >= 1.5x)")
if ("flaggate (1000 tokens)", "identity") in rows:
    for n in ("10000", "1000000"):
        print(f"-- {int(n):,} tokens vs 1,000 (paired rounds, median ratio): "
              f"{show(paired('flaggate (1000 tokens)', f'flaggate ({n} tokens)', 'identity'))}   (target within 5%)")
for enc in ab_encodings:
    if ("A/B head", enc) not in rows:
        continue
    A, B = "A/B base", "A/B head"
    rr, cr = paired(A, B, enc), paired(A, B, enc, CPU)
    print(f"-- A/B {enc}: base {med(A, enc):,.0f} req/s {med(A, enc, CPU):.1f} µs/request; "
          f"head {med(B, enc):,.0f} req/s {med(B, enc, CPU):.1f} µs/request")
    print(f"   per round head/base req/s: {', '.join(f'{x:.3f}' for x in rr)}; head won {sum(x > 1 for x in rr)} of {len(rr)}")
    print(f"   per round head/base µs/request: {', '.join(f'{x:.3f}' for x in cr)}")
    print(f"   head / base req/s = {show(rr, 0.97)}")
    print(f"   head / base CPU per request = {show(cr)} (lower is better)")
    print(f"   non-2xx: base {[int(x) for x in col(A, enc, NON2XX)]}, head {[int(x) for x in col(B, enc, NON2XX)]}; "
          f"socket errors: base {[int(x) for x in col(A, enc, SOCK)]}, head {[int(x) for x in col(B, enc, SOCK)]}")
print(f"-- noisy rounds left out of this summary (other work before or during them): {noisy}")
PY
exit 0
}
