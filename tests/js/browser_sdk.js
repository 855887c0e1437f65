// Drive the official mixpanel-browser SDK (unmodified) in Debian's headless Chromium
// through playwright-core, for tests/integration/test_sdk_browser.py.
//
// Usage: node browser_sdk.js CONFIG.json
//   CONFIG = {token, apiHost, pageUrl, modes: [{name, options}]}
// For each mode, in a fresh browser context (no cookies, no localStorage):
//   1. open pageUrl, call runScenario() and print {"event": "called", mode, ...};
//   2. wait for one line on stdin (the test has read the records off the queues);
//   3. wait until every request to apiHost has finished, then print
//      {"event": "requests", mode, requests: [{method, url, status, headers, failure,
//      records}]}, where `records` is the `data` payload decoded here, independently of
//      the server, so the test can compare what was sent with what landed.
// Ends with {"event": "done"}.  On stdin EOF the browser is closed and the script exits.
// All output on stdout is one JSON object per line; diagnostics go to stderr.
// It must not reach anything but pageUrl and apiHost.
"use strict";

const fs = require("fs");
const readline = require("readline");
const { chromium } = require("playwright-core");

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const LAUNCH_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
const SETTLE_TIMEOUT_MS = 10000;

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// `data` is raw JSON or base64 of UTF-8 JSON; one object or an array.
// Returns {format, records}.
function decodeData(value) {
  if (value === null || value === undefined) return { format: null, records: null };
  try {
    return { format: "json", records: [].concat(JSON.parse(value)) };
  } catch (e) {
    // not JSON: try base64 below
  }
  try {
    const text = Buffer.from(value, "base64").toString("utf8");
    return { format: "base64", records: [].concat(JSON.parse(text)) };
  } catch (e) {
    return { format: "undecodable", records: null, data: value.slice(0, 200) };
  }
}

function payloadOf(request) {
  const url = new URL(request.url());
  if (url.searchParams.has("data")) return url.searchParams.get("data");
  const body = request.postData();
  return body ? new URLSearchParams(body).get("data") : null;
}

// Collects every request the page sends to the worker, with its outcome.
class Recorder {
  constructor(page, apiHost) {
    this.apiOrigin = new URL(apiHost).origin;
    this.entries = [];
    this.pending = 0;
    page.on("request", (req) => this.onRequest(req));
    page.on("requestfinished", (req) => this.onFinished(req));
    page.on("requestfailed", (req) => this.onFailed(req));
  }

  mine(req) {
    return new URL(req.url()).origin === this.apiOrigin;
  }

  onRequest(req) {
    if (!this.mine(req)) return;
    this.pending += 1;
    this.entries.push({
      req, method: req.method(), url: req.url(), request_headers: req.headers(),
      ...decodeData(payloadOf(req)), status: null, headers: null, failure: null,
    });
  }

  entry(req) {
    return this.entries.find((e) => e.req === req);
  }

  async onFinished(req) {
    const entry = this.mine(req) && this.entry(req);
    if (!entry) return;
    try {
      // allHeaders() has what went on the wire (headers() omits e.g. Origin).
      entry.request_headers = await req.allHeaders();
      const resp = await req.response();
      entry.status = resp ? resp.status() : null;
      entry.headers = resp ? resp.headers() : null;
      entry.body = resp ? (await resp.text()).slice(0, 500) : null;
    } catch (e) {
      entry.failure = "response unreadable: " + e.message;
    }
    this.pending -= 1;
  }

  onFailed(req) {
    const entry = this.mine(req) && this.entry(req);
    if (!entry) return;
    entry.failure = (req.failure() || {}).errorText || "failed";
    this.pending -= 1;
  }

  async settled() {
    const deadline = Date.now() + SETTLE_TIMEOUT_MS;
    while (this.pending > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20)); // poll interval
    }
    return this.entries.map(({ req, ...rest }) => rest);
  }
}

async function runMode(browser, config, mode, nextLine) {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    page.on("console", (msg) => console.error(`[page ${mode.name}] ${msg.text()}`));
    const recorder = new Recorder(page, config.apiHost);
    await page.goto(config.pageUrl);
    const called = await page.evaluate(
      ([token, apiHost, name, options]) => window.runScenario(token, apiHost, name, options),
      [config.token, config.apiHost, mode.name, mode.options]);
    emit({ event: "called", mode: mode.name, page_origin: new URL(config.pageUrl).origin,
           ...called });
    if ((await nextLine()).done) return false;
    emit({ event: "requests", mode: mode.name, requests: await recorder.settled() });
    return true;
  } finally {
    await context.close();
  }
}

async function main() {
  const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const nextLine = () => lines.next();
  const browser = await chromium.launch({
    executablePath: CHROMIUM, headless: true, args: LAUNCH_ARGS,
  });
  try {
    emit({ event: "started", version: browser.version() });
    for (const mode of config.modes) {
      if (!(await runMode(browser, config, mode, nextLine))) return;
    }
    emit({ event: "done" });
  } finally {
    await browser.close();
  }
}

main().then(() => process.exit(0), (err) => {
  console.error(err && err.stack ? err.stack : err);
  emit({ event: "error", error: String(err && err.message ? err.message : err) });
  process.exit(2);
});
