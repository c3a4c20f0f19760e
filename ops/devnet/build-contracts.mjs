// Compiles the devnet contracts with solcjs (offline) into committed artifacts, so the Rust
// build and tests never need Node. Run from ops/devnet: `npm run build-contracts`.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const here = path.dirname(fileURLToPath(import.meta.url));
const sources = {};
for (const file of ["TestUSDC.sol", "BatchCall.sol", "GasPriceOracleStub.sol", "Ecdsa.sol", "Wallets.sol", "Probes.sol"]) {
  sources[file] = { content: fs.readFileSync(path.join(here, "contracts", file), "utf8") };
}

const input = {
  language: "Solidity",
  sources,
  settings: {
    // cancun: runs on anvil's default hardfork and on every chain the daemon targets.
    evmVersion: "cancun",
    optimizer: { enabled: true, runs: 200 },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors ?? []).filter((e) => e.severity === "error");
for (const e of output.errors ?? []) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);

const outDir = path.join(here, "artifacts");
fs.mkdirSync(outDir, { recursive: true });
for (const [file, contracts] of Object.entries(output.contracts)) {
  for (const [name, c] of Object.entries(contracts)) {
    const artifact = {
      contractName: name,
      sourceName: file,
      compiler: `solc ${solc.version()}`,
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
    };
    fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify(artifact, null, 2) + "\n");
    console.log(`wrote artifacts/${name}.json (${c.evm.deployedBytecode.object.length / 2} bytes runtime)`);
  }
}
