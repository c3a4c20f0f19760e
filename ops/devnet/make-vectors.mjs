// Generates test vectors from signers independent of the daemon's code: viem signs EIP-3009
// authorizations (valid ones and every kind of defect), and the official x402 client
// packages (@x402/core + @x402/evm) build real v1 X-PAYMENT and v2 PAYMENT-SIGNATURE headers.
// Each vector is labelled with the verdict the daemon must reach: "valid" or the x402
// reason code. Output: tests/vectors/viem.json and tests/vectors/x402.json; and
// tests/vectors/smart.json: payers with code (the project's ERC-1271 wallet, deployed or
// counterfactual through ERC-6492, and EIP-7702 accounts) paying through the official
// client's smart-account path (any signer with an address and signTypedData), judged on a
// devnet whose set-up the file describes (tests/vectors.rs).
//
// Run from ops/devnet: `npm run vectors`. The viem vectors are deterministic (fixed keys,
// fixed clock, RFC 6979 signatures); the x402 ones use the packages' own clock and random
// nonces, so their file records the time they were made.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import {
  keccak256, toHex, toBytes, getAddress, hexToBytes, bytesToHex,
  encodeAbiParameters, encodeFunctionData, getContractAddress, serializeErc6492Signature, concat,
} from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { x402Client } from "@x402/core/client";
import { encodePaymentSignatureHeader } from "@x402/core/http";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { ExactEvmSchemeV1 } from "@x402/evm/v1";

const here = path.dirname(fileURLToPath(import.meta.url));
const outDir = path.join(here, "..", "..", "tests", "vectors");

const SIG = "invalid_exact_evm_payload_signature";
const types = {
  TransferWithAuthorization: [
    { name: "from", type: "address" },
    { name: "to", type: "address" },
    { name: "value", type: "uint256" },
    { name: "validAfter", type: "uint256" },
    { name: "validBefore", type: "uint256" },
    { name: "nonce", type: "bytes32" },
  ],
};
// secp256k1 group order, for the malleable high-s twin of a signature.
const N = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n;

const TOKENS = [
  // The devnet token: the first contract anvil's first dev account deploys.
  { chain_id: 31337, address: "0x5FbDB2315678afecb367f032d93F642f64180aa3", eip712_name: "USD Coin", eip712_version: "2", decimals: 6, v1: null },
  { chain_id: 8453, address: "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", eip712_name: "USD Coin", eip712_version: "2", decimals: 6, v1: "base" },
  { chain_id: 84532, address: "0x036CbD53842c5426634e7929541eC2318f3dCF7e", eip712_name: "USDC", eip712_version: "2", decimals: 6, v1: "base-sepolia" },
];
const tokenConfig = (t) => ({ chain_id: t.chain_id, address: t.address, eip712_name: t.eip712_name, eip712_version: t.eip712_version, decimals: t.decimals });

const key = (label) => keccak256(toBytes(`x402-batcher vectors ${label}`));
const account = (label) => privateKeyToAccount(key(label));
const PAYEE = getAddress("0x209693bc6afc0c5328ba36faf03c514ef312287c");
const OTHER = getAddress("0x7777777777777777777777777777777777777777");

const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64");
const requirementsFor = (t, a, overrides = {}) => ({
  scheme: "exact",
  network: `eip155:${t.chain_id}`,
  asset: t.address,
  payTo: a.to,
  amount: a.value,
  maxTimeoutSeconds: 300,
  ...overrides,
});
const authJson = (a) => ({ from: a.from, to: a.to, value: a.value, validAfter: a.validAfter, validBefore: a.validBefore, nonce: a.nonce });

async function sign(acct, t, a, domainOverride = {}) {
  return acct.signTypedData({
    domain: { name: t.eip712_name, version: t.eip712_version, chainId: t.chain_id, verifyingContract: t.address, ...domainOverride },
    types,
    primaryType: "TransferWithAuthorization",
    message: { ...a, value: BigInt(a.value), validAfter: BigInt(a.validAfter), validBefore: BigInt(a.validBefore) },
  });
}

