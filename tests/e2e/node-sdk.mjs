// Check a (Node): the real Node SDK (unleash-client) against flaggate with the `client` token.
// It must register, fetch the flags (values equal to what Unleash's admin API says), poll again and get
// 304 through the gateway, and post metrics that Unleash accepts — all seen in flaggate's JSON access log
// (app = this SDK's appName). With the shield on (run.sh), most of the SDK's conditional polls are
// answered by flaggate's cache (cache=hit_304) and never reach Unleash; once the document is older than
// the shield's TTL, flaggate revalidates it with If-None-Match, and THAT 304 is what Unleash's own request
// counters must show (so the check waits for a cache=revalidated poll instead of assuming every poll
// reaches Unleash).
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';

const require = createRequire(join(process.env.E2E_NODE_DIR, 'package.json'));
const { Unleash, InMemStorageProvider } = require('unleash-client');
const state = JSON.parse(readFileSync(process.env.E2E_STATE, 'utf8'));
const APP = 'e2e-node-sdk';
const failed = [];

function check(name, cond, detail = '') {
  const full = `a. node-sdk: ${name}`;
  if (cond) console.log(`PASS ${full}${detail ? ` (${detail})` : ''}`);
  else {
    failed.push(full);
    console.log(`FAIL ${full}${detail ? `: ${detail}` : ''}`);
  }
  return cond;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function adminTruth() {
  const truth = {};
  for (const name of state.flags) {
    const r = await fetch(`${state.unleash}/api/admin/projects/default/features/${name}`, {
      headers: { Authorization: state.tokens.admin },
    });
    if (r.status !== 200) throw new Error(`admin API ${name}: ${r.status}`);
    const env = (await r.json()).environments.find((e) => e.name === 'development');
    const active = (env.strategies || []).filter((s) => !s.disabled);
    const enabled = env.enabled && active.length > 0;
    const withVariant = enabled ? active.find((s) => (s.variants || []).length) : undefined;
    truth[name] = {
      enabled,
      variant: withVariant ? withVariant.variants[0].name : null,
      payload: withVariant ? withVariant.variants[0].payload ?? null : null,
    };
  }
  return truth;
}

function accessLog() {
  return readFileSync(state.flaggate_log, 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => {
      try {
        return JSON.parse(l);
      } catch {
        return null;
      }
    })
    .filter((r) => r && r.target === 'flaggate::access' && r.app === APP);
}

async function unleashCount(path, method, status) {
  const text = await (await fetch(`${state.unleash}/internal-backstage/prometheus`)).text();
  let n = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith('http_request_duration_milliseconds_count{')) continue;
    if (line.includes(`path="${path}"`) && line.includes(`method="${method}"`) && line.includes(`status="${status}"`))
      n += Number(line.split(' ').pop());
  }
  return n;
}

const truth = await adminTruth();
console.log(`     a. node-sdk: admin API truth ${JSON.stringify(truth)}`);
const unleash304Before = await unleashCount('/api/client/features', 'GET', '304');

const errors = [];
const client = new Unleash({
  url: `${state.gateway}/api`,
  appName: APP,
  instanceId: 'e2e-node-1',
  customHeaders: { Authorization: state.tokens.client },
  refreshInterval: 1000,
  metricsInterval: 1000,
  storageProvider: new InMemStorageProvider(),
});
client.on('error', (e) => errors.push(String(e && e.message ? e.message : e)));
client.on('warn', (w) => errors.push(`warn: ${w}`));

const synced = await Promise.race([
  new Promise((r) => client.once('synchronized', () => r(true))),
  sleep(15000).then(() => false),
]);
check('SDK synchronized through flaggate', synced, synced ? '' : `errors: ${errors.join(' | ')}`);

for (const [name, want] of Object.entries(truth)) {
  const got = client.isEnabled(name);
  check(`isEnabled(${name}) equals admin API`, got === want.enabled, `sdk=${got} admin=${want.enabled}`);
  if (want.variant) {
    const v = client.getVariant(name);
    const same = v.name === want.variant && v.enabled && JSON.stringify(v.payload) === JSON.stringify(want.payload);
    check(`getVariant(${name}) equals admin API`, same, `sdk=${JSON.stringify(v)} admin=${want.variant}/${JSON.stringify(want.payload)}`);
  }
}
for (let i = 0; i < 5; i++) for (const name of state.flags) client.isEnabled(name);

// Wait (bounded) until the log shows the whole SDK life cycle.
const want = {
  'register 202': (r) => r.method === 'POST' && r.path === '/api/client/register' && r.status === 202,
  'features 200': (r) => r.method === 'GET' && r.path === '/api/client/features' && r.status === 200,
  'features 304 (ETag poll)': (r) => r.method === 'GET' && r.path === '/api/client/features' && r.status === 304,
  'metrics 202': (r) => r.method === 'POST' && r.path === '/api/client/metrics' && r.status === 202,
  'features revalidated with Unleash by the shield (cache=revalidated)': (r) =>
    r.method === 'GET' && r.path === '/api/client/features' && r.cache === 'revalidated',
};
const deadline = Date.now() + 15000;
let lines = accessLog();
while (Date.now() < deadline && !Object.values(want).every((p) => lines.some(p))) {
  await sleep(250);
  lines = accessLog();
}
client.destroy();

for (const [what, p] of Object.entries(want)) {
  const hit = lines.find(p);
  check(
    `flaggate access log: ${what}`,
    !!hit && hit.decision === 'allowed' && hit.token_kind === 'client',
    hit ? `decision=${hit.decision} token_kind=${hit.token_kind} upstream_us=${hit.upstream_us}` : `not seen; app lines: ${JSON.stringify(lines.map((r) => `${r.method} ${r.path} ${r.status}`))}`,
  );
}
const bad = lines.filter((r) => r.status >= 400);
check('no denied or failed SDK request', bad.length === 0, bad.length ? JSON.stringify(bad) : `${lines.length} requests`);
const unleash304After = await unleashCount('/api/client/features', 'GET', '304');
check(
  "Unleash itself answered the shield's revalidation 304s (its own counter)",
  unleash304After > unleash304Before,
  `GET /api/client/features 304: ${unleash304Before} -> ${unleash304After}`,
);
const realErrors = errors.filter((e) => !e.startsWith('warn:'));
check('SDK reported no errors', realErrors.length === 0, realErrors.join(' | '));

process.exit(failed.length ? 1 : 0);
