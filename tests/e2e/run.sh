#!/usr/bin/env bash
# flaggate end-to-end suite: a REAL Unleash 7.5.1 on PostgreSQL 15, real SDKs (Node unleash-client,
# Python UnleashClient, browser unleash-proxy-client in headless Chromium), all through flaggate in
# Unleash-sync mode. flaggate reaches Unleash over https:// only: nginx terminates TLS in front of
# Unleash (throwaway CA, regenerated each run) and flaggate trusts it through --upstream-ca, so token
# sync, PAT checks and every forwarded request cross a real TLS hop. flaggate runs with its shield on (short
# TTL, documents persisted in its state dir); check g proves it against real SDKs, through a 2-minute
# Unleash outage and a flaggate restart during it. See tests/e2e/README.md.
#
#   bash tests/e2e/run.sh            # as root on Debian 12 (installs what is missing)
#
# Installs when missing: postgresql + chromium + nginx (apt), unleash-server@7.5.1 + unleash-client +
# unleash-proxy-client (npm, into tests/e2e/work/node), UnleashClient (pip, venv tests/e2e/work/venv).
# Everything runs on 127.0.0.1; every process it starts is stopped by PID on exit, pass or fail.
# No fixed ports: PostgreSQL listens on a Unix socket only, and Unleash, flaggate and the page server
# bind port 0; the script reads the port each one got (a fixed port can be taken by any outgoing
# connection's ephemeral port, even one of Unleash's own to PostgreSQL). nginx cannot listen on port 0,
# so its TLS port is picked below the kernel's ephemeral range (where no outgoing connection can take
# it), checked free, and re-picked if nginx still fails to bind it (see pick_tls_port). A restart during
# the outage check reuses the port the process had. E2E_FLAGGATE_BIN skips `cargo build` and uses that
# binary.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=$HERE/work
RUN=$WORK/run
T0=$(date +%s)

SYNC_INTERVAL_S=1

# The shield (check g): flaggate answers SDK feature polls from its per-token cache, revalidated with
# Unleash's ETag once a document is older than the TTL; documents persisted in --state-dir. A short TTL
# keeps the freshness checks fast. Check g runs SHIELD_NODE_N Node and SHIELD_PY_N Python SDK instances
# polling every SHIELD_POLL_S, stops Unleash and nginx for SHIELD_OUTAGE_S and restarts flaggate
# SHIELD_RESTART_AT_S into it.
SHIELD_TTL_S=2
SHIELD_POLL_S=1
SHIELD_NODE_N=5
SHIELD_PY_N=3
SHIELD_OUTAGE_S=120
SHIELD_RESTART_AT_S=55

# Filled in from the port each server got (0 = let the kernel choose, on the first start).
UNLEASH_PORT=0 GW_PORT=0 GW_ADMIN_PORT=0
UNLEASH="" GATEWAY="" GATEWAY_ADMIN="" PAGE=""
# nginx's TLS port (0 = not picked yet) and the https:// URL flaggate uses as its upstream.
TLS_PORT=0
UPSTREAM=""

# Initial tokens (format project:environment.secret), applied by Unleash to its empty token table.
ADMIN_TOKEN='*:*.e2e-admin-5f0c2a9d7b3e4c1a8d6f'
BACKEND_TOKEN='*:development.e2e-backend-3b8e1f6a0c9d2e7b4a5c'
FRONTEND_TOKEN='default:development.e2e-frontend-9a4d7c2e1b8f3a6d0e5b'

PG_BIN=/usr/lib/postgresql/15/bin
NPM_PACKAGES="unleash-server@7.5.1 unleash-client unleash-proxy-client"

FLAGGATE_LOG=$RUN/flaggate.log
UNLEASH_LOG=$RUN/unleash.log
CHECKS_OUT=$RUN/checks.out
TLS_DIR=$RUN/tls                      # throwaway CA + server certificate, made fresh each run
NGINX_DIR=$RUN/nginx                  # generated nginx.conf, pid file, temp dirs
NGINX_ERROR_LOG=$RUN/nginx-error.log
NGINX_ACCESS_LOG=$RUN/nginx-access.log

PG_DIR=""
FLAGGATE_PID=""
UNLEASH_PID=""
PAGE_PID=""
NGINX_PID=""
NOCA_PID="" # the short-lived flaggate without --upstream-ca (TLS check)
SHIELD_NODE_PID="" SHIELD_PY_PID="" # the SDK watchers of the shield check