function highS(sig) {
  const b = hexToBytes(sig);
  const s = BigInt(bytesToHex(b.slice(32, 64)));
  const twin = toHex(N - s, { size: 32 });
  const v = b[64] === 27 ? 28 : 27;
  return sig.slice(0, 66) + twin.slice(2) + toHex(v, { size: 1 }).slice(2);
}

// Every vector in the three forms an API server may submit: typed fields, and the v2 and
// (where the network has a v1 name) v1 header.
function forms(id, t, a, signature, requirements, expect, note) {
  const out = [
    { id: `${id}/typed`, form: "typed", authorization: { chain_id: t.chain_id, token: t.address, ...authJson(a), signature }, requirements, expect, note },
    {
      id: `${id}/v2`,
      form: "header",
      header: b64({
        x402Version: 2,
        resource: { url: "https://api.example/weather", description: "", mimeType: "application/json" },
        accepted: { scheme: "exact", network: `eip155:${t.chain_id}`, amount: requirements.amount, asset: requirements.asset, payTo: requirements.payTo, maxTimeoutSeconds: 300, extra: { name: t.eip712_name, version: t.eip712_version } },
        payload: { signature, authorization: authJson(a) },
      }),
      requirements,
      expect,
      note,
    },
  ];
  if (t.v1) {
    out.push({
      id: `${id}/v1`,
      form: "header",
      header: b64({ x402Version: 1, scheme: "exact", network: t.v1, payload: { signature, authorization: authJson(a) } }),
      requirements: { ...requirements, network: t.v1 },
      expect,
      note,
    });
  }
  return out;
}

async function viemVectors() {
  const NOW = 1_900_000_000;
  const vectors = [];
  let n = 0;
  const auth = (acct, extra = {}) => ({
    from: acct.address,
    to: PAYEE,
    value: String(10_000 + (n % 7) * 1_000),
    validAfter: String(NOW - 600),
    validBefore: String(NOW + 300),
    nonce: keccak256(toBytes(`nonce ${n++}`)),
    ...extra,
  });
  for (const t of TOKENS) {
    for (let p = 0; p < 6; p++) {
      const acct = account(`payer ${p}`);
      const a = auth(acct);
      vectors.push(...forms(`valid-${t.chain_id}-${p}`, t, a, await sign(acct, t, a), requirementsFor(t, a), "valid", "valid authorization"));
    }
    for (let p = 0; p < 2; p++) {
      const acct = account(`payer ${p}`);
      const tag = (k) => `${k}-${t.chain_id}-${p}`;
      let a;

      a = auth(acct);
      vectors.push(...forms(tag("wrong-signer"), t, a, await sign(account("impostor"), t, a), requirementsFor(t, a), SIG, "signed by another key than `from`"));

      a = auth(acct);
      vectors.push(...forms(tag("high-s"), t, a, highS(await sign(acct, t, a)), requirementsFor(t, a), SIG, "malleable twin (r, n-s, v^1) of a valid signature"));

      a = auth(acct);
      const good = await sign(acct, t, a);
      vectors.push(...forms(tag("bad-v"), t, a, good.slice(0, 130) + (good.endsWith("1b") ? "00" : "01"), requirementsFor(t, a), SIG, "v in {0,1} instead of {27,28}"));

      for (const [k, d] of [
        ["domain-name", { name: t.eip712_name === "USDC" ? "USD Coin" : "USDC" }],
        ["domain-version", { version: "1" }],
        ["domain-chain", { chainId: t.chain_id + 1 }],
        ["domain-contract", { verifyingContract: OTHER }],
      ]) {
        a = auth(acct);
        vectors.push(...forms(tag(k), t, a, await sign(acct, t, a, d), requirementsFor(t, a), SIG, `signed over a wrong EIP-712 domain (${k})`));
      }

      a = auth(acct);
      let sig = await sign(acct, t, a);
      let tampered = { ...a, value: String(BigInt(a.value) + 1n) };
      vectors.push(...forms(tag("tampered-value"), t, tampered, sig, requirementsFor(t, tampered), SIG, "value changed after signing"));

      a = auth(acct);
      sig = await sign(acct, t, a);
      tampered = { ...a, to: OTHER };
      vectors.push(...forms(tag("tampered-recipient"), t, tampered, sig, requirementsFor(t, tampered), SIG, "recipient changed after signing"));

      a = auth(acct);
      sig = await sign(acct, t, a);
      tampered = { ...a, nonce: keccak256(toBytes(`other nonce ${n}`)) };
      vectors.push(...forms(tag("tampered-nonce"), t, tampered, sig, requirementsFor(t, tampered), SIG, "nonce changed after signing"));

      a = auth(acct);
      vectors.push(...forms(tag("value-mismatch"), t, a, await sign(acct, t, a), requirementsFor(t, a, { amount: String(BigInt(a.value) * 2n) }), "invalid_exact_evm_payload_authorization_value_mismatch", "pays less than required"));

      a = auth(acct);
      vectors.push(...forms(tag("recipient-mismatch"), t, a, await sign(acct, t, a), requirementsFor(t, a, { payTo: OTHER }), "invalid_exact_evm_payload_recipient_mismatch", "pays someone else than payTo"));

      a = auth(acct, { validBefore: String(NOW - 1) });
      vectors.push(...forms(tag("expired"), t, a, await sign(acct, t, a), requirementsFor(t, a), "invalid_exact_evm_payload_authorization_valid_before", "validBefore in the past"));

      a = auth(acct, { validBefore: String(NOW + 5) });
      vectors.push(...forms(tag("expires-soon"), t, a, await sign(acct, t, a), requirementsFor(t, a), "invalid_exact_evm_payload_authorization_valid_before", "validBefore too close to settle"));

      a = auth(acct, { validAfter: String(NOW + 60) });
      vectors.push(...forms(tag("not-yet-valid"), t, a, await sign(acct, t, a), requirementsFor(t, a), "invalid_exact_evm_payload_authorization_valid_after", "validAfter in the future"));
    }
  }
  return { generator: "viem 2.57.1 signTypedData", now: NOW, tokens: TOKENS.map(tokenConfig), vectors };
}

