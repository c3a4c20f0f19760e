// The facilitator benchmark (ops/bench-facilitator.sh runs it): the same paid-request load
// through x402-batcher and through the official reference facilitator, on one devnet with
// 1 s blocks, in one run. An Express API protected by @x402/express (its own process)
// points at one facilitator or the other; paid requests, their payment headers signed by
// the official client (@x402/core + @x402/evm) beforehand, one payer per concurrent
// request, are sent at concurrency 1, 10 and 100 in `included` mode on three chains (the
// devnet switched between automine, 1 s and 2 s blocks), and in `accepted` mode on 1 s
// blocks. The daemon runs with the built-in defaults and the node's WebSocket URL
// (`ws_url`: heads pushed; BENCH_NO_WS=1 leaves it out). Each facilitator reaches anvil
// through its own counting proxy, so RPC calls per payment are its own (a head pushed over
// the WebSocket is not a call; the subscription is one per connection, not counted). Gas
// per payment comes from the receipts of the transactions the settle answers name. Raw
// `/verify` throughput is `x402-batcher loadgen --facilitator` against each.
//
// Usage: node bench.mjs --bin PATH --dir DIR --rpc URL --token ADDRESS [--requests N]
//        [--only 1s-c100,...] [--ours-only]
import fs from "node:fs";
import path from "node:path";
import { spawn } from "node:child_process";
import { parseArgs } from "node:util";
import { keccak256, toBytes } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { x402Client } from "@x402/core/client";
import { decodePaymentRequiredHeader, encodePaymentSignatureHeader } from "@x402/core/http";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { listen, pool, percentile } from "./harness.mjs";

const { values: args } = parseArgs({
  options: {
    bin: { type: "string" },
    dir: { type: "string" },
    rpc: { type: "string" },
    token: { type: "string" },
    "chain-id": { type: "string", default: "84532" },
    requests: { type: "string", default: "1000" },
    "verify-payments": { type: "string", default: "20000" },
    // A second devnet behind the flashblocks stand-in (x402-batcher devnet --flashblocks-ms).
    "preconf-dir": { type: "string" },
    "preconf-rpc": { type: "string" },
    "preconf-token": { type: "string" },
    // Only these `included` phases, e.g. "1s-c100,preconf-c100" (to re-measure one case;
    // skips raw /verify, `accepted` and the no-op control). `--ours-only`: no reference.
    only: { type: "string" },
    "ours-only": { type: "boolean", default: false },
  },
});
const chainId = Number(args["chain-id"]);
const only = args.only ? new Set(args.only.split(",")) : null;
/** Whether the `included` phase of `chain` at `concurrency` runs (see `--only`). */
const wanted = (chain, concurrency) => !only || only.has(`${chain}-c${concurrency}`);
/** The facilitators an `included` phase runs against (see `--ours-only`). */
const sides = (all) => (args["ours-only"] ? all.slice(0, 1) : all);
const PAY_TO = "0x534e3bcb27673292EB2b58fdeD126624F7d67f21";
// anvil's third well-known development account: the reference facilitator's settler.
const REFERENCE_KEY = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
const payerKey = (i) => keccak256(toBytes(`x402-batcher devnet payer loadgen ${i}`));
const children = [];
process.on("exit", () => children.forEach((c) => c.kill("SIGTERM")));

/** A JSON-RPC pass-through to anvil that counts the calls made through it. */
async function countingProxy(target) {
  const counter = { calls: 0, methods: {} };
  const { url } = await listen((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", async () => {
      const body = Buffer.concat(chunks);
      try {
        const parsed = JSON.parse(body.toString());
        for (const call of Array.isArray(parsed) ? parsed : [parsed]) {
          counter.calls += 1;
          counter.methods[call.method] = (counter.methods[call.method] ?? 0) + 1;
        }
      } catch {}
      const reply = await fetch(target, { method: "POST", headers: { "content-type": "application/json" }, body });
      res.writeHead(reply.status, { "content-type": "application/json" });
      res.end(Buffer.from(await reply.arrayBuffer()));
    });
  });
  return { url, counter };
}

