// The official reference facilitator, as its README wires it, for the benchmark:
// x402Facilitator (@x402/core 2.27.0) with @x402/evm 2.27.0's exact scheme, a viem wallet
// client with viem's nonce manager (without it, concurrent settles fail "nonce too low"),
// served over HTTP (POST /verify, POST /settle, GET /supported) by Express.
//
// Usage: node reference-facilitator.mjs --rpc URL --key 0xKEY --chain-id N [--port P]
// Prints `reference facilitator on http://127.0.0.1:PORT` once it listens.
import { parseArgs } from "node:util";
import express from "express";
import { createWalletClient, http, publicActions, nonceManager, defineChain } from "viem";
import { baseSepolia } from "viem/chains";
import { privateKeyToAccount } from "viem/accounts";
import { x402Facilitator } from "@x402/core/facilitator";
import { registerExactEvmScheme } from "@x402/evm/exact/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";

const { values: args } = parseArgs({
  options: {
    rpc: { type: "string" },
    key: { type: "string" },
    "chain-id": { type: "string" },
    port: { type: "string", default: "0" },
  },
});
const chainId = Number(args["chain-id"]);
// The chain as its users configure it: viem's own definition (Base Sepolia's, for a devnet
// with its id: viem polls receipts every half of its 2 s block time), on the given RPC.
const chain =
  chainId === baseSepolia.id
    ? { ...baseSepolia, rpcUrls: { default: { http: [args.rpc] } } }
    : defineChain({
        id: chainId,
        name: `chain ${chainId}`,
        nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
        rpcUrls: { default: { http: [args.rpc] } },
      });
const account = privateKeyToAccount(args.key, { nonceManager });
const client = createWalletClient({ account, chain, transport: http(args.rpc) }).extend(publicActions);
const signer = toFacilitatorEvmSigner({
  address: account.address,
  getCode: (a) => client.getCode(a),
  readContract: (a) => client.readContract({ ...a, args: a.args || [] }),
  verifyTypedData: (a) => client.verifyTypedData(a),
  writeContract: (a) => client.writeContract({ ...a, args: a.args || [] }),
  sendTransaction: (a) => client.sendTransaction(a),
  waitForTransactionReceipt: (a) => client.waitForTransactionReceipt(a),
});
const facilitator = new x402Facilitator();
registerExactEvmScheme(facilitator, { signer, networks: `eip155:${chainId}` });

const app = express();
app.use(express.json({ limit: "64kb" }));
const guard = (fn) => async (req, res) => {
  try {
    res.json(await fn(req));
  } catch (e) {
    res.status(500).json({ error: String(e?.message ?? e) });
  }
};
app.get("/supported", guard(async () => facilitator.getSupported()));
app.post("/verify", guard(async (req) => facilitator.verify(req.body.paymentPayload, req.body.paymentRequirements)));
app.post("/settle", guard(async (req) => facilitator.settle(req.body.paymentPayload, req.body.paymentRequirements)));
const server = app.listen(Number(args.port), "127.0.0.1", () => {
  console.log(`reference facilitator on http://127.0.0.1:${server.address().port}`);
});
server.keepAliveTimeout = 30_000;
