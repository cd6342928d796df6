// Starts a real Unleash (unleash-server from tests/e2e/work/node) configured by environment variables:
// DATABASE_URL, DATABASE_SSL, HTTP_HOST, HTTP_PORT, CHECK_VERSION, SEND_TELEMETRY, INIT_*_API_TOKENS.
// Run by run.sh as `node unleash.mjs`, with E2E_NODE_DIR pointing at the npm install folder.
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';

const dir = process.env.E2E_NODE_DIR;
if (!dir) throw new Error('E2E_NODE_DIR is not set');
const entry = join(dir, 'node_modules', 'unleash-server', 'dist', 'lib', 'server-impl.js');
const { start } = await import(pathToFileURL(entry).href);
const unleash = await start({});
// run.sh reads the port from this line: HTTP_PORT=0 lets the kernel choose it.
const { address, port } = unleash.server.address();
console.log(`e2e: unleash-server listening on ${address}:${port}`);
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, async () => {
    try {
      await unleash.stop();
    } finally {
      process.exit(0);
    }
  });
}