async function x402Vectors() {
  const now = Math.floor(Date.now() / 1000);
  const vectors = [];
  for (let p = 0; p < 12; p++) {
    const acct = account(`x402 payer ${p}`);
    const client = new x402Client()
      .register("eip155:*", new ExactEvmScheme(acct))
      .registerV1("base", new ExactEvmSchemeV1(acct))
      .registerV1("base-sepolia", new ExactEvmSchemeV1(acct))
      .setSpendControls({ allowedAssets: true, maxAmountPerPayment: false });
    for (const t of TOKENS) {
      const amount = String(1_000 * (p + 1));
      const v2req = { scheme: "exact", network: `eip155:${t.chain_id}`, amount, asset: t.address, payTo: PAYEE, maxTimeoutSeconds: 300, extra: { name: t.eip712_name, version: t.eip712_version } };
      const payload = await client.createPaymentPayload({
        x402Version: 2,
        resource: { url: "https://api.example/weather", description: "weather", mimeType: "application/json" },
        accepts: [v2req],
      });
      const header = encodePaymentSignatureHeader(payload);
      const req = { scheme: "exact", network: v2req.network, asset: t.address, payTo: PAYEE, amount, maxTimeoutSeconds: 300 };
      const id = `x402-v2-${t.chain_id}-${p}`;
      vectors.push({ id, form: "header", header, requirements: req, expect: "valid", note: "@x402/evm ExactEvmScheme (v2)" });
      vectors.push({ id: `${id}/recipient-mismatch`, form: "header", header, requirements: { ...req, payTo: OTHER }, expect: "invalid_exact_evm_payload_recipient_mismatch", note: "server asks another payTo" });
      vectors.push({ id: `${id}/value-mismatch`, form: "header", header, requirements: { ...req, amount: String(BigInt(amount) + 1n) }, expect: "invalid_exact_evm_payload_authorization_value_mismatch", note: "server asks another amount" });
      // Another configured token on another chain: the requirements are serviceable, the
      // payment is for the wrong network.
      const other = TOKENS[(TOKENS.indexOf(t) + 1) % TOKENS.length];
      vectors.push({ id: `${id}/network-mismatch`, form: "header", header, requirements: { ...req, network: `eip155:${other.chain_id}`, asset: other.address }, expect: "invalid_network", note: "server asks for a token on another chain" });
      vectors.push({ id: `${id}/unknown-chain`, form: "header", header, requirements: { ...req, network: "eip155:10" }, expect: "invalid_payment_requirements", note: "server asks for a chain with no configured token" });
      // The same payload with its signed value raised everywhere it appears: only the
      // signature can tell.
      const tampered = JSON.parse(Buffer.from(header, "base64").toString());
      const raised = String(BigInt(amount) + 1n);
      tampered.payload.authorization.value = raised;
      tampered.accepted.amount = raised;
      vectors.push({ id: `${id}/tampered-value`, form: "header", header: b64(tampered), requirements: { ...req, amount: raised }, expect: SIG, note: "value raised after signing" });

      if (t.v1) {
        const v1 = await client.createPaymentPayload({
          x402Version: 1,
          error: "payment required",
          accepts: [{ scheme: "exact", network: t.v1, maxAmountRequired: amount, resource: "https://api.example/weather", description: "weather", mimeType: "application/json", payTo: PAYEE, maxTimeoutSeconds: 300, asset: t.address, extra: { name: t.eip712_name, version: t.eip712_version } }],
        });
        const v1header = encodePaymentSignatureHeader(v1);
        const v1req = { ...req, network: t.v1 };
        vectors.push({ id: `x402-v1-${t.v1}-${p}`, form: "header", header: v1header, requirements: v1req, expect: "valid", note: "@x402/evm ExactEvmSchemeV1" });
        const flipped = JSON.parse(Buffer.from(v1header, "base64").toString());
        const s = flipped.payload.signature;
        flipped.payload.signature = s.slice(0, 10) + (s[10] === "0" ? "1" : "0") + s.slice(11);
        vectors.push({ id: `x402-v1-${t.v1}-${p}/flipped-r`, form: "header", header: b64(flipped), requirements: v1req, expect: SIG, note: "one hex digit of r changed" });
      }
    }
  }
  return { generator: "@x402/core 2.27.0 + @x402/evm 2.27.0 (viem 2.57.1 accounts)", now, tokens: TOKENS.map(tokenConfig), vectors };
}