/** Starts `cmd args`, resolves with the rest of the first stdout line starting `prefix`. */
function startProcess(cmd, argv, prefix, env = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "inherit"] });
    children.push(child);
    let buffered = "";
    child.stdout.on("data", (d) => {
      buffered += d.toString();
      for (const line of buffered.split("\n")) {
        if (line.startsWith(prefix)) resolve({ child, value: line.slice(prefix.length).trim() });
      }
    });
    child.on("exit", (code) => reject(new Error(`${cmd} exited (${code}) before printing ${prefix}`)));
  });
}

/** Runs a command to its end; resolves with its stdout. */
function runProcess(cmd, argv) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (d) => (out += d.toString()));
    child.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} exited ${code}`))));
  });
}

/**
 * The daemon on the devnet `x402-batcher devnet` prepared in `dir`, in `mode`, with the
 * built-in defaults for everything a first-time operator would leave alone (the engine's
 * pace, the batching policy, confirmations).
 */
async function startDaemon(mode, rpc, { dir = args.dir, token = args.token, chainExtra = wsLine(args.rpc) } = {}) {
  const ledger = path.join(dir, `ledger-${mode}-${Date.now()}`);
  const config = path.join(dir, `bench-${mode}.toml`);
  fs.writeFileSync(
    config,
    `[[tokens]]\nchain_id = ${chainId}\naddress = "${token}"\neip712_name = "USD Coin"\neip712_version = "2"\ndecimals = 6\n\n` +
      `[server]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n` +
      `[facilitator]\nlisten = "127.0.0.1:0"\nsettle_mode = "${mode}"\n` +
      `[ledger]\npath = "${ledger}"\n[[chains]]\nchain_id = ${chainId}\nrpc_url = "${rpc}"\n${chainExtra}` +
      `[settlement]\nsettler_keys_file = "${path.join(dir, "settler.keys")}"\n`,
  );
  const { child, value } = await startProcess(args.bin, ["run", "--config", config], "facilitator on ", { RUST_LOG: process.env.BENCH_RUST_LOG ?? "warn" });
  return { child, url: `http://${value}` };
}

/** The chain entry's `ws_url` line: anvil's own WebSocket (heads pushed; not through the counting proxy, which speaks HTTP). */
function wsLine(rpc) {
  return process.env.BENCH_NO_WS ? "" : `ws_url = "${rpc.replace("http://", "ws://")}"\n`;
}

/** Sets the devnet's block production: `0` mines each transaction at once, else a block every `secs`. */
async function setMining(secs) {
  const call = async (method, params) => {
    const reply = await fetch(args.rpc, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ jsonrpc: "2.0", id: 1, method, params }),
    });
    const body = await reply.json();
    if (body.error) throw new Error(`${method}: ${JSON.stringify(body.error)}`);
  };
  if (secs === 0) {
    await call("evm_setIntervalMining", [0]);
    await call("evm_setAutomine", [true]);
  } else {
    await call("evm_setAutomine", [false]);
    await call("evm_setIntervalMining", [secs]);
  }
}

const here = path.dirname(new URL(import.meta.url).pathname);
const apiConfig = {
  chainId,
  asset: args.token,
  assetName: "USD Coin",
  assetVersion: "2",
  decimals: 6,
  payTo: PAY_TO,
  price: "1000",
  token: null,
  v1Network: "base-sepolia",
};

/**
 * Payment headers for `n` paid requests to `url`, signed by the official client
 * (@x402/core + @x402/evm) for the requirements the API's 402 names, round robin over
 * `payers` accounts. Signed before the timed window: signing in JS costs milliseconds of
 * the load generator's CPU, which on two cores would otherwise be measured as latency.
 */
async function presign(url, payers, n) {
  const unpaid = await fetch(url);
  await unpaid.text();
  const required = decodePaymentRequiredHeader(unpaid.headers.get("payment-required"));
  const clients = Array.from({ length: payers }, (_, i) =>
    new x402Client()
      .register("eip155:*", new ExactEvmScheme(privateKeyToAccount(payerKey(i))))
      .setSpendControls({ allowedAssets: true, maxAmountPerPayment: false }),
  );
  const headers = [];
  for (let i = 0; i < n; i++) headers.push(encodePaymentSignatureHeader(await clients[i % payers].createPaymentPayload(required)));
  return headers;
}

