// Runs page.js in headless Chromium (Debian's /usr/bin/chromium driven by playwright-core) from
// the given page origins against the gateway, and prints one JSON object with what each page saw.
//
//   node run.mjs '{"url": "http://127.0.0.1:<envoy>/mcp", "token": "...", "badToken": "...",
//                  "noScopeToken": "...", "pages": [<port>, <port>]}'
//
// Each page is served from http://127.0.0.1:<port> (one origin per port; the gateway is another
// port, so every request from the page is cross-origin). CHROMIUM overrides the browser path.
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const params = JSON.parse(process.argv[2] ?? '{}');
if (!params.url || !Array.isArray(params.pages)) {
  console.error('usage: node run.mjs \'{"url": …, "token": …, "pages": [port, …]}\'');
  process.exit(2);
}

const bundle = await esbuild.build({
  entryPoints: [path.join(here, 'page.js')],
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: 'chrome120',
  write: false,
  logLevel: 'error',
});
const script = bundle.outputFiles[0].contents;
const html = '<!doctype html><meta charset="utf-8"><title>gateway browser test</title><script src="/page.js"></script>';

function serve(port) {
  const server = http.createServer((req, res) => {
    if (req.url === '/page.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(script);
    } else {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(html);
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

const servers = await Promise.all(params.pages.map(serve));
// Headless, no sandbox (CI runs as root), no GPU, and none of Chromium's own network traffic
// (there is no network beyond loopback and the package registries). Playwright gives the browser
// a fresh empty profile of its own.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const result = { browser: browser.version(), pages: [] };
try {
  for (const port of params.pages) {
    const page = await browser.newPage();
    const console_ = [];
    page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`));
    await page.goto(`http://127.0.0.1:${port}/`);
    await page.waitForFunction(() => window.gatewayBrowserTest !== undefined);
    const seen = await page.evaluate((p) => window.gatewayBrowserTest.run(p), params);
    seen.console = console_;
    result.pages.push(seen);
    await page.close();
  }
} finally {
  await browser.close();
  servers.forEach((s) => s.close());
}
process.stdout.write(`${JSON.stringify(result)}\n`);
