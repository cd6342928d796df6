"""Seeds the fresh Unleash through its own admin API (directly, not through flaggate) and records the
result in the state file: feature flags, a `client`-type API token, an already-expired client token and a
personal access token (PAT) created from an admin login session.

Flags (project `default`):
  e2e.enabled   enabled in development, `default` strategy          -> true
  e2e.disabled  has a `default` strategy in development, env is off  -> false
  e2e.variant   enabled in development, 100 % flexibleRollout with one strategy variant `blue` (payload "b")
"""

import sys

from e2e import admin_session, create_pat, load_state, request, save_state

state = load_state()
U = state["unleash"]
ADMIN = state["tokens"]["admin"]


def admin(method, path, body=None, want=(200, 201)):
    r = request(method, U + path, token=ADMIN, body=body)
    if r.status not in want:
        sys.exit(f"setup: {method} {path} -> {r}")
    return r.json()


def create_flag(name, strategy, on):
    admin("POST", "/api/admin/projects/default/features", {"name": name, "type": "release"})
    admin("POST", f"/api/admin/projects/default/features/{name}/environments/development/strategies", strategy)
    if on:
        admin("POST", f"/api/admin/projects/default/features/{name}/environments/development/on")


create_flag("e2e.enabled", {"name": "default"}, on=True)
create_flag("e2e.disabled", {"name": "default"}, on=False)
create_flag(
    "e2e.variant",
    {
        "name": "flexibleRollout",
        "parameters": {"rollout": "100", "stickiness": "default", "groupId": "e2e.variant"},
        "variants": [
            {
                "name": "blue",
                "weight": 1000,
                "weightType": "variable",
                "stickiness": "default",
                "payload": {"type": "string", "value": "b"},
            }
        ],
    },
    on=True,
)
state["flags"] = ["e2e.enabled", "e2e.disabled", "e2e.variant"]

# A `client`-type token (the INIT_BACKEND_API_TOKENS one is a `backend` token: both kinds get covered).
t = admin(
    "POST",
    "/api/admin/api-tokens",
    {"tokenName": "e2e-client", "type": "client", "projects": ["*"], "environment": "development"},
)
state["tokens"]["client"] = t["secret"]

# Created already expired: Unleash lists it (with expiresAt) and, for up to a minute, still accepts it.
t = admin(
    "POST",
    "/api/admin/api-tokens",
    {
        "tokenName": "e2e-expired",
        "type": "client",
        "projects": ["*"],
        "environment": "development",
        "expiresAt": "2020-01-01T00:00:00.000Z",
    },
)
state["tokens"]["expired"] = t["secret"]

# PAT: log in as the default admin (session cookie), then create the PAT with that session.
state["tokens"]["pat"], _ = create_pat(U, admin_session(U), "e2e")

save_state(state)
print(
    "setup: flags "
    + ", ".join(state["flags"])
    + "; tokens "
    + ", ".join(f"{k}={v.split('.')[0] if '.' in v else v[:9]}…" for k, v in state["tokens"].items())
)