/**
 * One load: `requests` paid requests at `concurrency` (each payer one in flight), against
 * an API (its own process, as API servers run) whose @x402/express middleware uses
 * `facilitator`. The latency of a paid request is from sending it, payment header
 * attached, to its answer.
 */
async function phase(label, facilitator, counter, concurrency, requests, thinkMs = 0, { rpc: chainRpc = args.rpc, asset = args.token } = {}) {
  const cfg = { ...apiConfig, asset };
  const configFile = path.join(args.dir, "api.json");
  fs.writeFileSync(configFile, JSON.stringify(cfg));
  const server = await startProcess("node", [path.join(here, "api-server.mjs"), configFile, facilitator], "api on ");
  const api = { url: server.value, server: { close: () => server.child.kill("SIGTERM") } };
  const route = `${api.url}/v2/paid`;
  // Warm: the middleware fetches /supported once; a few paid requests open connections.
  const warm = await presign(route, concurrency, concurrency);
  await pool(warm.length, concurrency, (i) => fetch(`${route}?r=warm-${label}-${i}`, { headers: { "payment-signature": warm[i] } }).then((r) => r.text()));
  const headers = await presign(route, concurrency, requests);
  const rpcBefore = counter.calls;
  const methodsBefore = { ...(counter.methods ?? {}) };
  const started = performance.now();
  const results = await pool(requests, concurrency, async (i) => {
    // Think time, not timed: each client's next request at a random moment of the block
    // (without it, a client that pays again as soon as it is answered, just after a
    // block, always waits a whole block, whoever facilitates).
    if (thinkMs > 0) await new Promise((r) => setTimeout(r, Math.random() * thinkMs));
    const at = performance.now();
    const reply = await fetch(`${route}?r=${label}-${i}`, { headers: { "payment-signature": headers[i] }, signal: AbortSignal.timeout(120_000) });
    await reply.text();
    const settleHeader = reply.headers.get("payment-response");
    const settle = settleHeader ? JSON.parse(Buffer.from(settleHeader, "base64").toString()) : null;
    return { status: reply.status, paidMs: performance.now() - at, settle };
  });
  const seconds = (performance.now() - started) / 1000;
  // Throughput counts the think time in; the latencies do not.
  const rpc = counter.calls - rpcBefore;
  api.server.close();
  const ok = results.filter((r) => r.status === 200);
  const paid = ok.map((r) => r.paidMs).sort((a, b) => a - b);
  const txs = [...new Set(ok.map((r) => r.settle?.transaction).filter((t) => t && t.length === 66))];
  let gas = 0n;
  for (const tx of txs) {
    const reply = await fetch(chainRpc, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "eth_getTransactionReceipt", params: [tx] }),
    });
    const receipt = (await reply.json()).result;
    if (receipt) gas += BigInt(receipt.gasUsed);
  }
  const failed = {};
  for (const r of results.filter((r) => r.status !== 200)) failed[r.status ?? r.error] = (failed[r.status ?? r.error] ?? 0) + 1;
  return {
    label,
    concurrency,
    requests,
    ok: ok.length,
    failed,
    seconds: +seconds.toFixed(2),
    paidPerSecond: +(ok.length / seconds).toFixed(1),
    paidP50Ms: +percentile(paid, 50)?.toFixed(1),
    paidP99Ms: +percentile(paid, 99)?.toFixed(1),
    transactions: txs.length,
    gasPerPayment: txs.length && ok.length ? Number(gas / BigInt(ok.length)) : null,
    rpcPerPayment: ok.length ? +(rpc / ok.length).toFixed(2) : null,
    rpcMethods: Object.fromEntries(
      Object.entries(counter.methods ?? {}).map(([m, n]) => [m, n - (methodsBefore[m] ?? 0)]).filter(([, n]) => n > 0),
    ),
  };
}

