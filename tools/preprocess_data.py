"""Corpus -> SentencePiece -> megatron indexed datasets (same as ``python -m megatron_moe preprocess``).

    python tools/preprocess_data.py --train ../shared/data/l10n10/train.tsv.xz \
        --valid ../shared/data/l10n10/valid.tsv.xz --test ../shared/data/l10n10/test.tsv.xz \
        --output data/l10n10 --vocab-size 8000 --workers 2
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.data.corpus import DataError  # noqa: E402
from megatron_moe.data.preprocess_cli import HELP, configure, run  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=HELP)
    configure(parser)
    try:
        sys.exit(run(parser.parse_args()))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
