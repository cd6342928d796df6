"""Shared helpers for the flaggate end-to-end checks (standard library only).

Everything a check needs to know about the running stack comes from the state file written by setup.py
(path in $E2E_STATE): URLs, tokens, log paths, flag names. Each check prints one `PASS <name>` or
`FAIL <name>: <why>` line per assertion group; scripts exit 1 if any failed.

Also a tiny CLI for run.sh (`python3 e2e.py expect ...`) so the bash parts (outage) assert the same way.
"""

import http.client
import json
import os
import re
import sys
import time
import urllib.parse

STATE_PATH = os.environ.get("E2E_STATE", "")


def load_state():
    with open(STATE_PATH) as f:
        return json.load(f)


def save_state(state):
    tmp = STATE_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, STATE_PATH)


class Resp:
    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers  # lower-cased names
        self.body = body
        self.elapsed = elapsed

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def text(self, limit=300):
        t = self.body.decode("utf-8", "replace")
        return t if len(t) <= limit else t[:limit] + "…"

    def __repr__(self):
        return f"{self.status} {self.text(200)}"


def request(method, url, token=None, body=None, headers=None, timeout=15):
    """One request on a fresh connection. Returns Resp; a connection error raises OSError."""
    u = urllib.parse.urlsplit(url)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = token
    data = None
    if body is not None:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        h.setdefault("Content-Type", "application/json")
    h.setdefault("Accept", "application/json")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        return Resp(r.status, hdrs, raw, time.monotonic() - started)
    finally:
        conn.close()


class Checks:
    """Collects results; `ok(name, cond, detail)` prints PASS/FAIL at once."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.passed = 0
        self.failed = []

    def ok(self, name, cond, detail=""):
        full = f"{self.prefix}: {name}" if self.prefix else name
        if cond:
            self.passed += 1
            print(f"PASS {full}" + (f" ({detail})" if detail else ""), flush=True)
        else:
            self.failed.append(full)
            print(f"FAIL {full}" + (f": {detail}" if detail else ""), flush=True)
        return cond

    def info(self, msg):
        print(f"     {self.prefix}: {msg}", flush=True)

    def finish(self):
        sys.exit(1 if self.failed else 0)


# ---- denial bodies, as documented in README.md ("How denials look") ----

API_TOKEN_MSG = (
    "This endpoint requires an API token. Please add an authorization header to your request with a valid token"
)
WRONG_TYPE_MSG = "invalid token: expected a different token type for this endpoint"


def expected_denial(status, path, code):
    """The JSON body flaggate documents for a denial (a subset to compare against)."""
    if status == 403:
        return {"message": WRONG_TYPE_MSG, "code": "wrong_token_type"}
    # Unleash's API-token style on the SDK routes (legacy /api/proxy included), its session style elsewhere.
    api_token_style = any(path == p or path.startswith(p + "/") for p in ("/api/client", "/api/frontend", "/api/proxy"))
    if api_token_style:
        return {"message": API_TOKEN_MSG, "code": code}
    if code == "no_token":
        return {"name": "AuthenticationRequired", "code": code}
    return {"name": "UnauthorizedError", "message": "You must log in to use Unleash.", "code": code}


def matches(body, subset):
    return isinstance(body, dict) and all(body.get(k) == v for k, v in subset.items())


def admin_session(unleash_url):
    """Logs in as Unleash's default admin (admin/unleash4all); returns the Cookie header value."""
    u = urllib.parse.urlsplit(unleash_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=15)
    try:
        conn.request(
            "POST",
            "/auth/simple/login",
            body=json.dumps({"username": "admin", "password": "unleash4all"}),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"login as admin -> {r.status}")
        return "; ".join(c.split(";", 1)[0] for k, c in r.getheaders() if k.lower() == "set-cookie")
    finally:
        conn.close()


def create_pat(unleash_url, cookie, description):
    """A personal access token of the admin user: (secret, id)."""
    r = request(
        "POST",
        unleash_url + "/api/admin/user/tokens",
        body={"description": description, "expiresAt": "2099-01-01T00:00:00.000Z"},
        headers={"Cookie": cookie},
    )
    if r.status != 201:
        raise RuntimeError(f"create PAT -> {r}")
    return r.json()["secret"], r.json()["id"]


# ---- flaggate access log ----


