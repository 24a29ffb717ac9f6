"""Take a deterministic per-language sample of a parallel TSV corpus (lang<TAB>src<TAB>tgt).

    python tools/sample_corpus.py --input ../shared/data/l10n10/train.tsv.xz \
        --output examples/data/l10n10-sample/train.tsv.xz --per-lang 3000

A pair is kept when a hash of (seed, line) falls among the smallest ``per-lang`` of its language, so
the sample does not depend on the file's order and the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import lzma
import os
import sys
from collections import defaultdict


def _open(path: str, mode: str):
    return lzma.open(path, mode + "t", encoding="utf-8") if path.endswith(".xz") else open(
        path, mode, encoding="utf-8")


def sample(path: str, per_lang: int, seed: int) -> list[str]:
    best: dict[str, list] = defaultdict(list)
    with _open(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            parts = line.split("\t")
            if len(parts) != 3:
                raise SystemExit(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            key = hashlib.sha1(f"{seed}\t{line}".encode()).hexdigest()
            heap = best[parts[0]]
            item = (-int(key[:15], 16), line)
            if len(heap) < per_lang:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return sorted(line for heap in best.values() for _, line in heap)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--per-lang", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    lines = sample(args.input, args.per_lang, args.seed)
    tmp = args.output + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.output.endswith(".xz"):  # fixed preset, no timestamps: byte-identical output
        with lzma.open(tmp, "wt", encoding="utf-8", preset=9) as f:
            f.writelines(line + "\n" for line in lines)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    os.replace(tmp, args.output)
    print(f"wrote {len(lines)} pairs to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
