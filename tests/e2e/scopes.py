"""Check c: the scope matrix against the real Unleash, through flaggate.

Every token kind (none, junk, expired, client, backend, frontend, admin, PAT) on a representative set of
routes gets flaggate's documented status AND body: allowed requests get Unleash's real answer (checked
for content), denials get flaggate's JSON (`code`, Unleash-shaped message, `Cache-Control: no-store`).

Then: denied requests never reach Unleash. Unleash's own request counters (/internal-backstage/prometheus,
http_request_duration_milliseconds_count by path/method/status) are read before and after a batch of
denied requests; only flaggate's control plane may show up there (token-list sync on
/api/admin/api-tokens, PAT validation on /api/admin/user). A positive control first proves that a
denied request sent to Unleash directly *does* show up in those counters.
"""

import datetime

from e2e import Checks, counter_delta, expected_denial, load_state, matches, request, unleash_counters

state = load_state()
G, U, T = state["gateway"], state["unleash"], state["tokens"]
c = Checks("c. scopes")

TOKENS = {
    "none": None,
    "junk": "e2e-junk-not-a-token",
    "junk-shaped": "*:development." + "0" * 56,
    "expired": T["expired"],
    "client": T["client"],
    "backend": T["backend"],
    "frontend": T["frontend"],
    "admin": T["admin"],
    "pat": T["pat"],
}
JUNK_PAT = "user:" + "0" * 56

REGISTER = {
    "appName": "e2e-scope-matrix",
    "instanceId": "e2e-matrix-1",
    "sdkVersion": "e2e-matrix:1",
    "strategies": ["default"],
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "interval": 10000,
}
# (method, path, body)
ROUTES = [
    ("GET", "/api/client/features", None),
    ("POST", "/api/client/register", REGISTER),
    ("GET", "/api/frontend", None),
    ("GET", "/api/proxy", None),
    ("GET", "/api/admin/projects", None),
    ("GET", "/health", None),
]
# Who may reach what (README "Who reaches what"); the status of an allowed request is Unleash's own.
ALLOWED = {
    "/api/client/features": {"client": 200, "backend": 200, "admin": 200, "pat": 200},
    "/api/client/register": {"client": 202, "backend": 202, "admin": 202, "pat": 202},
    "/api/frontend": {"frontend": 200, "admin": 200},
    "/api/proxy": {"frontend": 404, "admin": 404},  # allowed by flaggate; Unleash 7.x answers 404
    "/api/admin/projects": {"admin": 200, "pat": 200},
    "/health": {"admin": 200},
}
UNAUTHENTICATED = {"none": "no_token", "junk": "unknown_token", "junk-shaped": "unknown_token", "expired": "expired_token"}


def allowed_body_ok(path, r):
    b = r.json()
    if path == "/api/client/features":
        names = {f["name"] for f in (b or {}).get("features", [])}
        return set(state["flags"]) <= names, f"features {sorted(names)}"
    if path == "/api/client/register":
        return True, "accepted"
    if path == "/api/frontend":
        names = {t["name"] for t in (b or {}).get("toggles", [])}
        return {"e2e.enabled", "e2e.variant"} <= names and "e2e.disabled" not in names, f"toggles {sorted(names)}"
    if path == "/api/proxy":
        return matches(b, {"name": "NotFoundError"}), "Unleash NotFoundError"
    if path == "/api/admin/projects":
        ids = {p["id"] for p in (b or {}).get("projects", [])}
        return "default" in ids, f"projects {sorted(ids)}"
    if path == "/health":
        return b == {"health": "GOOD"}, "Unleash health GOOD"
    return False, "?"


def expectation(kind, path):
    """(status, body-check description, predicate) for one cell."""
    if kind in UNAUTHENTICATED:
        return 401, expected_denial(401, path, UNAUTHENTICATED[kind])
    if kind in ALLOWED[path]:
        return ALLOWED[path][kind], None
    return 403, expected_denial(403, path, "wrong_token_type")


def send(kind, token, method, path, body):
    return request(method, G + path, token=token, body=body)


