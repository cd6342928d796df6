#!/usr/bin/env bash
# Load benchmark: flaggate vs a hand-rolled nginx token-map proxy vs the static upstream itself, measured
# in the same run, alternating, several rounds (wrk -t2 -c64, GET /api/client/features, 28.9 kB JSON).
# Prints req/s, p50/p99 and CPU time per request (from /proc/<pid>/stat deltas) for each, the
# flaggate/nginx ratio, a junk-token flood round and valid-token rounds with 10k and 1M tokens loaded.
#
#   benches/load/run.sh            # ROUNDS=3 DURATION=8s CONNECTIONS=64 by default
#
# Everything listens on 127.0.0.1 and is stopped on exit. Installs wrk and nginx (Debian) if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
WORK=$(mktemp -d /tmp/flaggate-load.XXXXXX)
chmod 755 "$WORK" # nginx workers run as an unprivileged user and must read the static file
STATIC_PORT=18080 NGINX_PORT=18081 FG_PORT=18082 FG_ADMIN=18083
TOKEN='*:development.66ef8778ad0df979785e382aca6edd2ca06181d44add8325306afe17'
pids=()

cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for c in static proxy; do [ -f "$WORK/$c.pid" ] && kill "$(cat "$WORK/$c.pid")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "== building flaggate (release)"
cargo build --release --locked -q
FG="$ROOT/target/release/flaggate"

