// The x402 ecosystem's own packages, wired the way their READMEs show, against a
// facilitator URL: an Express API with a v1 route set (x402-express 1.2.0) and a v2 route
// set (@x402/express 2.27.0), and the clients that pay them (x402-axios 0.7.2,
// @x402/fetch 2.27.0, @x402/axios 2.11.0). Used by the interop tests (run.mjs), the demo
// and the benchmark.
//
// A "tap" can sit between the middlewares and the facilitator: a pass-through HTTP proxy
// that records every /verify and /settle exchange, so tests can see exactly what the
// middlewares asked and what they were told.
import http from "node:http";
import express from "express";
import axios from "axios";
import { privateKeyToAccount } from "viem/accounts";
import { paymentMiddleware as paymentMiddlewareV1 } from "x402-express";
import { withPaymentInterceptor, createSigner } from "x402-axios";
import { paymentMiddleware as paymentMiddlewareV2, x402ResourceServer } from "@x402/express";
import { HTTPFacilitatorClient } from "@x402/core/server";
import { ExactEvmScheme as ExactEvmServerScheme } from "@x402/evm/exact/server";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { x402Client } from "@x402/core/client";
import { wrapFetchWithPayment } from "@x402/fetch";
import { wrapAxiosWithPayment, x402Client as AxiosX402Client } from "@x402/axios";

/** Listens on 127.0.0.1, port 0; resolves with the server and its base URL. */
export function listen(handler) {
  return new Promise((resolve, reject) => {
    const server = http.createServer(handler);
    server.keepAliveTimeout = 30_000;
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => resolve({ server, url: `http://127.0.0.1:${server.address().port}` }));
  });
}

/**
 * A recording pass-through proxy to `target`. `onReply(entry)` sees each exchange as it
 * completes: { path, status, request, reply, ms }.
 */
export async function startTap(target, onReply = () => {}) {
  const exchanges = [];
  const { server, url } = await listen((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", async () => {
      const body = Buffer.concat(chunks);
      const started = Date.now();
      try {
        const headers = { ...req.headers };
        delete headers.host;
        delete headers["content-length"];
        const reply = await fetch(target + req.url, {
          method: req.method,
          headers,
          body: req.method === "GET" ? undefined : body,
        });
        const text = await reply.text();
        let parsed = null;
        try {
          parsed = JSON.parse(text);
        } catch {}
        let request = null;
        try {
          request = body.length ? JSON.parse(body.toString()) : null;
        } catch {}
        const entry = { path: req.url, status: reply.status, request, reply: parsed, ms: Date.now() - started };
        exchanges.push(entry);
        onReply(entry);
        res.writeHead(reply.status, { "content-type": reply.headers.get("content-type") ?? "application/json" });
        res.end(text);
      } catch (e) {
        res.writeHead(502, { "content-type": "application/json" });
        res.end(JSON.stringify({ error: `tap: ${e.message}` }));
      }
    });
  });
  return { server, url, exchanges };
}

/** The price of every route: an explicit asset (the devnet token), in each version's form. */
function prices(cfg) {
  return {
    v1: { amount: cfg.price, asset: { address: cfg.asset, decimals: cfg.decimals, eip712: { name: cfg.assetName, version: cfg.assetVersion } } },
    v2: { amount: cfg.price, asset: cfg.asset, extra: { name: cfg.assetName, version: cfg.assetVersion } },
  };
}

/** Bearer-token headers for every facilitator path, as both client generations take them. */
function authHeaders(token) {
  if (!token) return undefined;
  const h = { Authorization: `Bearer ${token}` };
  return async () => ({ verify: h, settle: h, supported: h });
}

/**
 * The API: `/v1/paid`, `/v1/fail` behind x402-express; `/v2/paid`, `/v2/fail`,
 * `/v2/upfront` behind @x402/express. Handlers count their runs by `?r=<request id>`;
 * `/…/fail` answers 500. `facilitatorUrl` is what both middlewares are configured with.
 */
export async function startApi(cfg, facilitatorUrl, { v1 = true, v2 = true } = {}) {
  const runs = new Map();
  const handler = (status) => (req, res) => {
    const r = String(req.query.r ?? "");
    runs.set(r, (runs.get(r) ?? 0) + 1);
    res.status(status).json({ ok: status < 400, r });
  };
  const p = prices(cfg);
  const app = express();
  if (v1) {
    const facilitator = { url: facilitatorUrl, createAuthHeaders: authHeaders(cfg.token) };
    const route = { price: p.v1, network: cfg.v1Network, config: { description: "a paid route (v1)", maxTimeoutSeconds: 300 } };
    app.use(paymentMiddlewareV1(cfg.payTo, { "/v1/paid": route, "/v1/fail": route }, facilitator));
  }
  const errors = [];
  if (v2) {
    const client = new HTTPFacilitatorClient({ url: facilitatorUrl, createAuthHeaders: authHeaders(cfg.token) });
    const server = new x402ResourceServer(client).register(`eip155:${cfg.chainId}`, new ExactEvmServerScheme());
    const accepts = { scheme: "exact", price: p.v2, network: `eip155:${cfg.chainId}`, payTo: cfg.payTo, maxTimeoutSeconds: 300 };
    const routes = {
      "GET /v2/paid": { accepts, description: "a paid route (v2)" },
      "GET /v2/fail": { accepts, description: "a paid route whose handler fails" },
      "GET /v2/upfront": { accepts: { ...accepts, extra: { paymentFlow: "upfront" } }, description: "settled before the handler" },
    };
    app.use(paymentMiddlewareV2(routes, server));
  }
  app.get("/v1/paid", handler(200));
  app.get("/v1/fail", handler(500));
  app.get("/v2/paid", handler(200));
  app.get("/v2/fail", handler(500));
  app.get("/v2/upfront", handler(200));
  app.use((err, req, res, next) => {
    errors.push(String(err?.message ?? err));
    res.status(500).json({ error: String(err?.message ?? err) });
  });
  const { server, url } = await listen(app);
  return { server, url, runs, errors };
}