/** Raw `/verify` throughput by the load generator (with `settle`: verify then settle). */
async function rawVerify(url, payments, { concurrency = 64, settle = false } = {}) {
  const out = await runProcess(args.bin, [
    "loadgen", "--facilitator", url, "--chain-id", String(chainId), "--token", args.token,
    "--payments", String(payments), "--payers", "300", "--concurrency", String(concurrency), "--ceiling-seconds", "0",
    ...(settle ? ["--settle"] : []),
  ]);
  const m = out.match(/valid (\d+), invalid (.*), errors (.*), in ([\d.]+) s: (\d+) verifications\/s, latency p50 ([\d.]+) ms p99 ([\d.]+) ms/);
  if (!m) throw new Error(`unexpected loadgen output: ${out}`);
  return { valid: +m[1], invalid: m[2], errors: m[3], seconds: +m[4], perSecond: +m[5], p50Ms: +m[6], p99Ms: +m[7] };
}

const requests = Number(args.requests);
const ours = await countingProxy(args.rpc);
const theirs = await countingProxy(args.rpc);
const reference = await startProcess("node", [
  path.join(here, "reference-facilitator.mjs"),
  "--rpc", theirs.url, "--key", REFERENCE_KEY, "--chain-id", String(chainId),
], "reference facilitator on ");
const referenceUrl = reference.value;
const report = { when: new Date().toISOString(), requests, phases: [], verify: {} };
const log = (x) => console.log(JSON.stringify(x));

// Raw /verify first, while nothing else runs.
const included = await startDaemon("included", ours.url);
if (!only) {
  report.verify.batcher = await rawVerify(included.url, Number(args["verify-payments"]));
  log({ verify: "x402-batcher", ...report.verify.batcher });
  report.verify.reference = await rawVerify(referenceUrl, 1000);
  log({ verify: "reference", ...report.verify.reference });
}

// `included` mode beside the reference on three chains: one that mines each transaction at
// once (anvil automine), 1 s blocks and 2 s blocks (Base's cadence). On the chains with
// blocks, each client thinks a random part of a block before each request.
const modes = [["automine", 0], ["1s", 1], ["2s", 2]];
for (const [chainMode, secs] of modes) {
  await setMining(secs);
  for (const concurrency of [1, 10, 100]) {
    if (!wanted(chainMode, concurrency)) continue;
    const n = concurrency === 1 ? Math.ceil(requests / 20) : concurrency === 10 ? Math.ceil(requests / 4) : requests;
    for (const [label, url, counter] of sides([["x402-batcher included", included.url, ours.counter], ["reference", referenceUrl, theirs.counter]])) {
      const p = await phase(`${label.replace(/ /g, "-")}-${chainMode}-c${concurrency}`, url, counter, concurrency, n, secs * 1000);
      p.facilitator = label;
      p.chain = chainMode;
      report.phases.push(p);
      log(p);
    }
  }
}
included.child.kill("SIGTERM");

// Preconfirmations: the daemon opted in (preconfirmation_ms = 200) on the flashblocks
// stand-in's chain (2 s blocks, a flashblock every 200 ms), the reference beside it on the
// same endpoint; each client thinks a random part of a flashblock before each request.
const preconfModes = [];
if (args["preconf-rpc"] && [1, 10, 100].some((c) => wanted("preconf", c))) {
  preconfModes.push("preconf");
  const pOurs = await countingProxy(args["preconf-rpc"]);
  const pTheirs = await countingProxy(args["preconf-rpc"]);
  const pReference = await startProcess("node", [
    path.join(here, "reference-facilitator.mjs"),
    "--rpc", pTheirs.url, "--key", REFERENCE_KEY, "--chain-id", String(chainId),
  ], "reference facilitator on ");
  const pDaemon = await startDaemon("included", pOurs.url, {
    dir: args["preconf-dir"], token: args["preconf-token"], chainExtra: "preconfirmation_ms = 200\n",
  });
  const on = { rpc: args["preconf-rpc"], asset: args["preconf-token"] };
  for (const concurrency of [1, 10, 100]) {
    if (!wanted("preconf", concurrency)) continue;
    const n = concurrency === 1 ? Math.ceil(requests / 20) : concurrency === 10 ? Math.ceil(requests / 4) : requests;
    for (const [label, url, counter] of sides([["x402-batcher included", pDaemon.url, pOurs.counter], ["reference", pReference.value, pTheirs.counter]])) {
      const p = await phase(`${label.replace(/ /g, "-")}-preconf-c${concurrency}`, url, counter, concurrency, n, 200, on);
      p.facilitator = label;
      p.chain = "preconf";
      report.phases.push(p);
      log(p);
    }
  }
  pDaemon.child.kill("SIGTERM");
  pReference.child.kill("SIGTERM");
}