def access_log(path):
    """All flaggate::access JSON lines of the log file."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("target") == "flaggate::access":
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out


def wait_for_log(path, pred, timeout):
    deadline = time.monotonic() + timeout
    while True:
        hits = [r for r in access_log(path) if pred(r)]
        if hits or time.monotonic() > deadline:
            return hits
        time.sleep(0.2)


# ---- Unleash's own view: request counters from /internal-backstage/prometheus ----

_COUNT = re.compile(r'^http_request_duration_milliseconds_count\{(.*)\}\s+([0-9.e+]+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def unleash_counters(unleash_url):
    """{(path, method, status): count} as Unleash itself counted the requests it received."""
    r = request("GET", unleash_url + "/internal-backstage/prometheus", headers={"Accept": "text/plain"})
    if r.status != 200:
        raise RuntimeError(f"Unleash prometheus endpoint answered {r.status}")
    out = {}
    for line in r.body.decode().splitlines():
        m = _COUNT.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(1)))
        key = (labels.get("path"), labels.get("method"), labels.get("status"))
        out[key] = out.get(key, 0) + float(m.group(2))
    return out


def counter_delta(before, after, ignore_paths=()):
    d = {}
    for k, v in after.items():
        if k[0] in ignore_paths:
            continue
        n = v - before.get(k, 0)
        if n:
            d[k] = n
    return d


# ---- the truth about flags, from Unleash's admin API ----


def admin_truth(state, env="development"):
    """{flag: {"enabled": bool, "variant": name-or-None, "payload": dict-or-None}} for the e2e flags.

    The e2e flags use constraint-free 100 % strategies, so "enabled in the environment and at least one
    active strategy" is exactly what every SDK must evaluate; a single 1000-weight strategy variant is
    what every context gets.
    """
    truth = {}
    for name in state["flags"]:
        r = request("GET", f"{state['unleash']}/api/admin/projects/default/features/{name}", token=state["tokens"]["admin"])
        if r.status != 200:
            raise RuntimeError(f"admin API: GET feature {name} -> {r}")
        envs = {e["name"]: e for e in r.json()["environments"]}
        e = envs[env]
        active = [s for s in e.get("strategies", []) if not s.get("disabled")]
        enabled = bool(e["enabled"]) and bool(active)
        variant = payload = None
        if enabled:
            for s in active:
                if s.get("variants"):
                    variant = s["variants"][0]["name"]
                    payload = s["variants"][0].get("payload")
                    break
        truth[name] = {"enabled": enabled, "variant": variant, "payload": payload}
    return truth


# ---- CLI for run.sh ----


def _cli_expect(argv):
    """expect NAME METHOD URL STATUS [--token T] [--header 'K: V']... [--code C] [--json-key K=V]... [--within SECONDS]

    With --within, retries until the expectation holds or the time is up (prints the time it took)."""
    import argparse

    p = argparse.ArgumentParser(prog="e2e.py expect")
    p.add_argument("name")
    p.add_argument("method")
    p.add_argument("url")
    p.add_argument("status", type=int)
    p.add_argument("--token")
    p.add_argument("--header", action="append", default=[], help="'Name: value': an extra request header")
    p.add_argument("--code", help="expected JSON `code` field")
    p.add_argument("--json-key", action="append", default=[], help="K=V: top-level JSON key must equal V (JSON literal or string)")
    p.add_argument("--has-key", action="append", default=[], help="top-level JSON key must be present")
    p.add_argument("--within", type=float, default=0)
    a = p.parse_args(argv)
    want = {}
    if a.code:
        want["code"] = a.code
    for kv in a.json_key:
        k, v = kv.split("=", 1)
        try:
            want[k] = json.loads(v)
        except ValueError:
            want[k] = v
    headers = dict(h.split(":", 1) for h in a.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    started = time.monotonic()
    while True:
        try:
            r = request(a.method, a.url, token=a.token, headers=headers)
            body = r.json()
            good = r.status == a.status and matches(body, want) and all(isinstance(body, dict) and k in body for k in a.has_key)
            got = f"{r!r} [{r.elapsed * 1000:.0f} ms]"
        except OSError as e:
            good, got = False, f"connection error: {e}"
        took = time.monotonic() - started
        if good or took >= a.within:
            break
        time.sleep(0.1)
    c = Checks("")
    detail = f"{a.method} {urllib.parse.urlsplit(a.url).path} -> {got}"
    if a.within:
        detail += f"; after {took:.2f}s"
    c.ok(a.name, good, detail if good else f"expected {a.status} {want or ''}, got {detail}")
    c.finish()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "expect":
        _cli_expect(sys.argv[2:])
    else:
        print(__doc__)
        sys.exit(2)
