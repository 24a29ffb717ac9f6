"""``python -m megatron_moe preprocess`` (also ``tools/preprocess_data.py``): arguments and run."""

from __future__ import annotations

import argparse
import sys

from megatron_moe.data.preprocess import preprocess

HELP = ("tokenize (a SentencePiece model trained here, or --tokenizer) and write megatron indexed "
        "datasets from TSV/JSONL pairs or LM text")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("preprocess", help=HELP, description=HELP)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("translation", "lm"), default="translation",
                   help="translation: parallel pairs; lm: plain text (.txt lines) or JSONL "
                        "{\"text\": ...} for language-model pretraining")
    p.add_argument("--train", help="training pairs (TSV lang<TAB>src<TAB>tgt or JSONL, .xz ok); "
                                   "default: the bundled L10N-10 sample")
    p.add_argument("--valid", help="validation pairs (default: the bundled sample's)")
    p.add_argument("--test", help="test pairs (default: the bundled sample's)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="size of the SentencePiece model to train (not with --tokenizer)")
    p.add_argument("--tokenizer", help="use an existing tokenizer instead of training one: a "
                   "SentencePiece .model, a tokenizers tokenizer.json (with its "
                   "tokenizer_config.json) or a Hugging Face model directory holding either; "
                   "the model's vocabulary follows it")
    p.add_argument("--workers", type=int, default=2, help="tokenisation processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def run(args) -> int:
    from megatron_moe.data.corpus import DataError, default_path

    if args.mode == "lm":
        from megatron_moe.data.lm_text import preprocess_lm

        if not args.train:
            raise DataError("--mode lm needs --train (a .txt or .jsonl file)")
        meta = preprocess_lm({"train": args.train, "valid": args.valid, "test": args.test},
                             args.output, args.vocab_size, args.seed, args.force, args.tokenizer)
        print(f"wrote {args.output}: vocabulary {meta['vocab_size']}; " + ", ".join(
            f"{k}: {v['documents']} documents / {v['tokens']} tokens"
            for k, v in meta["splits"].items()), file=sys.stderr)
        return 0

    splits = {"train": args.train or default_path("train"),
              "valid": args.valid or (None if args.train else default_path("valid")),
              "test": args.test or (None if args.train else default_path("test"))}
    meta = preprocess({k: v for k, v in splits.items() if v}, args.output, args.vocab_size,
                      args.workers, args.seed, args.force, args.tokenizer)
    counts = ", ".join(f"{k}: {v['pairs']} pairs / {v['tokens']} tokens"
                       for k, v in meta["splits"].items())
    print(f"wrote {args.output}: {len(meta['languages'])} languages, vocabulary "
          f"{meta['vocab_size']}; {counts}", file=sys.stderr)
    return 0