// `accepted` mode and the no-op control (not with `--only`).
if (!only) {
  await setMining(1);
  const accepted = await startDaemon("accepted", ours.url);
  // The facilitator's own side of a paid request (verify, then settle), from a Rust client.
  for (const concurrency of [1, 10]) {
    const r = await rawVerify(accepted.url, 2000, { concurrency, settle: true });
    report.verify[`batcherAcceptedSettleC${concurrency}`] = r;
    log({ verifyThenSettle: `x402-batcher accepted, c${concurrency}`, ...r });
  }
  for (const concurrency of [1, 10, 100]) {
    const n = concurrency === 100 ? requests : Math.ceil(requests / 4);
    const p = await phase(`x402-batcher-accepted-c${concurrency}`, accepted.url, ours.counter, concurrency, n);
    p.facilitator = "x402-batcher accepted";
    report.phases.push(p);
    log(p);
  }
  accepted.child.kill("SIGTERM");

  // The control: the same API and load with a facilitator that does nothing.
  const stub = await startProcess("node", [path.join(here, "stub-facilitator.mjs"), String(chainId)], "stub facilitator on ");
  for (const concurrency of [1, 10]) {
    const p = await phase(`no-op-c${concurrency}`, stub.value, { calls: 0 }, concurrency, Math.ceil(requests / 4));
    p.facilitator = "no-op stub";
    report.phases.push(p);
    log(p);
  }
  stub.child.kill("SIGTERM");
}

const find = (f, c, chain = "1s") => report.phases.find((p) => p.facilitator === f && p.concurrency === c && (p.chain ?? "1s") === chain);
const ratio = (a, b) => (a && b ? +(a / b).toFixed(2) : null);
const side = (chain, c) => {
  const [o, r] = [find("x402-batcher included", c, chain), find("reference", c, chain)];
  return { p50Ms: [o?.paidP50Ms, r?.paidP50Ms], perSecond: [o?.paidPerSecond, r?.paidPerSecond], rpc: [o?.rpcPerPayment, r?.rpcPerPayment], gas: [o?.gasPerPayment, r?.gasPerPayment] };
};
report.summary = {
  // [x402-batcher, reference] per chain and concurrency.
  included: Object.fromEntries(
    [...modes.map(([m]) => m), ...preconfModes].map((m) => [m, Object.fromEntries([1, 10, 100].map((c) => [`c${c}`, side(m, c)]))]),
  ),
  verifyRatio: ratio(report.verify.batcher?.perSecond, report.verify.reference?.perSecond),
  gasRatio1sC100: ratio(find("x402-batcher included", 100)?.gasPerPayment, find("reference", 100)?.gasPerPayment),
  acceptedP50MsC1: find("x402-batcher accepted", 1)?.paidP50Ms,
  acceptedP50MsC10: find("x402-batcher accepted", 10)?.paidP50Ms,
  acceptedFacilitatorSideP50MsC10: report.verify.batcherAcceptedSettleC10?.p50Ms,
  acceptedP50MsC100: find("x402-batcher accepted", 100)?.paidP50Ms,
  noOpP50MsC1: find("no-op stub", 1)?.paidP50Ms,
  noOpP50MsC10: find("no-op stub", 10)?.paidP50Ms,
};
console.log(`SUMMARY ${JSON.stringify(report.summary)}`);
fs.writeFileSync(path.join(args.dir, `bench-${Date.now()}.json`), JSON.stringify(report, null, 2));
process.exit(0);
