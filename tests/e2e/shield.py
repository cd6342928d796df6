"""Check g: the shield, end to end (driven step by step by run.sh's shield_check, which owns the processes).

flaggate runs with `--shield on --shield-ttl <TTL> --shield-persist on --state-dir ...`. Real SDKs poll it
(shield-node.mjs: Node `unleash-client` instances with the `client` token; shield_python.py: Python
`UnleashClient` instances with the `backend` token; every E2E_SHIELD_POLL seconds). Their JSON-line logs
(work/run/shield-node.jsonl, shield-python.jsonl) say what each instance evaluated and when.

Steps (`python3 shield.py STEP`), state between them in work/run/shield.json:
  ready          all SDK instances synchronized through flaggate, values equal to the admin API's
  freshness      a quiet window, then e2e.enabled toggled off and on through the admin API: every SDK
                 instance sees each change within TTL + poll interval + 2 s (measured). Over the whole
                 window: Unleash's own counters and nginx's access log against the SDKs' polls in
                 flaggate's access log (far fewer, at most one per key per TTL, all conditional, mostly
                 304), and flaggate_shield_requests_total{result="hit"} > 0
  unaffected     /api/frontend, the admin API and an admin token on the features path are forwarded
                 every time, never answered from the shield (no `cache` in their access-log lines)
  pre-outage     raw curl polls (client and backend token): the ETag and body flaggate serves are
                 Unleash's own, byte for byte (and its gzip copy has the same ETag); remembered for the
                 outage
  mark NAME      records the time of NAME (outage_start, restart_begin, restart_ready, recovered)
  outage LABEL   during the outage: raw curl polls get 200 with the same ETag and body (304 to the
                 ETag), a fresh Node and a fresh Python SDK process get the flags (not defaults), a cold
                 key gets 502 (nothing made up), /api/frontend and an admin token get 502 (never cached)
  hold SECONDS   raw curl polls every 4 s until SECONDS after outage_start, all 200 with the same ETag
  restarted      the flaggate restarted during the outage took its tokens from the snapshot and its
                 documents from state_dir/shield (0600), is ready, still denies an unknown token
  review         the whole outage from the SDKs' logs and flaggate's: every instance kept evaluating
                 the last values, every poll flaggate received from them was answered 200/304 (stale),
                 SDK errors only while flaggate itself was down for its restart, ages honest after it
  recovery       a change made the moment Unleash is back, and one made after flaggate reached it
                 again, both measured; /api/frontend 200 again
"""

import datetime
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time

from e2e import Checks, access_log, admin_truth, load_state, request, unleash_counters

state = load_state()
G, GA, U, T = state["gateway"], state["gateway_admin"], state["unleash"], state["tokens"]
CFG = state["shield"]
TTL, POLL = float(CFG["ttl_s"]), float(CFG["poll_s"])
FRESH_BOUND = TTL + POLL + 2  # the freshness bound asked of the shield: TTL + SDK poll interval + 2 s
SYNC_BACKOFF_MAX = 30  # src/token/unleash.rs: a failing token sync backs off up to max(interval, 30 s), jittered down
WORK = state["work"]
SHIELD_STATE = os.path.join(WORK, "shield.json")
NGINX_ACCESS_LOG = os.path.join(WORK, "nginx-access.log")
HERE = os.path.dirname(os.path.abspath(__file__))
SDKS = {  # name -> (JSON-line log, appName, instances)
    "node": (os.path.join(WORK, "shield-node.jsonl"), "e2e-shield-node", int(CFG["node_instances"])),
    "python": (os.path.join(WORK, "shield-python.jsonl"), "e2e-shield-python", int(CFG["python_instances"])),
}
APPS = {app for _, app, _ in SDKS.values()}
FEATURES = "/api/client/features"
FLAG = "e2e.enabled"  # the flag the freshness checks toggle
# SDK errors about metrics and registration posts: those are forwarded (never shielded) and fail while
# Unleash is down. Any other SDK error is about fetching the flags.
FORWARDED = re.compile(r"metrics|regist", re.I)
c = Checks("g. shield")


