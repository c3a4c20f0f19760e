// One interop scenario against a running x402-batcher facilitator, for tests/interop.rs.
// Usage: node run.mjs CONFIG.json. Prints `EVENT {...}` lines as things happen (the test
// may act on them) and ends with one `RESULT {...}` line.
//
// Scenarios:
// - pay:     each client pays `requests` requests at `concurrency` against its middleware,
//            replays one of its payment headers, pays a route whose handler fails, and
//            (v2) an upfront route;
// - pending: one v2 and one v1 paid request while the test holds settlement paused;
// - modes:   one paid request per middleware, reporting the settle responses;
// - auth:    both middlewares configured with a wrong bearer token.
import fs from "node:fs";
import { startApi, startTap, payingClient, replay, pool } from "./harness.mjs";

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const event = (e) => console.log(`EVENT ${JSON.stringify(e)}`);

const tap = await startTap(cfg.facilitator, (x) => {
  if (x.path === "/settle" && x.reply?.errorReason === "settlement_pending") event({ kind: "settlement_pending", transaction: x.reply.transaction });
});
const api = await startApi(cfg, tap.url);
const exchanges = (path) => tap.exchanges.filter((x) => x.path === path);

async function pay(kind, key, route, n, concurrency) {
  const client = payingClient(kind, cfg, key);
  const results = await pool(n, concurrency, async (i) => {
    const r = `${kind}${route}-${i}`;
    const got = await client.get(`${api.url}${client.prefix}${route}?r=${r}`);
    return { r, ...got };
  });
  return { client, results };
}

function summary(results) {
  const statuses = {};
  for (const x of results) statuses[x.status ?? `error: ${x.error}`] = (statuses[x.status ?? `error: ${x.error}`] ?? 0) + 1;
  return statuses;
}

const result = { scenario: cfg.scenario };
if (cfg.scenario === "pay") {
  result.clients = {};
  for (const kind of cfg.clients) {
    const key = cfg.payers[kind];
    const { client, results } = await pay(kind, key, "/paid", cfg.requests, cfg.concurrency);
    const handlerRuns = results.map((x) => api.runs.get(x.r) ?? 0);
    const transactions = [...new Set(results.map((x) => x.settle?.transaction).filter(Boolean))];
    // A replay of a header that paid for a request: refused before the handler runs.
    const paid = results.find((x) => x.status === 200 && x.paymentHeader);
    const replayId = `${kind}-replay`;
    const replayStatus = paid ? await replay(`${api.url}${client.prefix}/paid?r=${replayId}`, kind.startsWith("v1") ? 1 : 2, paid.paymentHeader) : null;
    // A handler that fails: no settle, nothing charged.
    const fail = await pay(kind, key, "/fail", 1, 1);
    const up = kind.startsWith("v2") ? await pay(kind, key, "/upfront", cfg.upfront ?? 5, cfg.concurrency) : null;
    result.clients[kind] = {
      statuses: summary(results),
      handlerRuns: { once: handlerRuns.filter((n) => n === 1).length, other: handlerRuns.filter((n) => n !== 1) },
      settleTransactions: transactions,
      settleResponses: results.filter((x) => x.settle).length,
      failedStatuses: results.filter((x) => x.status !== 200).slice(0, 5).map((x) => ({ status: x.status, error: x.error, body: x.body })),
      replay: { status: replayStatus, handlerRuns: api.runs.get(replayId) ?? 0, payer: paid ? JSON.parse(Buffer.from(paid.paymentHeader, "base64")).payload.authorization.from : null },
      fail: { statuses: summary(fail.results), nonce: fail.results[0]?.paymentHeader ? JSON.parse(Buffer.from(fail.results[0].paymentHeader, "base64")).payload.authorization.nonce : null },
      upfront: up ? { statuses: summary(up.results), handlerRuns: up.results.map((x) => api.runs.get(x.r) ?? 0) } : null,
    };
  }
} else if (cfg.scenario === "pending" || cfg.scenario === "modes") {
  result.clients = {};
  for (const kind of cfg.clients) {
    const { results } = await pay(kind, cfg.payers[kind], "/paid", 1, 1);
    const x = results[0];
    result.clients[kind] = { status: x.status, error: x.error, settle: x.settle, handlerRuns: api.runs.get(x.r) ?? 0, nonce: x.paymentHeader ? JSON.parse(Buffer.from(x.paymentHeader, "base64")).payload.authorization.nonce : null };
  }
} else if (cfg.scenario === "auth") {
  result.clients = {};
  for (const kind of cfg.clients) {
    const { results } = await pay(kind, cfg.payers[kind], "/paid", 1, 1);
    result.clients[kind] = { status: results[0].status, error: results[0].error, handlerRuns: api.runs.get(results[0].r) ?? 0, body: results[0].body };
  }
} else {
  throw new Error(`unknown scenario ${cfg.scenario}`);
}
// What the middlewares asked the facilitator and were told, counted by answer.
const tally = (path, key) => {
  const counts = {};
  for (const x of exchanges(path)) {
    const k = key(x);
    counts[k] = (counts[k] ?? 0) + 1;
  }
  return counts;
};
result.facilitator = {
  verify: tally("/verify", (x) => `${x.status} ${x.reply?.isValid ? "valid" : x.reply?.invalidReason ?? x.reply?.error}`),
  settle: tally("/settle", (x) => `${x.status} ${x.reply?.success ? "success" : x.reply?.errorReason ?? x.reply?.error}`),
  supported: tally("/supported", (x) => `${x.status}`),
  // Each settle reply of the small scenarios, as sent.
  settleReplies: cfg.scenario === "pay" ? undefined : exchanges("/settle").map((x) => ({ status: x.status, ...x.reply })),
};
result.apiErrors = api.errors;
api.server.close();
tap.server.close();
// Exit only once the result has left the pipe.
process.stdout.write(`RESULT ${JSON.stringify(result)}\n`, () => process.exit(0));