say() { printf '%s [%3ss] %s\n' "==" "$(($(date +%s) - T0))" "$*"; }
die() {
  echo "e2e: ERROR: $*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------------
# cleanup: stop by PID everything this script started (also on failure / Ctrl-C)

stop_pid() { # stop_pid PID NAME: SIGTERM, wait up to 15 s, then SIGKILL
  local pid=$1 name=$2 _
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "e2e: $name (pid $pid) did not stop on SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

as_pg() { # run a PostgreSQL tool as the unprivileged `postgres` user when we are root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

print_logs() {
  echo "---------------- last 40 lines of flaggate's log ($FLAGGATE_LOG)"
  tail -n 40 "$FLAGGATE_LOG" 2>/dev/null || echo "(none)"
  echo "---------------- last 40 lines of Unleash's log ($UNLEASH_LOG)"
  tail -n 40 "$UNLEASH_LOG" 2>/dev/null || echo "(none)"
  echo "---------------- last 20 lines of nginx's error log ($NGINX_ERROR_LOG)"
  tail -n 20 "$NGINX_ERROR_LOG" 2>/dev/null || echo "(none)"
  echo "----------------"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ "$rc" != 0 ] && [ -z "${SUMMARY_DONE:-}" ]; then
    echo "e2e: aborted (exit $rc) before the checks finished"
    print_logs
  fi
  stop_pid "$NOCA_PID" "flaggate (no --upstream-ca)"
  stop_pid "$SHIELD_NODE_PID" "shield Node SDKs"
  stop_pid "$SHIELD_PY_PID" "shield Python SDKs"
  stop_pid "$FLAGGATE_PID" flaggate
  stop_pid "$NGINX_PID" nginx
  stop_pid "$UNLEASH_PID" unleash
  stop_pid "$PAGE_PID" http.server
  if [ -n "$PG_DIR" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 ||
      as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------------
# helpers

wait_file_line() { # wait_file_line FILE REGEX SKIP SECONDS: print the first line after SKIP lines matching REGEX
  local file=$1 re=$2 skip=$3 secs=$4 line deadline
  deadline=$(($(date +%s) + secs))
  while :; do
    line=$(tail -n +"$((skip + 1))" "$file" 2>/dev/null | grep -m1 -E "$re" || true)
    [ -n "$line" ] && {
      echo "$line"
      return 0
    }
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.1
  done
}

wait_http() { # wait_http URL STATUS SECONDS
  local url=$1 want=$2 secs=$3 got deadline
  deadline=$(($(date +%s) + secs))
  while :; do
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    [ "$got" = "$want" ] && return 0
    [ "$(date +%s)" -ge "$deadline" ] && {
      echo "e2e: $url did not answer $want within ${secs}s (last: $got)" >&2
      return 1
    }
    sleep 0.2
  done
}

# Services started while a check runs must not inherit the check's output pipe (tee would never see EOF).
close_check_fd() { if [ -n "${CHECK_FD:-}" ]; then eval "exec ${CHECK_FD}>&-"; fi; }

start_unleash() {
  local skip line
  skip=$(wc -l <"$UNLEASH_LOG")
  (
    close_check_fd
    cd "$RUN"
    export E2E_NODE_DIR="$WORK/node" NODE_ENV=production \
      DATABASE_HOST="$PG_SOCKET_DIR" DATABASE_PORT=5432 DATABASE_USERNAME=postgres DATABASE_NAME=unleash \
      DATABASE_SSL=false HTTP_HOST=127.0.0.1 HTTP_PORT="$UNLEASH_PORT" \
      CHECK_VERSION=false SEND_TELEMETRY=false LOG_LEVEL=info \
      INIT_ADMIN_API_TOKENS="$ADMIN_TOKEN" INIT_BACKEND_API_TOKENS="$BACKEND_TOKEN" \
      INIT_CLIENT_API_TOKENS="$BACKEND_TOKEN" INIT_FRONTEND_API_TOKENS="$FRONTEND_TOKEN"
    exec node "$HERE/unleash.mjs"
  ) >>"$UNLEASH_LOG" 2>&1 &
  UNLEASH_PID=$!
  line=$(wait_file_line "$UNLEASH_LOG" '^e2e: unleash-server listening on ' "$skip" 90) ||
    die "Unleash did not start listening within 90s"
  UNLEASH_PORT=${line##*:}
  UNLEASH=http://127.0.0.1:$UNLEASH_PORT
  wait_http "$UNLEASH/health" 200 30 || die "Unleash did not become healthy"
}

exec_flaggate() { # exec_flaggate PORT ADMIN_PORT STATE_DIR [FLAG...]: becomes flaggate (call in a subshell)
  # Only the flags below configure it: no FLAGGATE_* from the caller's environment. Its upstream is
  # nginx's https:// URL, never Unleash's plain port.
  local port=$1 admin_port=$2 state_dir=$3
  shift 3
  close_check_fd
  for v in $(compgen -e | grep '^FLAGGATE_' || true); do unset "$v"; done
  export RUST_LOG=info
  exec "$FLAGGATE" run --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --upstream "$UPSTREAM" --upstream-token "$ADMIN_TOKEN" --sync-interval "${SYNC_INTERVAL_S}s" \
    --state-dir "$state_dir" --log-format json "$@"
}

start_flaggate() { # the suite's flaggate: shield on (short TTL), its documents persisted in the state dir
  local skip
  skip=$(wc -l <"$FLAGGATE_LOG")
  (exec_flaggate "$GW_PORT" "$GW_ADMIN_PORT" "$RUN/flaggate-state" --upstream-ca "$TLS_DIR/ca.pem" \
    --shield on --shield-ttl "${SHIELD_TTL_S}s" --shield-persist on) \
    >>"$RUN/flaggate.stdout" 2>>"$FLAGGATE_LOG" &
  FLAGGATE_PID=$!
  # Its start line names the addresses it bound: {"message":"flaggate started","listen":"127.0.0.1:N",...}
  local line
  line=$(wait_file_line "$FLAGGATE_LOG" '"message":"flaggate started"' "$skip" 30) ||
    die "flaggate did not start within 30s"
  GW_PORT=$(sed -E 's/.*"listen":"127\.0\.0\.1:([0-9]+)".*/\1/' <<<"$line")
  GW_ADMIN_PORT=$(sed -E 's/.*"admin_listen":"127\.0\.0\.1:([0-9]+)".*/\1/' <<<"$line")
  GATEWAY=http://127.0.0.1:$GW_PORT
  GATEWAY_ADMIN=http://127.0.0.1:$GW_ADMIN_PORT
}

# --- TLS in front of Unleash: a throwaway CA, nginx as the terminator -------------------------------

make_tls() { # a fresh CA and a server certificate for 127.0.0.1/localhost in $TLS_DIR (every run)
  rm -rf "$TLS_DIR"
  mkdir -p "$TLS_DIR"
  (
    set -e
    cd "$TLS_DIR"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 2 \
      -keyout ca.key -out ca.pem -subj "/CN=flaggate e2e throwaway CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
      -keyout server.key -out server.csr -subj "/CN=127.0.0.1"
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
      'extendedKeyUsage=serverAuth' 'subjectAltName=IP:127.0.0.1,DNS:localhost' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
      -days 2 -sha256 -extfile server.ext -out server.pem
    openssl verify -CAfile ca.pem server.pem
  ) >"$RUN/openssl.log" 2>&1 || {
    cat "$RUN/openssl.log"
    die "could not make the throwaway CA / server certificate"
  }
  chmod 600 "$TLS_DIR/ca.key" "$TLS_DIR/server.key"
}

# nginx cannot listen on port 0, so the no-fixed-ports rule is kept as far as it can be: the port is
# chosen at random BELOW the kernel's ephemeral range (net.ipv4.ip_local_port_range), where no outgoing
# connection can take it (the reason this script avoids fixed ports), checked free by binding it, and
# start_nginx picks another if nginx still finds it taken (another listener raced us). Staying out of
# the ephemeral range also keeps the outage check's nginx restart on the same port safe.
pick_tls_port() {
  python3 - <<'PY'
import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports = list(range(max(1024, lo - 12000), lo))
random.shuffle(ports)
for port in ports[:500]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:  # nothing free below the range (odd kernel settings): let the kernel choose one in it
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()
PY
}

write_nginx_conf() { # for $TLS_PORT -> $UNLEASH_PORT; every path inside $RUN (no system dirs)
  mkdir -p "$NGINX_DIR/tmp"
  cat >"$NGINX_DIR/nginx.conf" <<EOF
# Generated by tests/e2e/run.sh: TLS terminator in front of Unleash, for flaggate's https:// upstream.
worker_processes 1;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_ERROR_LOG info; # info: TLS handshake failures are logged too
events { worker_connections 512; }
http {
    # The SSL protocol per request proves it came over TLS; only flaggate talks to this port (besides
    # run.sh's own GET /health readiness probe). app, inm (If-None-Match) and ts (Unix seconds) let the
    # shield check attribute flaggate's feature requests to the SDKs' keys and see they are conditional.
    log_format e2e '\$ssl_protocol "\$request" \$status upstream=\$upstream_status ua="\$http_user_agent" t=\$request_time app="\$http_unleash_appname" inm="\$http_if_none_match" ts=\$msec';
    access_log $NGINX_ACCESS_LOG e2e;
    client_body_temp_path $NGINX_DIR/tmp/client_body;
    proxy_temp_path $NGINX_DIR/tmp/proxy;
    fastcgi_temp_path $NGINX_DIR/tmp/fastcgi;
    uwsgi_temp_path $NGINX_DIR/tmp/uwsgi;
    scgi_temp_path $NGINX_DIR/tmp/scgi;
    server_tokens off;

    upstream unleash {
        server 127.0.0.1:$UNLEASH_PORT;
        keepalive 16;
        keepalive_timeout 4s; # below Node's 5 s idle timeout: never reuse a connection Unleash is closing
    }
    server {
        listen 127.0.0.1:$TLS_PORT ssl;
        server_name 127.0.0.1 localhost;
        ssl_certificate $TLS_DIR/server.pem;
        ssl_certificate_key $TLS_DIR/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://unleash;
            proxy_http_version 1.1;
            proxy_set_header Connection "";   # keep-alive to Unleash
            proxy_set_header Host \$http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }
    }
}
EOF
}

start_nginx() { # the first start picks $TLS_PORT; a restart (outage check) keeps it: it is flaggate's upstream
  local attempt skip code=""
  for attempt in 1 2 3 4 5; do
    [ "$TLS_PORT" != 0 ] || TLS_PORT=$(pick_tls_port)
    write_nginx_conf
    skip=$(wc -l <"$NGINX_ERROR_LOG")
    (
      close_check_fd
      exec "$NGINX" -e "$NGINX_ERROR_LOG" -c "$NGINX_DIR/nginx.conf" -g 'daemon off;'
    ) >>"$NGINX_ERROR_LOG" 2>&1 &
    NGINX_PID=$!
    for _ in $(seq 1 100); do # up to 10 s: until the TLS port answers (checked with our CA) or nginx exits
      kill -0 "$NGINX_PID" 2>/dev/null || break
      code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$TLS_DIR/ca.pem" \
        "https://127.0.0.1:$TLS_PORT/health" || true)
      if [ "$code" = 200 ]; then
        UPSTREAM=https://127.0.0.1:$TLS_PORT
        return 0
      fi
      sleep 0.1
    done
    if kill -0 "$NGINX_PID" 2>/dev/null; then
      die "nginx on 127.0.0.1:$TLS_PORT does not answer GET /health with 200 over TLS (last: $code)"
    fi
    wait "$NGINX_PID" 2>/dev/null || true
    NGINX_PID=""
    if [ -z "$UPSTREAM" ] && tail -n +"$((skip + 1))" "$NGINX_ERROR_LOG" | grep -q 'Address already in use'; then
      echo "e2e: nginx: port $TLS_PORT was taken after all (attempt $attempt); picking another" >&2
      TLS_PORT=0
      continue
    fi
    tail -n 20 "$NGINX_ERROR_LOG" >&2
    die "nginx did not start on 127.0.0.1:$TLS_PORT (see $NGINX_ERROR_LOG)"
  done
  die "nginx: no free port after 5 attempts"
}

# ---------------------------------------------------------------------------------------------------
# 1. install what is missing

export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ next to the checks
say "install (only what is missing)"
export DEBIAN_FRONTEND=noninteractive
apt_need=()
command -v curl >/dev/null 2>&1 || apt_need+=(curl)
[ -x "$PG_BIN/initdb" ] || apt_need+=(postgresql)
command -v chromium >/dev/null 2>&1 || apt_need+=(chromium)
NGINX=$(command -v nginx || echo /usr/sbin/nginx) # /usr/sbin may not be on a non-root PATH
[ -x "$NGINX" ] || apt_need+=(nginx)
command -v openssl >/dev/null 2>&1 || apt_need+=(openssl)
command -v node >/dev/null 2>&1 || apt_need+=(nodejs npm)
if [ ${#apt_need[@]} -gt 0 ]; then
  say "apt-get install ${apt_need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${apt_need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || [ -n "${E2E_FLAGGATE_BIN:-}" ] || die "cargo not found"

mkdir -p "$WORK/node"
if [ "$(cat "$WORK/node/.e2e-installed" 2>/dev/null)" != "$NPM_PACKAGES" ] ||
  [ ! -f "$WORK/node/node_modules/unleash-server/package.json" ]; then
  say "npm install $NPM_PACKAGES"
  [ -f "$WORK/node/package.json" ] || echo '{"name":"flaggate-e2e-deps","private":true}' >"$WORK/node/package.json"
  (cd "$WORK/node" && npm install --no-audit --no-fund --loglevel=error $NPM_PACKAGES)
  echo "$NPM_PACKAGES" >"$WORK/node/.e2e-installed"
fi
if ! "$WORK/venv/bin/python" -c 'import UnleashClient' >/dev/null 2>&1; then
  say "pip install UnleashClient (venv $WORK/venv)"
  rm -rf "$WORK/venv"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q UnleashClient
fi

if [ -n "${E2E_FLAGGATE_BIN:-}" ]; then
  FLAGGATE=$E2E_FLAGGATE_BIN
else
  say "cargo build"
  (cd "$ROOT" && cargo build)
  FLAGGATE=$ROOT/target/debug/flaggate
fi
[ -x "$FLAGGATE" ] || die "no flaggate binary at $FLAGGATE"

PG_DIR=$WORK/pg
if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$WORK"; then
  PG_DIR=/tmp/flaggate-e2e-pg # the checkout is not reachable for `postgres`
fi
if [ ${#PG_DIR} -gt 70 ]; then # its socket path must stay under 108 bytes
  PG_DIR=/tmp/flaggate-e2e-pg-$(id -u)
fi
PG_SOCKET_DIR=$PG_DIR/socket
if [ -f "$PG_DIR/data/postmaster.pid" ]; then # left over by a killed run: stop that cluster (ours)
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
fi
rm -rf "$RUN"
mkdir -p "$RUN/flaggate-state" "$RUN/www" "$NGINX_DIR"
: >"$FLAGGATE_LOG"
: >"$UNLEASH_LOG"
: >"$CHECKS_OUT"
: >"$NGINX_ERROR_LOG"
: >"$NGINX_ACCESS_LOG"

# ---------------------------------------------------------------------------------------------------
# 2. PostgreSQL: a fresh cluster owned by `postgres`, on a Unix socket only (no TCP), trust auth

say "PostgreSQL 15: fresh cluster on $PG_SOCKET_DIR"
rm -rf "$PG_DIR"
mkdir -p "$PG_SOCKET_DIR"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$PG_DIR"
as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 -N >"$RUN/initdb.log" 2>&1 ||
  {
    cat "$RUN/initdb.log"
    die "initdb failed"
  }
as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
  -o "-c listen_addresses='' -c port=5432 -c unix_socket_directories='$PG_SOCKET_DIR' -c fsync=off" start >/dev/null
"$PG_BIN/psql" -h "$PG_SOCKET_DIR" -p 5432 -U postgres -qc 'CREATE DATABASE unleash' >/dev/null

# ---------------------------------------------------------------------------------------------------
# 3. Unleash 7.5.1, seeded through its admin API

say "Unleash 7.5.1 starting"
start_unleash
say "Unleash healthy on $UNLEASH; seeding flags and tokens through its admin API"

export E2E_STATE=$RUN/state.json E2E_NODE_DIR=$WORK/node
cat >"$E2E_STATE" <<EOF
{
  "unleash": "$UNLEASH",
  "chromium": "$(command -v chromium)",
  "work": "$RUN",
  "flaggate_log": "$FLAGGATE_LOG",
  "sync_interval_s": $SYNC_INTERVAL_S,
  "shield": {"ttl_s": $SHIELD_TTL_S, "poll_s": $SHIELD_POLL_S, "node_instances": $SHIELD_NODE_N, "python_instances": $SHIELD_PY_N},
  "tokens": {"admin": "$ADMIN_TOKEN", "backend": "$BACKEND_TOKEN", "frontend": "$FRONTEND_TOKEN"}
}
EOF
PY=$WORK/venv/bin/python
(cd "$HERE" && "$PY" setup.py)

# ---------------------------------------------------------------------------------------------------
# 4. nginx terminating TLS in front of Unleash; flaggate in Unleash-sync mode behind it (https:// only);
#    the static page origin for the browser check

say "TLS: throwaway CA + certificate for 127.0.0.1/localhost in $TLS_DIR; nginx in front of Unleash"
make_tls
start_nginx
say "nginx terminates TLS on $UPSTREAM -> $UNLEASH"

say "flaggate in Unleash-sync mode (every ${SYNC_INTERVAL_S}s), upstream $UPSTREAM with --upstream-ca, shield TTL ${SHIELD_TTL_S}s, persisted"
start_flaggate
say "flaggate on $GATEWAY (admin $GATEWAY_ADMIN)"
wait_http "$GATEWAY_ADMIN/ready" 200 30 || die "flaggate never became ready"

cp "$HERE/browser/index.html" "$WORK/node/node_modules/unleash-proxy-client/build/main.min.js" "$RUN/www/"
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$RUN/www" >"$RUN/page-server.log" 2>&1 &
PAGE_PID=$!
line=$(wait_file_line "$RUN/page-server.log" '^Serving HTTP on ' 0 15) || die "static page server did not start"
PAGE=http://127.0.0.1:$(sed -E 's/.* port ([0-9]+) .*/\1/' <<<"$line")
wait_http "$PAGE/index.html" 200 15 || die "static page server does not answer"

# The gateway and page addresses are known only now: add them to the state the checks read.
(cd "$HERE" && "$PY" -c 'import sys; from e2e import load_state, save_state
s = load_state(); s["gateway"], s["gateway_admin"], s["page"], s["upstream"] = sys.argv[1:5]; save_state(s)' \
  "$GATEWAY" "$GATEWAY_ADMIN" "$PAGE" "$UPSTREAM")

# ---------------------------------------------------------------------------------------------------
# 5. the checks

FAILED_CHECKS=()
cd "$HERE"
run_check() { # run_check NAME COMMAND...: its PASS/FAIL lines go to the console and $CHECKS_OUT
  # Runs in this shell (no pipeline subshell): the outage check stops and starts processes whose PIDs
  # the EXIT trap must know.
  local name=$1 rc before
  shift
  say "check $name"
  before=$(grep -c '^FAIL ' "$CHECKS_OUT" || true)
  local tee_pid
  exec {CHECK_FD}> >(tee -a "$CHECKS_OUT")
  tee_pid=$!
  set +e
  "$@" >&"$CHECK_FD" 2>&1
  rc=$?
  set -e
  exec {CHECK_FD}>&-
  CHECK_FD=""
  wait "$tee_pid" 2>/dev/null || true # tee has written everything
  if [ "$rc" != 0 ] && [ "$(grep -c '^FAIL ' "$CHECKS_OUT" || true)" = "$before" ]; then
    echo "FAIL $name: exited $rc without a FAIL line (crashed?)" | tee -a "$CHECKS_OUT"
  fi
  [ "$rc" = 0 ] || FAILED_CHECKS+=("$name")
}
gw_expect() { "$PY" "$HERE/e2e.py" expect "$@"; }

# Check e is about what flaggate does with a request it FORWARDS while Unleash is down (status mapping,
# readiness, the token snapshot). With the shield on, a poll of the client token's warm key would be
# answered from the cache instead (check g proves that), so the polls below that must reach the
# forwarding path send `Cache-Control: no-cache`: the shield's documented bypass (reason no_cache),
# forwarded exactly as without the shield. Unknown-token polls need no bypass (denied first).
NO_CACHE='Cache-Control: no-cache'
outage() {
  local client=$1 junk="*:development.e2e-junk-during-outage" pid_before rc=0 new got skip
  # First only Unleash goes down: the TLS terminator still answers, with its own 502 page.
  say "stopping Unleash (pid $UNLEASH_PID); nginx stays up"
  skip=$(wc -l <"$FLAGGATE_LOG")
  stop_pid "$UNLEASH_PID" unleash
  UNLEASH_PID=""
  got=$(curl -s -o "$RUN/outage-nginx-502.body" -w '%{http_code}' -H "Authorization: $client" -H "$NO_CACHE" \
    "$GATEWAY/api/client/features" || true)
  if [ "$got" = 502 ] && grep -q '<center>nginx</center>' "$RUN/outage-nginx-502.body"; then
    echo "PASS e. outage: Unleash down behind nginx: known token -> 502 (nginx's own page, passed through; not 401)"
  else
    echo "FAIL e. outage: Unleash down behind nginx: known token -> $got, expected 502: $(head -c 200 "$RUN/outage-nginx-502.body")"
    rc=1
  fi
  if got=$(wait_file_line "$FLAGGATE_LOG" 'token sync failing' "$skip" 10); then
    echo "PASS e. outage: Unleash down behind nginx: flaggate's sync saw it fail ($(sed -nE 's/.*"error":"([^"]*)".*/\1/p' <<<"$got"))"
  else
    echo "FAIL e. outage: Unleash down behind nginx: no 'token sync failing' line within 10s"
    rc=1
  fi
  gw_expect "e. outage: Unleash down behind nginx: flaggate stays ready (/ready 200)" \
    GET "$GATEWAY_ADMIN/ready" 200 --json-key ready=true || rc=1

  # Then the terminator too: flaggate's upstream is unreachable.
  say "stopping nginx (pid $NGINX_PID): flaggate's upstream is unreachable"
  stop_pid "$NGINX_PID" nginx
  NGINX_PID=""
  gw_expect "e. outage: known token on /api/client/features -> 502 upstream_unreachable (not 401)" \
    GET "$GATEWAY/api/client/features" 502 --token "$client" --header "$NO_CACHE" --code upstream_unreachable || rc=1
  gw_expect "e. outage: flaggate stays ready (/ready 200)" GET "$GATEWAY_ADMIN/ready" 200 --json-key ready=true || rc=1
  gw_expect "e. outage: unknown token -> 401 unknown_token" \
    GET "$GATEWAY/api/client/features" 401 --token "$junk" --code unknown_token || rc=1

  say "restarting flaggate during the outage (same --state-dir)"
  stop_pid "$FLAGGATE_PID" flaggate
  local snap_before
  snap_before=$(grep -c 'serving the token snapshot' "$FLAGGATE_LOG" || true)
  start_flaggate
  gw_expect "e. outage: restarted flaggate is ready from its snapshot (/ready 200)" \
    GET "$GATEWAY_ADMIN/ready" 200 --json-key ready=true --within 15 || rc=1
  local snap_after
  snap_after=$(grep -c 'serving the token snapshot' "$FLAGGATE_LOG" || true)
  if [ "$snap_after" -gt "$snap_before" ]; then
    echo "PASS e. outage: restarted flaggate logged that it serves the token snapshot"
  else
    echo "FAIL e. outage: no 'serving the token snapshot' line after the restart"
    rc=1
  fi
  gw_expect "e. outage: after restart, known token -> 502 upstream_unreachable" \
    GET "$GATEWAY/api/client/features" 502 --token "$client" --header "$NO_CACHE" --code upstream_unreachable || rc=1
  gw_expect "e. outage: after restart, junk token -> 401 unknown_token" \
    GET "$GATEWAY/api/client/features" 401 --token "$junk" --code unknown_token || rc=1

  # Not asserted (README does not say): a PAT this process never validated, while Unleash is down.
  echo "     e. outage: (info) PAT first seen during the outage, GET /api/admin/projects -> $(curl -s \
    -H "Authorization: $PAT_TOKEN" -w ' %{http_code}' "$GATEWAY/api/admin/projects")"

  pid_before=$FLAGGATE_PID
  say "starting Unleash again (same database), then nginx (same TLS port)"
  start_unleash
  start_nginx
  gw_expect "e. outage: Unleash back -> known token 200 through the same flaggate process" \
    GET "$GATEWAY/api/client/features" 200 --token "$client" --header "$NO_CACHE" --has-key features --within 10 || rc=1
  if [ "$FLAGGATE_PID" = "$pid_before" ] && kill -0 "$FLAGGATE_PID" 2>/dev/null; then
    echo "PASS e. outage: flaggate was not restarted for the recovery (pid $FLAGGATE_PID)"
  else
    echo "FAIL e. outage: flaggate process changed or died during recovery"
    rc=1
  fi
  # The token sync recovers too: a token created now gets through once flaggate has synced again.
  new=$(curl -sS -X POST -H "Authorization: $ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d '{"tokenName":"e2e-after-outage","type":"client","projects":["*"],"environment":"development"}' \
    "$UNLEASH/api/admin/api-tokens" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["secret"])') || {
    echo "FAIL e. outage: could not create a token after the restart"
    return 1
  }
  gw_expect "e. outage: token sync recovered (token created after the outage -> 200)" \
    GET "$GATEWAY/api/client/features" 200 --token "$new" --has-key features --within 40 || rc=1
  gw_expect "e. outage: frontend token -> 200 again" \
    GET "$GATEWAY/api/frontend" 200 --token "$FRONTEND_TOKEN" --has-key toggles || rc=1
  return $rc
}

tls_check() {
  local rc=0 n line noca_log=$RUN/flaggate-noca.log noca_admin noca_gw skip_err
  # 1. Everything flaggate asked of Unleash went through nginx over TLS. Only flaggate talks to nginx's
  #    port (besides start_nginx's curl GET /health), so these access-log lines are flaggate's requests.
  tls_seen() { # tls_seen DESCRIPTION REGEX-after-the-protocol: PASS when nginx logged it over TLS
    n=$(grep -cE "^TLSv1\.[23] $2" "$NGINX_ACCESS_LOG" || true)
    if [ "$n" -gt 0 ]; then
      echo "PASS f. tls: $1 reached Unleash through nginx over TLS ($n in nginx's access log)"
    else
      echo "FAIL f. tls: $1: no such request over TLS in $NGINX_ACCESS_LOG"
      rc=1
    fi
  }
  tls_seen "token sync: GET /api/admin/api-tokens -> 200" '"GET /api/admin/api-tokens HTTP/1\.1" 200 '
  tls_seen "token sync: GET /api/admin/api-tokens -> 304 (ETag revalidation through the terminator)" \
    '"GET /api/admin/api-tokens HTTP/1\.1" 304 '
  tls_seen "PAT validation: GET /api/admin/user" '"GET /api/admin/user HTTP/1\.1" 200 '
  tls_seen "SDK: GET /api/client/features" '"GET /api/client/features[ ?]'
  tls_seen "SDK: POST /api/client/register" '"POST /api/client/register '
  tls_seen "SDK: POST /api/client/metrics" '"POST /api/client/metrics '
  tls_seen "browser SDK: GET /api/frontend" '"GET /api/frontend[ ?]'
  tls_seen "browser SDK: OPTIONS /api/frontend (preflight)" '"OPTIONS /api/frontend[ ?]'
  n=$(grep -cvE '^TLSv1\.[23] ' "$NGINX_ACCESS_LOG" || true)
  if [ "$n" = 0 ]; then
    echo "PASS f. tls: every request nginx logged came over TLS 1.2/1.3 ($(wc -l <"$NGINX_ACCESS_LOG") lines, $(grep -c '^TLSv1\.3 ' "$NGINX_ACCESS_LOG" || true) TLSv1.3)"
  else
    echo "FAIL f. tls: $n request(s) in nginx's access log without TLS 1.2/1.3: $(grep -vE '^TLSv1\.[23] ' "$NGINX_ACCESS_LOG" | head -3)"
    rc=1
  fi
  gw_expect "f. tls: flaggate with --upstream-ca is ready (/ready 200: synced over TLS)" \
    GET "$GATEWAY_ADMIN/ready" 200 --json-key ready=true || rc=1
  local scrape unchanged
  scrape=$(curl -s "$GATEWAY_ADMIN/metrics")
  n=$(sed -nE 's/^flaggate_token_sync_total\{result="ok"\} ([0-9.e+]+)$/\1/p' <<<"$scrape")
  unchanged=$(sed -nE 's/^flaggate_token_sync_total\{result="unchanged"\} ([0-9.e+]+)$/\1/p' <<<"$scrape")
  if [ -n "$n" ] && [ "${n%%.*}" -ge 1 ] 2>/dev/null; then
    echo "PASS f. tls: flaggate counts successful syncs over TLS (flaggate_token_sync_total ok=$n unchanged=${unchanged:-0})"
  else
    echo "FAIL f. tls: flaggate_token_sync_total{result=\"ok\"} is '$n', expected >= 1"
    rc=1
  fi

  # 2. Negative: the same https:// upstream WITHOUT --upstream-ca (platform roots only) never syncs.
  #    A token file makes the client token known to it, so a request of that token reaches the
  #    forwarding step (and readiness still waits for the Unleash list: it stays 503).
  say "a second flaggate without --upstream-ca against $UPSTREAM"
  : >"$noca_log"
  mkdir -p "$RUN/flaggate-noca-state"
  cat >"$RUN/flaggate-noca-tokens.yaml" <<EOF
tokens:
  - sha256: "$(printf %s "$CLIENT_TOKEN" | sha256sum | cut -d' ' -f1)"
    type: client
    environment: development
    projects: ["*"]
    name: e2e-noca-client
EOF
  skip_err=$(wc -l <"$NGINX_ERROR_LOG")
  (exec_flaggate 0 0 "$RUN/flaggate-noca-state" --token-file "$RUN/flaggate-noca-tokens.yaml") \
    >>"$RUN/flaggate-noca.stdout" 2>>"$noca_log" &
  NOCA_PID=$!
  if ! line=$(wait_file_line "$noca_log" '"message":"flaggate started"' 0 30); then
    echo "FAIL f. tls: flaggate without --upstream-ca did not start: $(tail -n 5 "$noca_log")"
    stop_pid "$NOCA_PID" "flaggate (no --upstream-ca)"
    NOCA_PID=""
    return 1
  fi
  noca_gw=http://127.0.0.1:$(sed -E 's/.*"listen":"127\.0\.0\.1:([0-9]+)".*/\1/' <<<"$line")
  noca_admin=http://127.0.0.1:$(sed -E 's/.*"admin_listen":"127\.0\.0\.1:([0-9]+)".*/\1/' <<<"$line")
  if line=$(wait_file_line "$noca_log" 'token sync failing' 0 15); then
    if grep -qiE 'tls|certificate|UnknownIssuer' <<<"$line"; then
      echo "PASS f. tls: without --upstream-ca the sync fails and the log says why: $(sed -nE 's/.*"error":"([^"]*)".*/\1/p' <<<"$line" | head -c 300)"
    else
      echo "FAIL f. tls: without --upstream-ca the sync failed, but the log does not mention TLS: $line"
      rc=1
    fi
  else
    echo "FAIL f. tls: without --upstream-ca: no 'token sync failing' line within 15s: $(tail -n 5 "$noca_log")"
    rc=1
  fi
  gw_expect "f. tls: without --upstream-ca: not ready (/ready 503)" GET "$noca_admin/ready" 503 || rc=1
  sleep 3 # several sync attempts later (backoff from 1 s): still not ready
  gw_expect "f. tls: without --upstream-ca: still not ready 3 s later (/ready 503)" GET "$noca_admin/ready" 503 || rc=1
  gw_expect "f. tls: without --upstream-ca: known client token -> 502 upstream_tls (never forwarded in clear)" \
    GET "$noca_gw/api/client/features" 502 --token "$CLIENT_TOKEN" --code upstream_tls || rc=1
  # A PAT cannot be verified over the untrusted connection: 502, saying why.
  gw_expect "f. tls: without --upstream-ca: a PAT cannot be verified -> 502 upstream_tls" \
    GET "$noca_gw/api/admin/projects" 502 --token "$PAT_TOKEN" --code upstream_tls || rc=1
  if wait_file_line "$NGINX_ERROR_LOG" 'SSL_do_handshake\(\) failed.*(unknown ca|bad certificate|certificate unknown)' \
    "$skip_err" 5 >/dev/null; then
    echo "PASS f. tls: nginx logged the refused handshakes (client alert: unknown CA)"
  else
    echo "FAIL f. tls: nginx's error log shows no refused handshake: $(tail -n +"$((skip_err + 1))" "$NGINX_ERROR_LOG" | tail -n 3)"
    rc=1
  fi
  stop_pid "$NOCA_PID" "flaggate (no --upstream-ca)"
  NOCA_PID=""
  return $rc
}

# Check g: the shield against the real Unleash (shield.py has the assertions, step by step; this function
# owns the processes: the SDK watchers, Unleash, nginx and the flaggate restarted during the outage).
shield_step() { "$PY" "$HERE/shield.py" "$@"; }
stop_shield_sdks() {
  stop_pid "$SHIELD_NODE_PID" "shield Node SDKs"
  stop_pid "$SHIELD_PY_PID" "shield Python SDKs"
  SHIELD_NODE_PID="" SHIELD_PY_PID=""
}
shield_check() {
  local rc=0
  say "shield: $SHIELD_NODE_N Node + $SHIELD_PY_N Python SDK instances poll flaggate every ${SHIELD_POLL_S}s (shield TTL ${SHIELD_TTL_S}s)"
  (
    close_check_fd
    export E2E_SHIELD_POLL_MS=$((SHIELD_POLL_S * 1000))
    exec node "$HERE/shield-node.mjs" watch "$SHIELD_NODE_N"
  ) >"$RUN/shield-node.jsonl" 2>"$RUN/shield-node.err" &
  SHIELD_NODE_PID=$!
  (
    close_check_fd
    export E2E_SHIELD_POLL_S=$SHIELD_POLL_S
    exec "$PY" "$HERE/shield_python.py" watch "$SHIELD_PY_N"
  ) >"$RUN/shield-python.jsonl" 2>"$RUN/shield-python.err" &
  SHIELD_PY_PID=$!
  shield_step ready || {
    stop_shield_sdks
    return 1
  }
  shield_step freshness || rc=1
  shield_step unaffected || rc=1
  shield_step pre-outage || rc=1

  # Outage: Unleash AND nginx stopped, so flaggate's upstream is a real transport failure.
  say "shield: stopping Unleash and nginx for ${SHIELD_OUTAGE_S}s (SDKs keep polling flaggate)"
  stop_pid "$UNLEASH_PID" unleash
  UNLEASH_PID=""
  stop_pid "$NGINX_PID" nginx
  NGINX_PID=""
  shield_step mark outage_start
  shield_step outage "before the restart" || rc=1
  shield_step hold "$SHIELD_RESTART_AT_S" || rc=1
  say "shield: restarting flaggate during the outage (same --state-dir: token snapshot + shield documents)"
  shield_step mark restart_begin
  stop_pid "$FLAGGATE_PID" flaggate
  start_flaggate
  wait_http "$GATEWAY_ADMIN/ready" 200 15 || rc=1
  shield_step mark restart_ready
  shield_step restarted || rc=1
  shield_step outage "after the restart" || rc=1
  shield_step hold "$SHIELD_OUTAGE_S" || rc=1
  shield_step review || rc=1

  say "shield: starting Unleash again, then nginx (same TLS port)"
  start_unleash
  start_nginx
  shield_step mark recovered
  shield_step recovery || rc=1
  stop_shield_sdks
  return $rc
}

run_check "a. node-sdk" node node-sdk.mjs
run_check "a. python-sdk" "$PY" python_sdk.py
run_check "b. browser" "$PY" browser_check.py
run_check "c. scopes" "$PY" scopes.py
run_check "d. revocation" "$PY" revocation.py
token_from_state() { "$PY" -c 'import json,os,sys; print(json.load(open(os.environ["E2E_STATE"]))["tokens"][sys.argv[1]])' "$1"; }
CLIENT_TOKEN=$(token_from_state client)
PAT_TOKEN=$(token_from_state pat)
run_check "e. outage" outage "$CLIENT_TOKEN"
run_check "f. tls" tls_check
run_check "g. shield" shield_check

# ---------------------------------------------------------------------------------------------------
# 6. summary

PASSED=$(grep -c '^PASS ' "$CHECKS_OUT" || true)
FAILED=$(grep -c '^FAIL ' "$CHECKS_OUT" || true)
SUMMARY_DONE=1
echo
if [ "$FAILED" != 0 ] || [ ${#FAILED_CHECKS[@]} -gt 0 ]; then
  echo "e2e: FAILED checks: ${FAILED_CHECKS[*]}"
  grep '^FAIL ' "$CHECKS_OUT" | sed 's/^/  /'
  print_logs
fi
say "done in $(($(date +%s) - T0))s"
echo "e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ] && [ ${#FAILED_CHECKS[@]} -eq 0 ]