def now_ms():
    return int(time.time() * 1000)


def load():
    try:
        with open(SHIELD_STATE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save(s):
    with open(SHIELD_STATE + ".tmp", "w") as f:
        json.dump(s, f, indent=2)
    os.replace(SHIELD_STATE + ".tmp", SHIELD_STATE)


def sdk_lines(name):
    out = []
    try:
        with open(SDKS[name][0]) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return out


def observations(name, i):
    """(t, snapshot) of SDK instance i, in order: its ready/change lines and its entry in every tick."""
    obs = []
    for o in sdk_lines(name):
        if o.get("ev") in ("ready", "change") and o.get("i") == i:
            obs.append((o["t"], o["snap"]))
        elif o.get("ev") == "tick" and i < len(o.get("snaps", [])) and o["snaps"][i] is not None:
            obs.append((o["t"], o["snaps"][i]))
    return obs


def ts(rec):
    return datetime.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp() * 1000


def gw_log(since_ms, until_ms=None):
    return [r for r in access_log(state["flaggate_log"]) if ts(r) >= since_ms and (until_ms is None or ts(r) <= until_ms)]


def flaggate_log_lines(since_ms):
    out = []
    with open(state["flaggate_log"], errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "timestamp" in rec and ts(rec) >= since_ms:
                out.append(rec)
    return out


_NGINX = re.compile(r'^(\S+) "(\S+) (\S+) [^"]*" (\d+) .* app="([^"]*)" inm="([^"]*)" ts=([0-9.]+)$')


def nginx_features(since_ms, until_ms):
    """Feature requests nginx passed to Unleash (only flaggate talks to nginx): dicts with status, app, inm."""
    out = []
    with open(NGINX_ACCESS_LOG, errors="replace") as f:
        for line in f:
            m = _NGINX.match(line.rstrip("\n"))
            if not m or m.group(3).split("?")[0] != FEATURES:
                continue
            t = float(m.group(7)) * 1000
            if since_ms <= t <= until_ms:
                out.append({"status": int(m.group(4)), "app": m.group(5), "inm": m.group(6), "t": t, "query": "?" in m.group(3)})
    return out


def metrics():
    """flaggate's /metrics as {(name, frozenset(labels)): value} for the flaggate_shield_* families."""
    r = request("GET", GA + "/metrics", headers={"Accept": "text/plain"})
    out = {}
    for line in r.body.decode().splitlines():
        m = re.match(r"^(flaggate_shield_\w+)(?:\{(.*)\})?\s+([0-9.e+-]+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(m, name, **labels):
    return m.get((name, frozenset(labels.items())), 0.0)


def shield_results(m):
    return {dict(k[1])["result"]: int(v) for k, v in m.items() if k[0] == "flaggate_shield_requests_total" and v}


def curl(url, token, *headers):
    """A raw poll with curl: (status, {header: value}, body bytes)."""
    cmd = ["curl", "-sS", "--max-time", "10", "-D", "-", "-H", f"Authorization: {token}"]
    for h in headers:
        cmd += ["-H", h]
    p = subprocess.run(cmd + [url], capture_output=True, timeout=20)
    raw = p.stdout
    status, hdrs = 0, {}
    while raw.startswith(b"HTTP/"):  # (no interim responses expected, but be safe)
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, hdrs, raw


def feature_names(body):
    try:
        return sorted(f["name"] for f in json.loads(body)["features"])
    except (ValueError, KeyError, TypeError):
        return None


def toggle(on):
    """Turns FLAG on/off in development through Unleash's admin API; returns the time just before (ms)."""
    t = now_ms()
    r = request(
        "POST",
        f"{U}/api/admin/projects/default/features/{FLAG}/environments/development/{'on' if on else 'off'}",
        token=T["admin"],
    )
    if r.status != 200:
        raise SystemExit(f"FAIL g. shield: admin API: turning {FLAG} {'on' if on else 'off'} -> {r}")
    return t


def wait_seen(value, since, limit):
    """Seconds until every instance of every SDK evaluated FLAG == value at or after `since` (ms):
    {sdk: [delay or None per instance]}, waiting at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        seen = {}
        for name, (_, _, n) in SDKS.items():
            seen[name] = []
            for i in range(n):
                hit = next((t for t, s in observations(name, i) if t >= since and s[FLAG]["enabled"] == value), None)
                seen[name].append(None if hit is None else (hit - since) / 1000)
        if all(d is not None for ds in seen.values() for d in ds) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def report_seen(what, seen, bound):
    allv = []
    for name, ds in seen.items():
        got = [d for d in ds if d is not None]
        allv += got
        worst = max(got) if len(got) == len(ds) else None
        c.ok(
            f"{what}: every {name} SDK instance ({len(ds)}) sees it within {bound:.0f} s",
            worst is not None and worst <= bound,
            f"delays {', '.join('never' if d is None else f'{d:.2f}s' for d in ds)}",
        )
    return allv


def fresh_sdk(kind):
    """Runs a FRESH SDK process (once mode); returns its JSON result or an error string."""
    if kind == "node":
        cmd = ["node", os.path.join(HERE, "shield-node.mjs"), "once"]
    else:
        cmd = [sys.executable, os.path.join(HERE, "shield_python.py"), "once"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=40, cwd=HERE)
    except subprocess.TimeoutExpired:
        return "timed out"
    for line in reversed(p.stdout.splitlines()):
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if o.get("ev") == "once":
            return o
    return f"no result (exit {p.returncode}): {p.stderr[-400:]}"


# ---------------------------------------------------------------------------------------------------


def step_ready():
    truth = admin_truth(state)
    deadline = time.monotonic() + 30
    while True:
        ready = {name: {o["i"]: o for o in sdk_lines(name) if o.get("ev") == "ready"} for name in SDKS}
        if all(len(ready[n]) >= SDKS[n][2] for n in SDKS) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name, (path, app, n) in SDKS.items():
        got = ready[name]
        wrong = {i: o["snap"] for i, o in got.items() if o["snap"] != truth}
        c.ok(
            f"{n} {name} SDK instances ({app}, poll every {POLL:g} s) synchronized through flaggate, values equal the admin API's",
            len(got) == n and not wrong,
            f"{len(got)}/{n} ready" + (f"; differing: {wrong}" if wrong else "") + ("" if len(got) == n else f"; log tail: {open(path).read()[-600:] if os.path.exists(path) else 'none'}"),
        )
    s = load()
    s["truth"] = truth
    save(s)


def step_freshness():
    s = load()
    w0 = now_ms()
    u0, m0 = unleash_counters(U), metrics()
    quiet = 6
    c.info(f"quiet window: {quiet} s of SDK polls with nothing changing")
    time.sleep(quiet)
    delays = []
    for on in (False, True):
        t = toggle(on)
        what = f"freshness: {FLAG} turned {'on' if on else 'off'} through the admin API"
        seen = wait_seen(on, t, FRESH_BOUND + 10)
        delays += report_seen(what, seen, FRESH_BOUND)
        time.sleep(1)
    w1 = now_ms()
    u1, m1 = unleash_counters(U), metrics()
    win = (w1 - w0) / 1000
    if delays:
        c.info(f"freshness delays (TTL {TTL:g} s, poll {POLL:g} s): min {min(delays):.2f} s, max {max(delays):.2f} s over {len(delays)} observations")
    s["freshness_delays"] = delays

    # Shielding over the whole window [w0, w1].
    polls = [r for r in gw_log(w0, w1) if r.get("app") in APPS and r["method"] == "GET" and r["path"] == FEATURES]
    by_app = {app: sum(1 for r in polls if r["app"] == app) for app in APPS}
    cache = {}
    for r in polls:
        cache[r.get("cache")] = cache.get(r.get("cache"), 0) + 1
    n200 = u1.get((FEATURES, "GET", "200"), 0) - u0.get((FEATURES, "GET", "200"), 0)
    n304 = u1.get((FEATURES, "GET", "304"), 0) - u0.get((FEATURES, "GET", "304"), 0)
    other = sum(v - u0.get(k, 0) for k, v in u1.items() if k[0] == FEATURES and k[1] == "GET" and k[2] not in ("200", "304"))
    upstream = n200 + n304 + other
    c.info(f"window {win:.1f} s: the SDKs polled flaggate {len(polls)} times {by_app}, answered {cache}")
    c.ok(
        "shielding: Unleash's own counters show far fewer feature requests than the SDKs made (at most 1 in 4)",
        len(polls) >= 20 and upstream * 4 <= len(polls),
        f"SDK polls {len(polls)} vs Unleash GET {FEATURES}: {upstream:g} ({n304:g} x 304, {n200:g} x 200, {other:g} other); "
        f"{len(polls) / max(upstream, 1):.1f} polls per Unleash request",
    )
    ng = nginx_features(w0, w1)
    for app in sorted(APPS):
        mine = [x for x in ng if x["app"] == app]
        limit = int(win / TTL) + 1
        c.ok(
            f"shielding: at most one request per key per TTL reached Unleash for {app}",
            0 < len(mine) <= limit,
            f"{len(mine)} in nginx's access log in {win:.1f} s (limit {limit}); {by_app.get(app, 0)} polls",
        )
    cond = [x for x in ng if x["inm"] not in ("", "-")]
    ng304 = sum(1 for x in ng if x["status"] == 304)
    ng200 = sum(1 for x in ng if x["status"] == 200)
    c.ok(
        "shielding: the requests that reached Unleash were conditional (If-None-Match) and mostly answered 304",
        ng and len(cond) == len(ng) and ng304 > ng200 and n304 > n200,
        f"nginx: {len(ng)} feature requests, {len(cond)} with If-None-Match, {ng304} x 304, {ng200} x 200 "
        f"(one per key per change); Unleash counted {n304:g} x 304, {n200:g} x 200",
    )
    r0, r1 = shield_results(m0), shield_results(m1)
    delta = {k: r1.get(k, 0) - r0.get(k, 0) for k in set(r0) | set(r1) if r1.get(k, 0) - r0.get(k, 0)}
    c.ok(
        'shielding: flaggate_shield_requests_total{result="hit"} > 0 (and grew in the window)',
        r1.get("hit", 0) > 0 and delta.get("hit", 0) > 0 and delta.get("hit_304", 0) > 0,
        f"totals {r1}; in the window {delta}",
    )
    up = {
        f"{dict(k[1])['kind']}/{dict(k[1])['status']}": int(v - m0.get(k, 0))
        for k, v in m1.items()
        if k[0] == "flaggate_shield_upstream_total" and v - m0.get(k, 0)
    }
    c.info(f"flaggate_shield_upstream_total in the window: {up}")
    s["shielding"] = {"window_s": win, "sdk_polls": len(polls), "unleash": upstream, "unleash_304": n304, "unleash_200": n200}
    save(s)


def step_unaffected():
    app = "e2e-shield-unaffected"
    h = {"UNLEASH-APPNAME": app}
    m0 = metrics()
    since = now_ms()
    sent = []
    for _ in range(3):
        sent.append(("GET /api/frontend", request("GET", G + "/api/frontend", token=T["frontend"], headers=h)))
    sent.append(
        (
            "OPTIONS /api/frontend",
            request(
                "OPTIONS",
                G + "/api/frontend",
                headers={**h, "Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"},
            ),
        )
    )
    for _ in range(2):
        sent.append(("GET /api/admin/projects (admin)", request("GET", G + "/api/admin/projects", token=T["admin"], headers=h)))
    sent.append(("GET /api/admin/projects (PAT)", request("GET", G + "/api/admin/projects", token=T["pat"], headers=h)))
    for _ in range(2):
        sent.append(("GET /api/client/features (admin token)", request("GET", G + FEATURES, token=T["admin"], headers=h)))
    want = {"GET /api/frontend": 200, "OPTIONS /api/frontend": 204, "GET /api/admin/projects (admin)": 200, "GET /api/admin/projects (PAT)": 200, "GET /api/client/features (admin token)": 200}
    bad = [f"{what} -> {r.status}" for what, r in sent if r.status != want[what]]
    c.ok("frontend API, admin API and admin-token feature requests answered through flaggate", not bad, "; ".join(bad) or f"{len(sent)} requests")
    direct = request("GET", U + "/api/frontend", token=T["frontend"])
    via = sent[0][1]
    toggles = lambda r: sorted((t["name"], t["enabled"]) for t in (r.json() or {}).get("toggles", []))  # noqa: E731
    c.ok("GET /api/frontend through flaggate equals Unleash's own answer", toggles(via) == toggles(direct), f"{toggles(via)}")
    time.sleep(0.3)
    lines = [r for r in gw_log(since) if r.get("app") == app]
    cached = [f"{r['method']} {r['path']} cache={r.get('cache')}" for r in lines if r.get("cache") is not None]
    not_forwarded = [f"{r['method']} {r['path']}" for r in lines if r.get("upstream_us") is None]
    c.ok(
        "none of them was answered by the shield: every one forwarded to Unleash (access log: no `cache`, upstream_us set)",
        len(lines) == len(sent) and not cached and not not_forwarded,
        f"{len(lines)}/{len(sent)} lines; cached: {cached or 'none'}; not forwarded: {not_forwarded or 'none'}",
    )
    m1 = metrics()
    d = metric(m1, "flaggate_shield_bypass_total", reason="token_kind") - metric(m0, "flaggate_shield_bypass_total", reason="token_kind")
    c.ok("the admin-token feature requests are counted as shield bypasses (reason token_kind)", d == 2, f"flaggate_shield_bypass_total{{reason=\"token_kind\"}} +{d:g}")
    # Recorded, not asserted: which of these requests the bypass counter counts at all (the README's
    # "Everything else ... is counted in flaggate_shield_bypass_total{reason}" vs the metric's own help,
    # "Feature polls forwarded past the shield").
    by = {
        dict(k[1])["reason"]: int(v - m0.get(k, 0))
        for k, v in m1.items()
        if k[0] == "flaggate_shield_bypass_total" and v - m0.get(k, 0)
    }
    c.info(f"(info) flaggate_shield_bypass_total moved by {by or 'nothing'} for these {len(sent)} requests ({len(sent) - 2} of them not on {FEATURES})")


def step_pre_outage():
    s = load()
    truth = admin_truth(state)
    c.ok("before the outage the admin API truth is the one the SDKs started with", truth == s["truth"], f"{truth}")
    s["raw"] = {}
    for kind in ("client", "backend"):
        st, h, body = curl(G + FEATURES, T[kind])
        dst, dh, dbody = curl(U + FEATURES, T[kind])  # Unleash's own answer, on its plain port
        same = st == 200 and dst == 200 and h.get("etag") and h.get("etag") == dh.get("etag") and body == dbody
        c.ok(
            f"raw curl poll ({kind} token) before the outage: 200, ETag and body are Unleash's own, byte for byte",
            same,
            f"flaggate {st} ETag {h.get('etag')} {len(body)} B; Unleash {dst} ETag {dh.get('etag')} {len(dbody)} B",
        )
        s["raw"][kind] = {"etag": h.get("etag"), "sha256": hashlib.sha256(body).hexdigest(), "features": feature_names(body)}
    # README ("Exact"): a body from 1 KiB gets a gzip copy, served with the same ETag and Vary: Accept-Encoding.
    st, h, body = curl(G + FEATURES, T["client"], "Accept-Encoding: gzip")
    try:
        plain = gzip.decompress(body) if h.get("content-encoding") == "gzip" else None
    except OSError:
        plain = None
    want = s["raw"]["client"]
    c.ok(
        "raw curl poll accepting gzip: the gzip copy, with the same ETag and Vary: Accept-Encoding",
        st == 200 and plain is not None and hashlib.sha256(plain).hexdigest() == want["sha256"] and h.get("etag") == want["etag"] and "accept-encoding" in h.get("vary", "").lower(),
        f"{st} Content-Encoding {h.get('content-encoding')} ETag {h.get('etag')} Vary {h.get('vary')}; {len(body)} B -> {len(plain) if plain is not None else '?'} B",
    )
    save(s)


def step_mark(name):
    s = load()
    s.setdefault("marks", {})[name] = now_ms()
    save(s)


def raw_poll_ok(kind, s):
    """One raw curl poll for `kind` during the outage: (ok, detail)."""
    st, h, body = curl(G + FEATURES, T[kind])
    want = s["raw"][kind]
    ok = st == 200 and h.get("etag") == want["etag"] and hashlib.sha256(body).hexdigest() == want["sha256"]
    return ok, f"{st} ETag {h.get('etag')} {len(body)} B features {feature_names(body)}"


def step_outage(label):
    s = load()
    t0 = s["marks"]["outage_start"]
    at = f"outage +{(now_ms() - t0) / 1000:.0f}s, {label}"
    for kind in ("client", "backend"):
        ok, detail = raw_poll_ok(kind, s)
        c.ok(f"{at}: raw curl poll ({kind} token) -> 200, the flags, the pre-outage ETag and body", ok, detail)
        st, h, body = curl(G + FEATURES, T[kind], f"If-None-Match: {s['raw'][kind]['etag']}")
        c.ok(f"{at}: raw curl poll ({kind} token) with If-None-Match -> 304, same ETag", st == 304 and h.get("etag") == s["raw"][kind]["etag"], f"{st} ETag {h.get('etag')}")
    # Nothing made up: a key that was never filled (another query) gets flaggate's 502.
    r = request("GET", G + FEATURES + "?namePrefix=e2e.", token=T["client"])
    c.ok(
        f"{at}: a key never filled (client token, ?namePrefix=e2e.) -> 502 upstream_unreachable, nothing made up",
        r.status == 502 and (r.json() or {}).get("code") == "upstream_unreachable",
        repr(r),
    )
    r = request("GET", G + "/api/frontend", token=T["frontend"])
    c.ok(f"{at}: /api/frontend -> 502 upstream_unreachable (the frontend API is never cached)", r.status == 502 and (r.json() or {}).get("code") == "upstream_unreachable", repr(r))
    r = request("GET", G + FEATURES, token=T["admin"])
    c.ok(f"{at}: an admin token on {FEATURES} -> 502 (forwarded, never cached)", r.status == 502, repr(r))
    for kind in ("node", "python"):
        o = fresh_sdk(kind)
        good = isinstance(o, dict) and o.get("synced") and o.get("snap") == s["truth"]
        if isinstance(o, dict):  # its registration post is forwarded and fails; a flag-fetch error must not
            good = good and not [e for e in o.get("errors", []) if not FORWARDED.search(e)]
        c.ok(
            f"{at}: a {kind} SDK process started now gets the flags from flaggate (not defaults)",
            good,
            (f"synced={o.get('synced')} in {o.get('took_ms')} ms, values {'= admin truth' if o.get('snap') == s['truth'] else o.get('snap')}, errors {o.get('errors') or 'none'}" if isinstance(o, dict) else o),
        )


def step_hold(until_s):
    s = load()
    t0 = s["marks"]["outage_start"]
    n, bad = 0, []
    while now_ms() < t0 + until_s * 1000:
        for kind in ("client", "backend"):
            ok, detail = raw_poll_ok(kind, s)
            n += 1
            if not ok:
                bad.append(f"+{(now_ms() - t0) / 1000:.0f}s {kind}: {detail}")
        time.sleep(max(0, min(4, (t0 + until_s * 1000 - now_ms()) / 1000)))
    c.ok(
        f"outage until +{until_s:.0f}s: {n} raw curl polls all 200 with the flags and the pre-outage ETag and body",
        n > 0 and not bad,
        "; ".join(bad[:5]) or f"{n} polls",
    )


def step_restarted():
    s = load()
    since = s["marks"]["restart_begin"]
    lines = flaggate_log_lines(since)
    snap = [r for r in lines if "serving the token snapshot" in r.get("message", "")]
    c.ok(
        "restarted flaggate took its token set from the snapshot in the same state dir",
        bool(snap),
        f"{snap[0]['message']} tokens={snap[0].get('tokens')} age_seconds={snap[0].get('age_seconds')}" if snap else "no 'serving the token snapshot' line",
    )
    restored = [r for r in lines if r.get("message") == "feature documents restored from the state directory"]
    c.ok(
        "restarted flaggate restored the shield's documents from the state dir",
        bool(restored) and int(restored[0].get("documents", 0)) >= 4,
        f"documents={restored[0].get('documents')}" if restored else "no 'feature documents restored from the state directory' line",
    )
    d = os.path.join(WORK, "flaggate-state", "shield")
    files = sorted(os.listdir(d)) if os.path.isdir(d) else []
    modes = {oct(os.stat(os.path.join(d, f)).st_mode & 0o777) for f in files}
    c.ok("persisted documents are files of mode 0600 in state_dir/shield", bool(files) and modes == {"0o600"}, f"{len(files)} files, modes {sorted(modes)}")
    r = request("GET", GA + "/ready")
    c.ok("restarted flaggate is ready (/ready 200) while Unleash is down", r.status == 200, repr(r))
    r = request("GET", G + FEATURES, token="*:development.e2e-junk-during-shield-outage")
    c.ok("restarted flaggate still denies an unknown token first (401 unknown_token)", r.status == 401 and (r.json() or {}).get("code") == "unknown_token", repr(r))


def step_review():
    s = load()
    mk = s["marks"]
    t0, t1 = mk["outage_start"], now_ms()
    gap0, gap1 = mk["restart_begin"], mk["restart_ready"] + 3000  # flaggate itself down (+ SDK retry)
    for name, (_, app, n) in SDKS.items():
        lines = [o for o in sdk_lines(name) if t0 <= o["t"] <= t1]
        changes = [o for o in lines if o.get("ev") == "change"]
        ticks = [o for o in lines if o.get("ev") == "tick"]
        wrong = [o for o in ticks if any(x != s["truth"] for x in o["snaps"])]
        gaps = [(b["t"] - a["t"]) / 1000 for a, b in zip(ticks, ticks[1:])]
        c.ok(
            f"outage review: every {name} SDK instance kept evaluating the last values for the whole outage",
            not changes and not wrong and len(ticks) >= (t1 - t0) / 1000 / 2 - 3 and max(gaps or [99]) <= 4,
            f"{len(ticks)} evaluations of {n} instances over {(t1 - t0) / 1000:.0f} s (largest gap {max(gaps or [0]):.1f} s), "
            f"{len(changes)} changes, {len(wrong)} differing from the admin truth",
        )
        errors = [o for o in lines if o.get("ev") == "error"]
        forwarded = [o for o in errors if FORWARDED.search(o["msg"])]
        fetch = [o for o in errors if o not in forwarded]
        outside = [o for o in fetch if not gap0 <= o["t"] <= gap1]
        c.ok(
            f"outage review: the {name} SDKs reported no flag-fetch error, except while flaggate itself was stopped for its restart",
            not outside,
            (f"{len(fetch)} flag-fetch errors, all within the restart ({(gap1 - gap0) / 1000:.1f} s)" + (f": {fetch[0]['msg'][:160]}" if fetch else ""))
            if not outside
            else f"{len(outside)} outside the restart, e.g. {[o['msg'][:200] for o in outside[:3]]}",
        )
        if forwarded:
            c.info(f"outage: the {name} SDKs reported {len(forwarded)} failed metrics/registration posts (forwarded, not shielded: expected), e.g. {forwarded[0]['msg'][:140]}")
        polls = [r for r in gw_log(t0, t1) if r.get("app") == app and r["method"] == "GET" and r["path"] == FEATURES]
        before = [r for r in polls if ts(r) < gap0]
        after = [r for r in polls if ts(r) > mk["restart_ready"]]
        bad = [f"{r['status']} {r.get('cache')}" for r in polls if r["status"] not in (200, 304)]
        cache = {}
        for r in polls:
            cache[r.get("cache")] = cache.get(r.get("cache"), 0) + 1
        c.ok(
            f"outage review: every {name} SDK poll flaggate received was answered 200/304 from the shield, before and after the restart",
            before and after and not bad and set(cache) <= {"stale", "hit", "hit_304"},
            f"{len(before)} polls before the restart, {len(after)} after; answered {cache}" + (f"; bad: {bad[:5]}" if bad else ""),
        )
        # Ages survive the restart: a document's age counts from Unleash's last confirmation (before the
        # outage), not from when the restarted process loaded it.
        young = [f"{r.get('cache_age_ms')} ms at +{(ts(r) - t0) / 1000:.0f}s" for r in after if (r.get("cache_age_ms") or 0) < ts(r) - t0 - 100]
        c.ok(
            f"outage review: after the restart the {name} SDKs' documents are served with their true age (older than the outage)",
            after and not young,
            f"last served age {after[-1].get('cache_age_ms') / 1000:.1f} s at +{(ts(after[-1]) - t0) / 1000:.0f}s" if after and not young else f"younger than the outage: {young[:3]}",
        )
    m = metrics()  # the restarted process's counters (since restart_ready)
    res = shield_results(m)
    transport = sum(int(v) for k, v in m.items() if k[0] == "flaggate_shield_upstream_total" and dict(k[1]).get("status") == "transport")
    c.ok(
        "outage review: flaggate's shield served stale and saw real transport failures, backing off",
        res.get("stale", 0) > 0 and transport > 0 and transport < res.get("stale", 0) / 4,
        f"restarted process: requests {res}; upstream attempts that failed in transport: {transport}",
    )


def step_recovery():
    s = load()
    back = s["marks"]["recovered"]
    # 1. A change made the moment Unleash is back. Keys that failed through the outage are backing off
    #    (up to 60 s), but the first healthy answer Unleash gives anyone ends every key's backoff
    #    (src/shield.rs): here the token sync's next attempt, itself backing off up to 30 s (+jitter) after
    #    a long outage, or any key's. So the bound adds the sync's longest backoff; the delay is printed.
    t = toggle(False)
    seen = wait_seen(False, t, SYNC_BACKOFF_MAX + FRESH_BOUND + 10)
    report_seen(f"recovery: {FLAG} turned off the moment Unleash was back (+{(t - back) / 1000:.1f}s)", seen, SYNC_BACKOFF_MAX + FRESH_BOUND)
    ng = nginx_features(back, now_ms())
    first = {app: min((x["t"] for x in ng if x["app"] == app), default=None) for app in sorted(APPS)}
    c.info(
        "recovery: flaggate's shield first reached Unleash again for the SDK keys "
        + ", ".join(f"{app} +{(v - back) / 1000:.1f}s" if v else f"{app} never" for app, v in first.items())
        + " after it was back (the key's remaining backoff)"
    )
    # 2. Once flaggate reaches Unleash again, a change gets through within TTL + poll + 2 s.
    time.sleep(1)
    t = toggle(True)
    seen = wait_seen(True, t, FRESH_BOUND + 10)
    report_seen(f"recovery: {FLAG} turned on again after flaggate reached Unleash", seen, FRESH_BOUND)
    since = now_ms()
    time.sleep(TTL + POLL + 0.5)
    polls = [r for r in gw_log(since) if r.get("app") in APPS and r["path"] == FEATURES]
    cache = {}
    for r in polls:
        cache[r.get("cache")] = cache.get(r.get("cache"), 0) + 1
    c.ok("recovery: the SDKs' polls are answered fresh again (no stale)", polls and "stale" not in cache, f"answered {cache}")
    r = request("GET", G + "/api/frontend", token=T["frontend"])
    c.ok("recovery: /api/frontend -> 200 again", r.status == 200 and "toggles" in (r.json() or {}), repr(r))


if __name__ == "__main__":
    step, args = sys.argv[1], sys.argv[2:]
    steps = {
        "ready": step_ready,
        "freshness": step_freshness,
        "unaffected": step_unaffected,
        "pre-outage": step_pre_outage,
        "mark": lambda: step_mark(args[0]),
        "outage": lambda: step_outage(args[0]),
        "hold": lambda: step_hold(float(args[0])),
        "restarted": step_restarted,
        "review": step_review,
        "recovery": step_recovery,
    }
    steps[step]()
    c.finish()
