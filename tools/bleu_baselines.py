"""Reference points for a BLEU table: the copy baseline (hypothesis = the English source).

    python tools/bleu_baselines.py --test ../shared/data/l10n10/test.tsv.xz

Software strings carry untranslated names, format specifiers and numbers, so copying the source
scores above zero; a trained model must beat it by a wide margin.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.bleu import format_table, score  # noqa: E402
from megatron_moe.data.corpus import DataError  # noqa: E402
from megatron_moe.data.pairs import read_pairs  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", required=True, help="TSV/JSONL pairs")
    args = ap.parse_args()
    try:
        pairs = read_pairs(args.test)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = score([p.lang for p in pairs], [p.src for p in pairs], [p.tgt for p in pairs])
    print("copy baseline (hypothesis = source)")
    print(format_table(result))
    print(json.dumps(result))
