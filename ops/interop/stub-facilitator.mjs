// A facilitator that does nothing: it answers every /verify valid and every /settle
// successful at once, with no check and no state. The benchmark's control: the latency and
// throughput an API with the x402 middleware reaches when the facilitator costs nothing.
// Usage: node stub-facilitator.mjs CHAIN_ID. Prints `stub facilitator on URL`.
import { listen } from "./harness.mjs";

const network = `eip155:${process.argv[2]}`;
const { url } = await listen((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let payer;
    try {
      payer = JSON.parse(Buffer.concat(chunks).toString()).paymentPayload.payload.authorization.from;
    } catch {}
    const reply =
      req.url === "/supported"
        ? { kinds: [{ x402Version: 2, scheme: "exact", network }], extensions: [], signers: {} }
        : req.url === "/verify"
          ? { isValid: true, payer }
          : { success: true, transaction: "", network, payer };
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(reply));
  });
});
console.log(`stub facilitator on ${url}`);