def run_cell(kind, token, method, path, body):
    status, denial = expectation(kind, path)
    r = send(kind, token, method, path, body)
    short = path.replace("/api/", "")
    if r.status != status:
        return False, f"{method} {short}: expected {status}, got {r}"
    if denial is not None:
        if not matches(r.json(), denial):
            return False, f"{method} {short}: expected body with {denial}, got {r.text()}"
        if r.headers.get("cache-control") != "no-store":
            return False, f"{method} {short}: denial without Cache-Control: no-store ({r.headers.get('cache-control')})"
        return True, f"{short} {status} {denial['code']}"
    good, what = allowed_body_ok(path, r)
    if not good:
        return False, f"{method} {short}: {status} but unexpected body ({what}): {r.text()}"
    return True, f"{short} {status}"


# 0. Positive control: Unleash counts requests it denies itself, so the counter method can see leaks.
before = unleash_counters(U)
direct = request("GET", U + "/api/client/features", token=TOKENS["junk"])
after = unleash_counters(U)
delta = counter_delta(before, after, ignore_paths=("/internal-backstage/prometheus", "/api/admin/api-tokens"))
c.ok(
    "positive control: a junk token sent to Unleash directly shows up in Unleash's counters",
    direct.status == 401 and sum(delta.values()) == 1,
    f"direct {direct.status}, counter delta {delta}",
)

# 1. The matrix: one line per token kind, every route asserted (status + body).
for kind, token in TOKENS.items():
    results = [run_cell(kind, token, m, p, b) for m, p, b in ROUTES]
    bad = [d for ok, d in results if not ok]
    c.ok(f"{kind:<11} token", not bad, "; ".join(bad) if bad else ", ".join(d for _, d in results))

# Token-less CORS preflight on /api/frontend reaches Unleash (204 with its CORS headers); not elsewhere.
pre_h = {
    "Origin": "http://127.0.0.1:1",
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "authorization",
}
r = request("OPTIONS", G + "/api/frontend", headers=pre_h)
c.ok(
    "token-less OPTIONS /api/frontend (CORS preflight) answered by Unleash",
    r.status == 204 and r.headers.get("access-control-allow-origin") == "*" and "authorization" in r.headers.get("access-control-allow-headers", "").lower(),
    f"{r.status} ACAO={r.headers.get('access-control-allow-origin')} ACAH={r.headers.get('access-control-allow-headers')}",
)
r = request("OPTIONS", G + "/api/client/features", headers=pre_h)
c.ok("token-less OPTIONS /api/client/features denied", r.status == 401 and matches(r.json(), {"code": "no_token"}), repr(r))

# Unleash's own view of the expired token, for contrast (its token cache lags up to ~70 s).
d = request("GET", U + "/api/client/features", token=T["expired"])
c.info(f"expired token sent to Unleash directly: {d.status} (flaggate: 401 expired_token)")

# 2. Denied requests never reach Unleash.
CONTROL_PLANE = ("/internal-backstage/prometheus", "/api/admin/api-tokens", "/api/admin/user")
denied = [
    (kind, TOKENS[kind], m, p, b)
    for kind in TOKENS
    for m, p, b in ROUTES
    if expectation(kind, p)[0] in (401, 403)
]
before = unleash_counters(U)
statuses = [send(*cell).status for cell in denied for _ in range(2)]
after = unleash_counters(U)
leaked = counter_delta(before, after, ignore_paths=CONTROL_PLANE)
c.ok(
    f"{len(statuses)} denied requests (401/403) never reached Unleash",
    all(s in (401, 403) for s in statuses) and not leaked,
    f"Unleash counter delta outside the control plane: {leaked or 'none'}",
)
# A junk PAT costs Unleash at most one validation call (GET /api/admin/user), however often it is used.
before = unleash_counters(U)
statuses = [request(m, G + p, token=JUNK_PAT, body=b).status for m, p, b in ROUTES for _ in range(3)]
after = unleash_counters(U)
seen = counter_delta(before, after, ignore_paths=("/internal-backstage/prometheus", "/api/admin/api-tokens"))
c.ok(
    f"junk PAT: {len(statuses)} requests all 401, Unleash saw at most one validation call",
    all(s == 401 for s in statuses) and sum(seen.values()) <= 1,
    f"statuses {sorted(set(statuses))}; Unleash counter delta {seen or 'none'}",
)
c.finish()
