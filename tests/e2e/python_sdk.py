"""Check a (Python): the real Python SDK (UnleashClient) against flaggate with the `backend` token.

It must register, fetch the flags (values equal to what Unleash's admin API says), poll again and get 304
through the gateway and post metrics that Unleash accepts — seen in flaggate's JSON access log (app = this
SDK's appName). With the shield on (run.sh), most conditional polls are answered by flaggate's cache
(cache=hit_304) and never reach Unleash; once the document is older than the shield's TTL, flaggate
revalidates it with If-None-Match, and that 304 is what Unleash's own request counters must show (so the
check waits for a cache=revalidated poll instead of assuming every poll reaches Unleash).
Runs in the venv (tests/e2e/work/venv) that has UnleashClient.
"""

import logging
import os
import time

from UnleashClient import UnleashClient

from e2e import Checks, access_log, admin_truth, load_state, unleash_counters

APP = "e2e-python-sdk"
state = load_state()
c = Checks("a. python-sdk")
logging.basicConfig(level=logging.WARNING)

truth = admin_truth(state)
c.info(f"admin API truth {truth}")
before = unleash_counters(state["unleash"]).get(("/api/client/features", "GET", "304"), 0)

cache_dir = os.path.join(state["work"], "python-sdk-cache")
os.makedirs(cache_dir, exist_ok=True)
client = UnleashClient(
    url=state["gateway"] + "/api",
    app_name=APP,
    instance_id="e2e-py-1",
    custom_headers={"Authorization": state["tokens"]["backend"]},
    refresh_interval=1,
    metrics_interval=1,
    cache_directory=cache_dir,
)
client.initialize_client()
deadline = time.monotonic() + 15
while not client.is_initialized and time.monotonic() < deadline:
    time.sleep(0.1)
c.ok("SDK initialized through flaggate", client.is_initialized)

for name, want in truth.items():
    got = client.is_enabled(name)
    c.ok(f"is_enabled({name}) equals admin API", got == want["enabled"], f"sdk={got} admin={want['enabled']}")
    if want["variant"]:
        v = client.get_variant(name)
        same = v.get("name") == want["variant"] and v.get("enabled") and v.get("payload") == want["payload"]
        c.ok(f"get_variant({name}) equals admin API", same, f"sdk={v} admin={want['variant']}/{want['payload']}")
for _ in range(5):
    for name in state["flags"]:
        client.is_enabled(name)

want = {
    "register 202": lambda r: r["method"] == "POST" and r["path"] == "/api/client/register" and r["status"] == 202,
    "features 200": lambda r: r["method"] == "GET" and r["path"] == "/api/client/features" and r["status"] == 200,
    "features 304 (ETag poll)": lambda r: r["method"] == "GET" and r["path"] == "/api/client/features" and r["status"] == 304,
    "metrics 202": lambda r: r["method"] == "POST" and r["path"] == "/api/client/metrics" and r["status"] == 202,
    "features revalidated with Unleash by the shield (cache=revalidated)": lambda r: r["method"] == "GET"
    and r["path"] == "/api/client/features"
    and r.get("cache") == "revalidated",
}
deadline = time.monotonic() + 15
while True:
    lines = [r for r in access_log(state["flaggate_log"]) if r.get("app") == APP]
    if all(any(p(r) for r in lines) for p in want.values()) or time.monotonic() > deadline:
        break
    time.sleep(0.25)
client.destroy()

for what, p in want.items():
    hit = next((r for r in lines if p(r)), None)
    c.ok(
        f"flaggate access log: {what}",
        hit is not None and hit["decision"] == "allowed" and hit.get("token_kind") in ("client", "backend"),
        f"decision={hit['decision']} token_kind={hit.get('token_kind')} upstream_us={hit.get('upstream_us')}"
        if hit
        else "not seen; app lines: " + str([f"{r['method']} {r['path']} {r['status']}" for r in lines]),
    )
bad = [r for r in lines if r["status"] >= 400]
c.ok("no denied or failed SDK request", not bad, str(bad) if bad else f"{len(lines)} requests")
after = unleash_counters(state["unleash"]).get(("/api/client/features", "GET", "304"), 0)
c.ok("Unleash itself answered the shield's revalidation 304s (its own counter)", after > before, f"GET /api/client/features 304: {before:g} -> {after:g}")
c.finish()