/** Decodes a base64 JSON settle-response header. */
function decodeHeader(value) {
  if (!value) return null;
  try {
    return JSON.parse(Buffer.from(value, "base64").toString());
  } catch {
    return null;
  }
}

/**
 * A paying client by kind: "v1-axios" (x402-axios on /v1), "v2-fetch" (@x402/fetch on /v2),
 * "v2-axios" (@x402/axios on /v2). `get(path)` pays if asked and resolves with
 * { status, paymentHeader, settle } (the header it paid with, the decoded settle response).
 */
export function payingClient(kind, cfg, privateKey) {
  const account = privateKeyToAccount(privateKey);
  let sent = null;
  const record = (h) => {
    if (h) sent = h;
  };
  if (kind === "v1-axios") {
    // x402's createSigner resolves asynchronously (it builds EVM or Solana signers).
    const signer = createSigner(cfg.v1Network, privateKey);
    // A 402 must reach the interceptor as an error for it to pay.
    const instance = axios.create({ validateStatus: (s) => s !== 402, timeout: 120_000 });
    instance.interceptors.request.use((c) => {
      record(c.headers?.["X-PAYMENT"]);
      return c;
    });
    let api = null;
    return {
      prefix: "/v1",
      async get(url) {
        api ??= withPaymentInterceptor(instance, await signer);
        sent = null;
        try {
          const r = await api.get(url);
          return { status: r.status, paymentHeader: sent, settle: decodeHeader(r.headers["x-payment-response"]), body: r.data };
        } catch (e) {
          if (e.response) return { status: e.response.status, paymentHeader: sent, settle: null, body: e.response.data };
          throw e;
        }
      },
    };
  }
  if (kind === "v2-fetch") {
    const client = new x402Client().register("eip155:*", new ExactEvmScheme(account)).setSpendControls({ allowedAssets: true, maxAmountPerPayment: false });
    // Records the header it paid with and how long the paid request (the one carrying it)
    // took, apart from the unpaid first request and the signing.
    let paidMs = null;
    const recording = async (input, init) => {
      const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
      const header = headers.get("payment-signature");
      record(header);
      const started = performance.now();
      const reply = await fetch(input, init);
      if (header) paidMs = performance.now() - started;
      return reply;
    };
    const pay = wrapFetchWithPayment(recording, client);
    return {
      prefix: "/v2",
      async get(url) {
        sent = null;
        paidMs = null;
        const started = performance.now();
        const r = await pay(url, { signal: AbortSignal.timeout(120_000) });
        const body = await r.text();
        const totalMs = performance.now() - started;
        return { status: r.status, paymentHeader: sent, settle: decodeHeader(r.headers.get("payment-response")), body, paidMs, totalMs };
      },
    };
  }
  if (kind === "v2-axios") {
    const client = new AxiosX402Client().register("eip155:*", new ExactEvmScheme(account));
    const instance = axios.create({ validateStatus: (s) => s !== 402, timeout: 120_000 });
    instance.interceptors.request.use((c) => {
      record(c.headers?.get?.("PAYMENT-SIGNATURE") ?? c.headers?.["PAYMENT-SIGNATURE"]);
      return c;
    });
    const api = wrapAxiosWithPayment(instance, client);
    return {
      prefix: "/v2",
      async get(url) {
        sent = null;
        try {
          const r = await api.get(url);
          return { status: r.status, paymentHeader: sent, settle: decodeHeader(r.headers["payment-response"]), body: r.data };
        } catch (e) {
          if (e.response) return { status: e.response.status, paymentHeader: sent, settle: null, body: e.response.data };
          throw e;
        }
      },
    };
  }
  throw new Error(`unknown client ${kind}`);
}

/** Sends `header` again, as a replaying client would, to `url`; resolves with the status. */
export async function replay(url, version, header) {
  const name = version === 1 ? "X-PAYMENT" : "PAYMENT-SIGNATURE";
  const r = await fetch(url, { headers: { [name]: header } });
  await r.text();
  return r.status;
}

/** Runs `count` tasks at most `concurrency` at a time; resolves with their results in order. */
export async function pool(count, concurrency, task) {
  const results = new Array(count);
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      try {
        results[i] = await task(i);
      } catch (e) {
        results[i] = { error: String(e?.message ?? e) };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  return results;
}

/** Percentile of sorted numbers. */
export function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}