// Smart-account payers on the devnet. Its first dev account deploys TestUSDC (nonce 0), then
// `Wallets::deploy` the OwnedWalletFactory, SelfSignedDelegate and StrictDelegate (nonces
// 1-3), so their addresses are known here.
async function smartVectors() {
  const now = Math.floor(Date.now() / 1000);
  const t = TOKENS[0];
  const deployer = getAddress("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
  const at = (nonce) => getContractAddress({ from: deployer, nonce: BigInt(nonce) });
  const contracts = { token: at(0), factory: at(1), self_signed: at(2), strict: at(3) };
  if (contracts.token !== getAddress(t.address)) throw new Error("the devnet token's address moved");
  const walletCode = JSON.parse(fs.readFileSync(path.join(here, "artifacts", "OwnedWallet.json"), "utf8")).bytecode;
  const walletAt = (owner, salt) => getContractAddress({
    opcode: "CREATE2",
    from: contracts.factory,
    salt: toHex(salt, { size: 32 }),
    bytecode: concat([walletCode, encodeAbiParameters([{ type: "address" }], [owner])]),
  });
  const createWallet = (owner, salt) => encodeFunctionData({
    abi: [{ type: "function", name: "createWallet", inputs: [{ name: "owner", type: "address" }, { name: "salt", type: "uint256" }], outputs: [{ type: "address" }], stateMutability: "nonpayable" }],
    args: [owner, BigInt(salt)],
  });
  // OwnedWallet's signature: abi.encode(uint256 ownerIndex, bytes ownerSignature).
  const walletSig = (sig) => encodeAbiParameters([{ type: "uint256" }, { type: "bytes" }], [0n, sig]);
  // A smart account as the x402 client sees one: an address and signTypedData.
  const smartSigner = (address, key, wrap) => ({ address, signTypedData: async (td) => wrap(await key.signTypedData(td)) });

  const setup = { contracts, wallets: [], delegations: [], allow_listed_factories: [contracts.factory] };
  const vectors = [];
  for (let p = 0; p < 4; p++) {
    const owner = account(`smart owner ${p}`);
    const deployed = walletAt(owner.address, 1);
    const counterfactual = walletAt(owner.address, 2);
    setup.wallets.push({ owner: owner.address, salt: 1, address: deployed });
    const cases = [
      ["wallet", smartSigner(deployed, owner, walletSig), "valid", "deployed OwnedWallet (ERC-1271)"],
      ["wallet-impostor", smartSigner(deployed, account("impostor"), walletSig), SIG, "deployed OwnedWallet, signed by a key that is not its owner"],
      ["counterfactual", smartSigner(counterfactual, owner, (s) => serializeErc6492Signature({ address: contracts.factory, data: createWallet(owner.address, 2), signature: walletSig(s) })), "valid", "OwnedWallet not deployed yet, ERC-6492 with the allow-listed factory"],
      ["counterfactual-unlisted", smartSigner(counterfactual, owner, (s) => serializeErc6492Signature({ address: OTHER, data: createWallet(owner.address, 2), signature: walletSig(s) })), SIG, "ERC-6492 naming a factory not on the allow-list"],
    ];
    for (const [label, delegate, expect, note] of [["7702", "self_signed", "valid", "EIP-7702 account delegated to an ERC-1271 delegate"], ["7702-strict", "strict", SIG, "EIP-7702 account delegated to a contract without ERC-1271 (its ECDSA signature recovers)"]]) {
      const key = `smart ${label} ${p}`;
      setup.delegations.push({ key_label: key, address: account(key).address, delegate });
      cases.push([label, account(key), expect, note]);
    }
    for (const [label, signer, expect, note] of cases) {
      const client = new x402Client().register("eip155:*", new ExactEvmScheme(signer)).setSpendControls({ allowedAssets: true, maxAmountPerPayment: false });
      const amount = String(1_000 * (p + 1));
      const v2req = { scheme: "exact", network: `eip155:${t.chain_id}`, amount, asset: t.address, payTo: PAYEE, maxTimeoutSeconds: 300, extra: { name: t.eip712_name, version: t.eip712_version } };
      const payload = await client.createPaymentPayload({
        x402Version: 2,
        resource: { url: "https://api.example/weather", description: "weather", mimeType: "application/json" },
        accepts: [v2req],
      });
      const req = { scheme: "exact", network: v2req.network, asset: t.address, payTo: PAYEE, amount, maxTimeoutSeconds: 300 };
      vectors.push({ id: `smart-${label}-${p}`, form: "header", header: encodePaymentSignatureHeader(payload), requirements: req, expect, note: `@x402/evm ExactEvmScheme (v2), ${note}` });
    }
  }
  return { generator: "@x402/core 2.27.0 + @x402/evm 2.27.0 (smart-account signers over viem 2.57.1 accounts)", now, tokens: [tokenConfig(t)], setup, vectors };
}

fs.mkdirSync(outDir, { recursive: true });
for (const [name, make] of [["viem", viemVectors], ["x402", x402Vectors], ["smart", smartVectors]]) {
  const file = await make();
  fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify(file, null, 1) + "\n");
  const counts = {};
  for (const v of file.vectors) counts[v.expect] = (counts[v.expect] ?? 0) + 1;
  console.log(`tests/vectors/${name}.json: ${file.vectors.length} vectors`, counts);
}
