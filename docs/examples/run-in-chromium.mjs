// Runs one of the browser examples in headless Chromium on a duet origin and prints what it
// logs, so the examples in docs/api.md can be checked against a running service:
//
//   node docs/examples/run-in-chromium.mjs http://127.0.0.1:8080 docs/examples/eventsource.js done
//
// Arguments: the service's origin, the script, and the start of the log line that ends the
// run. Uses Debian's chromium and the playwright-core installed for e2e/ (npm ci in e2e/).
import { readFileSync } from 'node:fs';
import { chromium } from '../../e2e/node_modules/playwright-core/index.mjs';

const [origin, file, until] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] });
const page = await browser.newPage();
// Any same-origin page will do; the script then runs as if the service had served it.
await page.goto(`${origin}/healthz`);
const finished = new Promise((resolve) => {
  page.on('console', (message) => {
    // The favicon's 404 and a refused fetch also show up as console errors.
    if (message.text().startsWith('Failed to load resource')) return;
    console.log(message.text());
    if (message.text().startsWith(until)) resolve();
  });
});
await page.addScriptTag({ content: readFileSync(file, 'utf8') });
await Promise.race([finished, new Promise((resolve) => setTimeout(resolve, 20_000))]);
await browser.close();
