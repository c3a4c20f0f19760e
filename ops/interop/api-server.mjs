// An Express API protected by @x402/express (and x402-express), in its own process, as an
// API server runs: the benchmark's paid routes. Prints `api on URL` once it listens.
//
// Usage: node api-server.mjs CONFIG.json FACILITATOR_URL
import fs from "node:fs";
import { startApi } from "./harness.mjs";

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const api = await startApi(cfg, process.argv[3], { v1: cfg.v1 ?? false, v2: true });
console.log(`api on ${api.url}`);
process.on("SIGTERM", () => process.exit(0));