# --- nginx: one process (master + workers) serving both the static upstream and the token-map proxy.
mkdir -p "$WORK/www/api/client" "$WORK/logs"
cp benches/load/features.json "$WORK/www/api/client/features"
common_http() { cat <<EOF
  access_log off;
  map_hash_bucket_size 128;
  default_type application/json;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 100000;
  client_body_temp_path $WORK/tmp_body; proxy_temp_path $WORK/tmp_proxy;
  fastcgi_temp_path $WORK/tmp_fcgi; uwsgi_temp_path $WORK/tmp_uwsgi; scgi_temp_path $WORK/tmp_scgi;
EOF
}
# The static upstream: what Unleash's /api/client/features would return. Its own nginx instance, so the
# proxies' CPU can be measured apart from it.
cat > "$WORK/static.conf" <<EOF
worker_processes auto;
pid $WORK/static.pid;
error_log $WORK/logs/static-error.log warn;
events { worker_connections 4096; }
http {
$(common_http)
  server { listen 127.0.0.1:$STATIC_PORT; location / { root $WORK/www; etag on; } }
}
EOF
# The hand-rolled gateway an operator might write: a map of tokens and proxy_pass with keep-alive.
# (map compares case-insensitively: it accepts an upper-cased token — sloppier than flaggate.)
cat > "$WORK/proxy.conf" <<EOF
worker_processes auto;
pid $WORK/proxy.pid;
error_log $WORK/logs/proxy-error.log warn;
events { worker_connections 4096; }
http {
$(common_http)
  map \$http_authorization \$token_ok { default 0; "$TOKEN" 1; }
  upstream static { server 127.0.0.1:$STATIC_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location /api/client/ {
      if (\$token_ok = 0) { return 401; }
      proxy_pass http://static;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
for c in static proxy; do
  "$NGINX" -c "$WORK/$c.conf" -p "$WORK" -e "$WORK/logs/$c-error.log" || { cat "$WORK/logs/$c-error.log"; exit 1; }
done
sleep 0.5
nginx_pids() { # master and workers of one instance
  local master
  master=$(cat "$WORK/$1.pid")
  echo "$master $(pgrep -P "$master" | tr '\n' ' ')"
}

# --- flaggate with a token file of N tokens (the benchmark token among them).
write_tokens() {
  local n=$1 f=$2
  python3 - "$n" "$TOKEN" > "$f" <<'PY'
import sys, hashlib
n, tok = int(sys.argv[1]), sys.argv[2]
out = ["tokens:", f'  - {{secret: "{tok}", type: client, environment: development}}']
for i in range(n - 1):
    h = hashlib.sha256(f"*:development.bench{i:056x}".encode()).hexdigest()
    out.append(f"  - {{sha256: {h}, type: client}}")
print("\n".join(out))
PY
}
fg_pid=""
start_flaggate() {
  local n=$1
  [ -n "$fg_pid" ] && { kill "$fg_pid"; wait "$fg_pid" 2>/dev/null || true; }
  write_tokens "$n" "$WORK/tokens-$n.yaml"
  "$FG" run --listen 127.0.0.1:$FG_PORT --admin-listen 127.0.0.1:$FG_ADMIN \
    --upstream http://127.0.0.1:$STATIC_PORT --token-file "$WORK/tokens-$n.yaml" --log-level warn \
    > "$WORK/logs/flaggate.log" 2>&1 &
  fg_pid=$!
  pids+=("$fg_pid")
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$FG_ADMIN/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "flaggate did not become ready"; tail -20 "$WORK/logs/flaggate.log"; exit 1
}

cpu_ticks() { # sum of utime+stime over pids, in clock ticks
  local t=0
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $t
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)

# run NAME PORT PIDS... -> prints one result line, appends "name rps" to results
run() {
  local name=$1 port=$2; shift 2
  local before after out rps p50 p99 reqs cpu_us
  before=$(cpu_ticks "$@")
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: $TOKEN" \
    "http://127.0.0.1:$port/api/client/features")
  after=$(cpu_ticks "$@")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
  cpu_us=$(python3 -c "print(f'{($after-$before)/$HZ*1e6/max($reqs,1):.1f}')")
  printf '%-28s %10s req/s   p50 %8s   p99 %8s   cpu/req %6s µs %s\n' "$name" "$rps" "$p50" "$p99" "$cpu_us" "${non2xx:+ NON-2XX: $non2xx}"
  echo "$name $rps $cpu_us" >> "$WORK/results"
}

start_flaggate 1000
echo "== sanity"
curl -s -o /dev/null -w "flaggate, valid token: %{http_code}\n" -H "Authorization: $TOKEN" "http://127.0.0.1:$FG_PORT/api/client/features"
curl -s -o /dev/null -w "static upstream: %{http_code}\n" "http://127.0.0.1:$STATIC_PORT/api/client/features"
curl -s -o /dev/null -w 'flaggate, upper-cased token: %{http_code}\n' -H "Authorization: ${TOKEN^^}" "http://127.0.0.1:$FG_PORT/api/client/features"
curl -s -o /dev/null -w 'nginx map,  upper-cased token: %{http_code}\n' -H "Authorization: ${TOKEN^^}" "http://127.0.0.1:$NGINX_PORT/api/client/features"

echo "== $ROUNDS rounds, alternating (wrk -t$THREADS -c$CONNECTIONS -d$DURATION), 1,000 tokens loaded"
for r in $(seq 1 "$ROUNDS"); do
  run "static nginx (direct)" $STATIC_PORT $(nginx_pids static)
  run "nginx token-map proxy" $NGINX_PORT $(nginx_pids proxy)
  run "flaggate" $FG_PORT "$fg_pid"
done

echo "== junk-token flood (random well-formed tokens, all 401)"
cat > "$WORK/junk.lua" <<'EOF'
math.randomseed(os.time())
request = function()
  local t = string.format("*:development.%08x%08x%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff), math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
  return wrk.format("GET", "/api/client/features", { ["Authorization"] = t })
end
EOF
up_before=$(curl -s "http://127.0.0.1:$FG_ADMIN/metrics" | awk '/^flaggate_upstream_duration_seconds_count/ {s+=$2} END {print s+0}')
rss_before=$(rss_kb "$fg_pid")
before=$(cpu_ticks "$fg_pid")
out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$WORK/junk.lua" "http://127.0.0.1:$FG_PORT/api/client/features")
after=$(cpu_ticks "$fg_pid")
up_after=$(curl -s "http://127.0.0.1:$FG_ADMIN/metrics" | awk '/^flaggate_upstream_duration_seconds_count/ {s+=$2} END {print s+0}')
rss_after=$(rss_kb "$fg_pid")
junk_rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
junk_reqs=$(echo "$out" | awk '/requests in/ {print $1}')
printf '%-28s %10s req/s   upstream requests %s   RSS %s → %s kB   cpu/req %s µs\n' "flaggate junk flood" "$junk_rps" \
  "$((up_after - up_before))" "$rss_before" "$rss_after" "$(python3 -c "print(f'{($after-$before)/$HZ*1e6/max($junk_reqs,1):.1f}')")"
echo "flaggate-junk $junk_rps 0" >> "$WORK/results"

for n in 10000 1000000; do
  echo "== valid token with $n tokens loaded"
  start_flaggate "$n"
  echo "   (RSS with $n tokens: $(rss_kb "$fg_pid") kB)"
  run "flaggate ($n tokens)" $FG_PORT "$fg_pid"
done

echo "== summary"
python3 - "$WORK/results" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    parts = line.rsplit(" ", 2)
    rows.setdefault(parts[0], []).append((float(parts[1]), float(parts[2])))
def med(name, i=0):
    v = [r[i] for r in rows.get(name, [])]
    return statistics.median(v) if v else float("nan")
fg, ng, st = med("flaggate"), med("nginx token-map proxy"), med("static nginx (direct)")
print(f"median req/s: static {st:,.0f}  nginx proxy {ng:,.0f}  flaggate {fg:,.0f}")
print(f"flaggate / nginx token-map proxy = {fg/ng:.2f}x   (target >= 1.2x)")
print(f"flaggate / Unleash Edge offline (7,900-8,300 req/s, issue figure) = {fg/8100:.1f}x   (target >= 3x)")
print(f"flaggate CPU per request: {med('flaggate', 1):.1f} µs   (target <= 25 µs)")
print(f"junk flood / valid = {med('flaggate-junk')/fg:.2f}x   (target >= 1.5x)")
m1k, m1m = fg, med("flaggate (1000000 tokens)")
print(f"1M tokens vs 1k tokens: {m1m/m1k:.3f}x   (target within 5%)")
PY
