"""Check g (Python side): real Python SDKs (UnleashClient, `backend` token) polling flaggate, for the shield
check driven by shield.py. Same two modes and JSON-line output as shield-node.mjs (`t` = Unix ms):

  python shield_python.py watch N   N SDK instances (app e2e-shield-python, instance ids
                                    e2e-shield-python-<i>, each with its own fresh cache directory)
                                    polling every E2E_SHIELD_POLL_S; evaluated every 100 ms: "ready",
                                    "change", "tick" (every 2 s) lines, and an "error" line for every
                                    WARNING-or-worse record of the SDK's logger. Runs until SIGTERM.
  python shield_python.py once      a FRESH SDK (new empty cache directory: nothing to bootstrap from)
                                    fetches once through flaggate, prints {"ev": "once", "snap", ...}.

Runs in the venv (tests/e2e/work/venv) that has UnleashClient.
"""

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time

from UnleashClient import UnleashClient

from e2e import load_state

state = load_state()
POLL_S = int(os.environ.get("E2E_SHIELD_POLL_S", "1"))
_lock = threading.Lock()


def out(**o):
    with _lock:
        sys.stdout.write(json.dumps({"t": int(time.time() * 1000), **o}) + "\n")
        sys.stdout.flush()


class ToLines(logging.Handler):
    def __init__(self, sink):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record):
        self.sink(f"{record.levelname}: {record.getMessage()}")


def snapshot(client):
    snap = {}
    for name in state["flags"]:
        v = client.get_variant(name)
        on = bool(v.get("enabled"))
        snap[name] = {
            "enabled": client.is_enabled(name),
            "variant": v.get("name") if on else None,
            "payload": v.get("payload") if on else None,
        }
    return snap


def start(app, instance):
    client = UnleashClient(
        url=state["gateway"] + "/api",
        app_name=app,
        instance_id=instance,
        custom_headers={"Authorization": state["tokens"]["backend"]},
        refresh_interval=POLL_S,
        metrics_interval=5,
        cache_directory=tempfile.mkdtemp(prefix="e2e-shield-py-", dir=state["work"]),
    )
    client.initialize_client()  # the first fetch happens here, synchronously
    return client


def watch(n):
    logging.getLogger("UnleashClient").addHandler(ToLines(lambda m: out(ev="error", msg=m)))
    logging.getLogger("UnleashClient").propagate = False
    clients, last = [], []
    for i in range(n):
        c = start("e2e-shield-python", f"e2e-shield-python-{i}")
        clients.append(c)
        s = snapshot(c)
        last.append(json.dumps(s, sort_keys=True))
        out(ev="ready", i=i, snap=s)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    last_tick = 0.0
    while not stop.is_set():
        snaps = []
        for i, c in enumerate(clients):
            s = snapshot(c)
            snaps.append(s)
            j = json.dumps(s, sort_keys=True)
            if j != last[i]:
                last[i] = j
                out(ev="change", i=i, snap=s)
        if time.monotonic() - last_tick >= 2:
            last_tick = time.monotonic()
            out(ev="tick", snaps=snaps)
        stop.wait(0.1)
    for c in clients:
        c.destroy()


def once():
    errors = []
    logging.getLogger("UnleashClient").addHandler(ToLines(errors.append))
    logging.getLogger("UnleashClient").propagate = False
    started = time.monotonic()
    c = start("e2e-shield-python-fresh", f"e2e-shield-python-fresh-{os.getpid()}")
    out(ev="once", synced=c.is_initialized, took_ms=int((time.monotonic() - started) * 1000), snap=snapshot(c), errors=errors)
    c.destroy()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "watch":
        watch(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    elif len(sys.argv) >= 2 and sys.argv[1] == "once":
        once()
    else:
        sys.exit("usage: shield_python.py watch N | once")
