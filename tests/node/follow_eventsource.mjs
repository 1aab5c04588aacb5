// Follows one SSE URL with the `eventsource` package (a WhatWG-following EventSource, installed
// into $ECO2_NODE_DIR by `make node-tools`) the way a browser app would: a listener per event name
// in $SSE_EVENTS, an `error` listener, close on `done` or `failed`. Prints what it saw as JSON.
import { createRequire } from "node:module";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(resolve(process.env.ECO2_NODE_DIR ?? ".local/node", "package.json"));
const { EventSource } = await import(pathToFileURL(require.resolve("eventsource")).href);

const [url, timeoutMs] = [process.argv[2], Number(process.argv[3] ?? 30000)];
const names = JSON.parse(process.env.SSE_EVENTS);
const seen = { events: [], errors: [], unnamed: 0, terminal: null, timedOut: false };
const es = new EventSource(url);

function finish() {
  es.close();
  console.log(JSON.stringify(seen));
  process.exit(0);
}

for (const name of names) {
  es.addEventListener(name, (ev) => {
    if (ev.data === undefined) return; // a connection error, were a job event named `error`
    const data = JSON.parse(ev.data);
    seen.events.push({ name, id: ev.lastEventId, seq: data.seq, status: data.status });
    if (name === "done" || name === "failed") {
      seen.terminal = name;
      finish();
    }
  });
}
es.addEventListener("message", () => (seen.unnamed += 1));
// Only the connection's own trouble may arrive here: a job event named `error` would too.
es.addEventListener("error", (ev) => {
  seen.errors.push({ data: ev.data ?? null, code: ev.code ?? null, readyState: es.readyState });
  if (es.readyState === es.CLOSED) finish();
});
setTimeout(() => {
  seen.timedOut = true;
  finish();
}, timeoutMs);
