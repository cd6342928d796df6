// Check g (Node side): real Node SDKs (unleash-client, `client` token) polling flaggate, for the shield
// check driven by shield.py. Two modes, both printing JSON lines (one object per line, `t` = Unix ms):
//
//   node shield-node.mjs watch N   N SDK instances (one appName, instanceIds e2e-shield-node-<i>) polling
//                                  every POLL_MS; each is evaluated every 100 ms and a line is printed
//                                  when its values change ({"ev":"change"}), every 2 s for all of them
//                                  ({"ev":"tick"}), when it first synchronized ({"ev":"ready"}), and for
//                                  every SDK error/warn event ({"ev":"error"}). Runs until SIGTERM.
//   node shield-node.mjs once      a FRESH SDK (in-memory storage: no backup file to fall back on, its
//                                  own appName) starts, waits up to 10 s to synchronize, prints
//                                  {"ev":"once", "synced", "snap", "errors"} and exits.
//
// A snapshot (`snap`) is {flag: {enabled, variant, payload}}: the same shape as e2e.py's admin_truth().
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';

const require = createRequire(join(process.env.E2E_NODE_DIR, 'package.json'));
const { Unleash, InMemStorageProvider } = require('unleash-client');
const state = JSON.parse(readFileSync(process.env.E2E_STATE, 'utf8'));
const POLL_MS = Number(process.env.E2E_SHIELD_POLL_MS || 1000);
const mode = process.argv[2];
const out = (o) => process.stdout.write(`${JSON.stringify({ t: Date.now(), ...o })}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function snapshot(client) {
  const snap = {};
  for (const name of state.flags) {
    const v = client.getVariant(name);
    snap[name] = {
      enabled: client.isEnabled(name),
      variant: v && v.enabled ? v.name : null,
      payload: v && v.enabled ? (v.payload ?? null) : null,
    };
  }
  return snap;
}

function start(appName, instanceId, errors) {
  const client = new Unleash({
    url: `${state.gateway}/api`,
    appName,
    instanceId,
    customHeaders: { Authorization: state.tokens.client },
    refreshInterval: POLL_MS,
    metricsInterval: 5000,
    // No file backup: a fresh instance can only have what flaggate gives it.
    storageProvider: new InMemStorageProvider(),
  });
  client.on('error', (e) => errors(`error: ${e && e.message ? e.message : e}`));
  client.on('warn', (w) => errors(`warn: ${w}`));
  return client;
}

if (mode === 'watch') {
  const n = Number(process.argv[3] || 1);
  const clients = [];
  const last = [];
  for (let i = 0; i < n; i++) {
    const c = start('e2e-shield-node', `e2e-shield-node-${i}`, (msg) => out({ ev: 'error', i, msg }));
    c.once('synchronized', () => {
      last[i] = JSON.stringify(snapshot(c));
      out({ ev: 'ready', i, snap: snapshot(c) });
    });
    clients.push(c);
  }
  let lastTick = 0;
  setInterval(() => {
    clients.forEach((c, i) => {
      if (last[i] === undefined) return;
      const s = snapshot(c);
      const j = JSON.stringify(s);
      if (j !== last[i]) {
        last[i] = j;
        out({ ev: 'change', i, snap: s });
      }
    });
    if (Date.now() - lastTick >= 2000) {
      lastTick = Date.now();
      out({ ev: 'tick', snaps: clients.map((c, i) => (last[i] === undefined ? null : snapshot(c))) });
    }
  }, 100);
  const stop = () => {
    clients.forEach((c) => c.destroy());
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else if (mode === 'once') {
  const errors = [];
  const started = Date.now();
  const c = start('e2e-shield-node-fresh', `e2e-shield-node-fresh-${process.pid}`, (m) => errors.push(m));
  const synced = await Promise.race([
    new Promise((r) => c.once('synchronized', () => r(true))),
    sleep(10000).then(() => false),
  ]);
  out({ ev: 'once', synced, took_ms: Date.now() - started, snap: snapshot(c), errors });
  c.destroy();
  process.exit(0);
} else {
  console.error('usage: node shield-node.mjs watch N | once');
  process.exit(2);
}
