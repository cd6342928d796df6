"""Check d: token sync, revocation and expiry, measured.

0. While nothing changes, the 1 s token sync costs Unleash a 304 (If-None-Match), not the whole list.

1. A client token created through Unleash's admin API works through flaggate (a miss pulls the token
   sync forward). Deleted through the admin API, flaggate denies it (401 unknown_token) within
   sync interval + 1 s, while Unleash itself, which caches tokens for up to ~60-70 s, still accepts it
   (printed for contrast; Unleash's lag is not asserted).
2. A PAT deleted through the admin API is refused at once and denied by flaggate itself (401
   unknown_token, never forwarded) within sync interval + 1 s (its PAT cache TTL).
3. A token created with expiresAt a few seconds ahead works until then and is denied (401 expired_token)
   from that second on — no sync needed — while Unleash keeps accepting it for about a minute.
"""

import datetime
import time
import urllib.parse

from e2e import Checks, admin_session, create_pat, load_state, matches, request, unleash_counters

state = load_state()
G, U, ADMIN = state["gateway"], state["unleash"], state["tokens"]["admin"]
SYNC = float(state["sync_interval_s"])
c = Checks("d. revocation")


def create(name, expires_at=None):
    body = {"tokenName": name, "type": "client", "projects": ["default"], "environment": "development"}
    if expires_at:
        body["expiresAt"] = expires_at
    r = request("POST", U + "/api/admin/api-tokens", token=ADMIN, body=body)
    if r.status != 201:
        raise SystemExit(f"admin API: create token -> {r}")
    return r.json()["secret"]


def poll(token, want_status, limit, url=G):
    """Polls GET /api/client/features until want_status; returns (response, seconds)."""
    started = time.monotonic()
    while True:
        r = request("GET", url + "/api/client/features", token=token)
        took = time.monotonic() - started
        if r.status == want_status or took > limit:
            return r, took
        time.sleep(0.05)


# 0. The token sync is cheap when nothing changes: flaggate polls with If-None-Match and Unleash answers
#    304 (Unleash's own counters for GET /api/admin/api-tokens over a quiet window).
before = unleash_counters(U)
time.sleep(3 * SYNC + 0.5)
after = unleash_counters(U)
n304 = after.get(("/api/admin/api-tokens", "GET", "304"), 0) - before.get(("/api/admin/api-tokens", "GET", "304"), 0)
n200 = after.get(("/api/admin/api-tokens", "GET", "200"), 0) - before.get(("/api/admin/api-tokens", "GET", "200"), 0)
c.ok(
    "token sync polls with ETag: Unleash answers 304 while the list is unchanged",
    n304 >= 2,
    f"Unleash counted GET /api/admin/api-tokens: {n304:g} x 304, {n200:g} x 200 in {3 * SYNC + 0.5:.1f}s",
)

# 1. delete
tok = create("e2e-revoke")
r, took = poll(tok, 200, 5)
c.ok("new token works through flaggate", r.status == 200, f"{r.status} {took:.2f}s after creation")

path = "/api/admin/api-tokens/" + urllib.parse.quote(tok, safe="")
d = request("DELETE", U + path, token=ADMIN)
deleted_at = time.monotonic()
c.ok("token deleted through the admin API", d.status == 200, repr(d))

r, took = poll(tok, 401, SYNC + 5)
c.ok(
    f"flaggate denies the deleted token within sync interval + 1 s ({SYNC + 1:.1f}s)",
    r.status == 401 and matches(r.json(), {"code": "unknown_token"}) and took <= SYNC + 1,
    f"flaggate: {r.status} {r.json() and r.json().get('code')} {took:.2f}s after DELETE",
)
direct = request("GET", U + "/api/client/features", token=tok)
c.info(
    f"Unleash directly, {time.monotonic() - deleted_at:.2f}s after DELETE: {direct.status}"
    + (" (still accepts the deleted token: its token cache lags)" if direct.status == 200 else "")
)

# 2. PAT deletion: Unleash drops a deleted PAT at once; flaggate re-validates a PAT after its cache TTL
#    (the sync interval), so it must answer 401 at once (forwarded: Unleash's own 401) and its own
#    401 unknown_token within sync interval + 1 s.
cookie = admin_session(U)
pat, pat_id = create_pat(U, cookie, "e2e-revoke")
r, took = poll(pat, 200, 3)
c.ok("new PAT works through flaggate", r.status == 200, f"{r.status} {took:.2f}s after creation")
d = request("DELETE", f"{U}/api/admin/user/tokens/{pat_id}", headers={"Cookie": cookie})
deleted_at = time.monotonic()
c.ok("PAT deleted through the admin API (session)", d.status == 200, repr(d))
first = request("GET", G + "/api/client/features", token=pat)
c.ok(
    "deleted PAT is refused at once",
    first.status == 401,
    f"{first.status} {first.text(120)} {time.monotonic() - deleted_at:.2f}s after DELETE",
)
started = time.monotonic()
while True:
    r = request("GET", G + "/api/client/features", token=pat)
    own = r.status == 401 and matches(r.json(), {"code": "unknown_token"})
    if own or time.monotonic() - deleted_at > SYNC + 5:
        break
    time.sleep(0.05)
took = time.monotonic() - deleted_at
c.ok(
    f"flaggate itself denies the deleted PAT within sync interval + 1 s ({SYNC + 1:.1f}s)",
    own and took <= SYNC + 1,
    f"{r.status} {r.json() and r.json().get('code')} {took:.2f}s after DELETE",
)

# 3. expiry to the second
expires = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=4)
tok = create("e2e-expiring", expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
r, took = poll(tok, 200, 3)
c.ok("token expiring in ~4 s works through flaggate before expiresAt", r.status == 200, f"{r.status}")
left = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
r, took = poll(tok, 401, left + 3)
late = took - left
c.ok(
    "flaggate denies it from expiresAt on (expired_token, within 1 s)",
    r.status == 401 and matches(r.json(), {"code": "expired_token"}) and -0.05 <= late <= 1.0,
    f"{r.status} {r.json() and r.json().get('code')} {late:+.2f}s relative to expiresAt",
)
direct = request("GET", U + "/api/client/features", token=tok)
c.info(f"Unleash directly, {late:+.2f}s after expiresAt: {direct.status}" + (" (still accepts the expired token)" if direct.status == 200 else ""))
c.finish()
