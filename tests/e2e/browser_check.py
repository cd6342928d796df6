"""Check b: headless Chromium loads tests/e2e/browser/index.html from one loopback origin (the static
server run.sh started) and the page's frontend SDK talks to flaggate on another origin.

- frontend token: the page renders the flag values; they must equal Unleash's admin API truth, and
  flaggate's access log must show the browser's token-less CORS preflight (OPTIONS /api/frontend, 204
  from Unleash) and the GET /api/frontend with the frontend token; the SDK's metrics POST
  (/api/frontend/client/metrics) must be accepted by Unleash (200) through flaggate.
- client token (wrong kind for /api/frontend): the page must render the SDK's HttpError 403 from flaggate.
  Unleash's own 401/403 on /api/frontend carry CORS headers, so a browser SDK can read them; flaggate's
  denials there must too (compared header for header with Unleash's, for a 403 and a 401).
"""

import html
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse

from e2e import Checks, access_log, admin_truth, load_state, request

state = load_state()
c = Checks("b. browser")


def load_page(token):
    q = urllib.parse.urlencode(
        {"url": state["gateway"] + "/api/frontend", "token": token, "flags": ",".join(state["flags"])}
    )
    url = f"{state['page']}/index.html?{q}"
    profile = tempfile.mkdtemp(prefix="e2e-chromium-", dir=state["work"])
    cmd = [
        state.get("chromium", "chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        url,
    ]
    started = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    took = time.monotonic() - started
    m = re.search(r'<pre id="result">(.*?)</pre>', p.stdout, re.S)
    if not m or not m.group(1).strip():
        tail = "\n".join((p.stderr or "").splitlines()[-10:])
        return None, f"no #result in the DOM after {took:.1f}s (exit {p.returncode}); stderr tail:\n{tail}\nDOM: {p.stdout[:800]}"
    return json.loads(html.unescape(m.group(1))), f"{took:.1f}s"


truth = admin_truth(state)
c.info(f"admin API truth {truth}")
log_mark = len(access_log(state["flaggate_log"]))

# 1. frontend token: values rendered by the page equal the admin API's.
result, how = load_page(state["tokens"]["frontend"])
if c.ok("page rendered with the frontend token", result is not None and result["status"] == "ready", f"{how}; {result}"):
    c.info(f"page origin {result['origin']} -> flaggate {state['gateway']}; rendered {result['flags']}")
    for name, want in truth.items():
        got = result["flags"].get(name, {})
        c.ok(
            f"rendered {name} equals admin API",
            got.get("enabled") == want["enabled"] and got.get("variant") == want["variant"] and got.get("payload") == want["payload"],
            f"page={got} admin={want}",
        )
    c.ok("page's SDK metrics were sent", result.get("metrics") == "sent", f"metrics: {result.get('metrics')}")
lines = access_log(state["flaggate_log"])[log_mark:]
met = [r for r in lines if r["method"] == "POST" and r["path"] == "/api/frontend/client/metrics"]
c.ok(
    "browser's POST /api/frontend/client/metrics accepted by Unleash through flaggate",
    any(r["status"] == 200 and r.get("token_kind") == "frontend" for r in met),
    str([{k: r.get(k) for k in ("status", "decision", "token_kind")} for r in met]) or "no metrics line",
)
pre = [r for r in lines if r["method"] == "OPTIONS" and r["path"] == "/api/frontend"]
c.ok(
    "CORS preflight passed flaggate without a token and Unleash answered it",
    any(r["status"] == 204 and r["decision"] == "allowed" and not r.get("token") for r in pre),
    str([{k: r.get(k) for k in ("status", "decision", "token", "route_class")} for r in pre]) or "no OPTIONS line",
)
get = [r for r in lines if r["method"] == "GET" and r["path"] == "/api/frontend"]
c.ok(
    "browser's GET /api/frontend allowed with the frontend token",
    any(r["status"] == 200 and r.get("token_kind") == "frontend" for r in get),
    str([{k: r.get(k) for k in ("status", "decision", "token_kind", "app")} for r in get]) or "no GET line",
)

# 2. client token from the browser: flaggate's 403 reaches the SDK as an HttpError.
log_mark = len(access_log(state["flaggate_log"]))
result, how = load_page(state["tokens"]["client"])
c.ok(
    "page with the client token renders flaggate's 403",
    result is not None and result["status"] == "error" and (result.get("error") or {}).get("code") == 403,
    f"{how}; {result}",
)
if result is not None and (result.get("error") or {}).get("type") == "fetch-toggles":
    c.info("the SDK saw a blocked fetch, not an HTTP status: the browser could not read flaggate's denial")
lines = access_log(state["flaggate_log"])[log_mark:]
c.ok(
    "the 403 was flaggate's (forbidden, never forwarded)",
    any(r["method"] == "GET" and r["path"] == "/api/frontend" and r["status"] == 403 and r["decision"] == "forbidden" and r.get("upstream_us") is None for r in lines),
    str([{k: r.get(k) for k in ("method", "status", "decision", "reason", "upstream_us")} for r in lines]),
)

# 3. Why a browser can read Unleash's own denials: they carry CORS headers. flaggate's must too, or
#    browser SDKs see "Failed to fetch" instead of 401/403.
ORIGIN = state["page"]
for who, token, status in (("client token (wrong kind)", state["tokens"]["client"], 403), ("unknown token", "e2e-junk-browser", 401)):
    direct = request("GET", state["unleash"] + "/api/frontend", token=token, headers={"Origin": ORIGIN})
    via = request("GET", state["gateway"] + "/api/frontend", token=token, headers={"Origin": ORIGIN})
    want = direct.headers.get("access-control-allow-origin")
    got = via.headers.get("access-control-allow-origin")
    c.ok(
        f"flaggate's {status} on /api/frontend ({who}) carries CORS headers like Unleash's own",
        via.status == status and direct.status == status and want is not None and got == want,
        f"Unleash: {direct.status} Access-Control-Allow-Origin={want!r}; flaggate: {via.status} Access-Control-Allow-Origin={got!r}",
    )
c.finish()
