// Drive the official `mixpanel` npm SDK (unmodified) through a plan of calls, for
// tests/integration/test_sdk_node.py.
//
// Usage: node node_sdk.js PLAN.json
//   PLAN = {"clients": {"<name>": {token, options}}, "steps": [{client, method, args}]}
//   `method` is a dotted path on the client ("track", "people.set", "groups.set",
//   "track_batch", "import", ...); the step's callback is appended to `args`.
//   {"$date": <ms>} anywhere in args becomes a JavaScript Date.
// Steps run one after another (each waits for its callback) so records land in order.
// Prints one JSON object on stdout: {"results": [{step, error}], "requests": [{method,
// path, body}]}; `requests` is what went over the wire, observed by wrapping
// http.request (the SDK itself is not touched).  Everything else goes to stderr.
// This script must not talk to anything but the hosts named in the plan.
"use strict";

const fs = require("fs");
const http = require("http");
const Mixpanel = require("mixpanel");

const STEP_TIMEOUT_MS = 10000;

// Record every request's method, path and written body.  The SDK looks up
// `http.request` at call time, so wrapping the module property is enough.
const requests = [];
const originalRequest = http.request;
http.request = function (options, ...rest) {
  const seen = { method: options.method, path: options.path, body: "" };
  requests.push(seen);
  const req = originalRequest.call(this, options, ...rest);
  const write = req.write;
  req.write = function (chunk, ...more) {
    seen.body += String(chunk);
    return write.call(this, chunk, ...more);
  };
  return req;
};

const stderrLogger = {};
for (const level of ["trace", "debug", "info", "warn", "error"]) {
  stderrLogger[level] = (...args) => console.error(`[${level}]`, ...args);
}

function revive(value) {
  if (Array.isArray(value)) return value.map(revive);
  if (value && typeof value === "object") {
    if (Object.keys(value).length === 1 && typeof value.$date === "number") {
      return new Date(value.$date);
    }
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = revive(v);
    return out;
  }
  return value;
}

function errorText(err) {
  if (!err) return null;
  if (Array.isArray(err)) return err.map(errorText);
  return err.message || String(err);
}

function resolve(client, dotted) {
  const parts = dotted.split(".");
  let owner = client;
  for (const part of parts.slice(0, -1)) owner = owner[part];
  const fn = owner[parts[parts.length - 1]];
  if (typeof fn !== "function") throw new Error(`no such SDK method: ${dotted}`);
  return fn.bind(owner);
}

function runStep(client, step) {
  return new Promise((done) => {
    const timer = setTimeout(() => done({ error: "callback not called" }), STEP_TIMEOUT_MS);
    const callback = (err) => {
      clearTimeout(timer);
      done({ error: errorText(err) });
    };
    try {
      resolve(client, step.method)(...revive(step.args || []), callback);
    } catch (err) {
      clearTimeout(timer);
      done({ error: "threw: " + errorText(err) });
    }
  });
}

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const clients = {};
  for (const [name, spec] of Object.entries(plan.clients)) {
    clients[name] = Mixpanel.init(spec.token, { logger: stderrLogger, ...spec.options });
  }
  const results = [];
  for (const [index, step] of plan.steps.entries()) {
    const outcome = await runStep(clients[step.client], step);
    results.push({ step: index, method: step.method, error: outcome.error });
  }
  process.stdout.write(JSON.stringify({ results, requests }) + "\n");
  // Keep-alive agents would hold the process open; the work is done.
  process.exit(0);
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(2);
});
