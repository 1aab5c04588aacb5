// Validates an AsyncAPI document with the official parser (@asyncapi/parser, installed into
// $ECO2_NODE_DIR by `make node-tools`). Prints a JSON summary; exits 1 on any error diagnostic.
import { createRequire } from "node:module";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(resolve(process.env.ECO2_NODE_DIR ?? ".local/node", "package.json"));
const { Parser, fromFile } = await import(pathToFileURL(require.resolve("@asyncapi/parser")).href);

const { document, diagnostics } = await fromFile(new Parser(), process.argv[2]).parse();
const problems = diagnostics.filter((d) => d.severity <= 1); // 0 error, 1 warning
const errors = diagnostics.filter((d) => d.severity === 0);
const summary = {
  valid: document !== undefined && errors.length === 0,
  version: document?.version(),
  channels: document ? document.channels().all().map((c) => c.address()) : [],
  operations: document ? document.operations().all().map((o) => o.id()) : [],
  messages: document ? document.components().messages().all().map((m) => m.id()) : [],
  problems: problems.map((d) => ({ severity: d.severity, path: d.path.join("/"), message: d.message })),
};
console.log(JSON.stringify(summary, null, 2));
process.exit(summary.valid ? 0 : 1);
