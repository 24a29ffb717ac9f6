"""Command line: ``python -m megatron_moe {train,evaluate} --config F [--set section.key=value ...]``.

    python -m megatron_moe train --config examples/configs/debug.yaml
    torchrun --nproc_per_node 4 -m megatron_moe train --config examples/configs/debug.yaml \
        --set parallel.tp=2 --set parallel.ep=2
    srun --ntasks 8 python -m megatron_moe train --config my.yaml      # one task per GPU
    python -m megatron_moe evaluate --config examples/configs/debug.yaml --set checkpoint.load=DIR
    python -m megatron_moe preprocess --train train.tsv.xz --valid valid.tsv.xz --output data/x
    python -m megatron_moe convert --to hf --load runs/x/checkpoints --output hf/x
    python -m megatron_moe translate --config C --set checkpoint.load=DIR --input src.tsv

User errors (config, data, checkpoint) print one line ``error: ...`` and exit with status 2, before
any training starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import warnings
from typing import NoReturn

from megatron_moe.config import ConfigError, load_config
from megatron_moe.validation import validate


def _parser() -> argparse.ArgumentParser:
    from megatron_moe.routing.registry import METHODS

    methods = "\n".join(f"  {name:<13} {m.summary}" for name, m in METHODS.items())
    ap = argparse.ArgumentParser(prog="python -m megatron_moe",
                                 description="MoE training on megatron-core.",
                                 epilog=f"routing methods (moe.router):\n{methods}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train (or resume) a model"),
                        ("evaluate", "validation loss (and BLEU/chrF for translation) of a "
                                     "checkpoint, printed last as JSON"),
                        ("translate", "translate 'lang<TAB>source' lines from --input or stdin")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
        if name == "translate":
            p.add_argument("--input", help="file of 'lang<TAB>source' lines (default: stdin)")
            p.add_argument("--lang", help="language of every line (then lines are plain sources)")
    from megatron_moe.convert.cli import add_parser as add_convert
    from megatron_moe.data.preprocess_cli import add_parser as add_preprocess

    add_preprocess(sub)
    add_convert(sub)
    return ap


def _user_errors():
    from megatron_moe.checkpointing import CheckpointError
    from megatron_moe.data.corpus import DataError
    from megatron_moe.convert.mixtral import ConversionError
    from megatron_moe.decoding import GenerationError

    return (ConfigError, DataError, CheckpointError, GenerationError, ConversionError)


def exit_now(code: int) -> NoReturn:
    """End a command's process with ``code``, its output written and closed. Python's own exit
    would first garbage-collect every object of the ~2,300 modules torch and megatron import, about
    1 s per process (per rank) for nothing: they are frozen, and the operating system frees them."""
    gc.freeze()
    sys.exit(code)


def entry() -> NoReturn:
    """The ``megatron-moe`` command and ``python -m megatron_moe``."""
    exit_now(main())


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    args = _parser().parse_args(argv)
    from megatron_moe.runtime.distributed import is_main_rank, launch_env, shutdown_distributed

    if args.command in ("preprocess", "convert"):
        if args.command == "convert":
            from megatron_moe.convert.cli import run as run_tool
        else:
            from megatron_moe.data.preprocess_cli import run as run_tool
        try:
            return run_tool(args)
        except _user_errors() as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        finally:
            shutdown_distributed()
    try:
        cfg = load_config(args.config, args.overrides)
        env = launch_env()
        validate(cfg, env.world_size)
        if args.command != "train" and not cfg.checkpoint.load:
            raise ConfigError(f"{args.command} needs checkpoint.load (--set checkpoint.load=DIR)")
        if args.command == "translate" and cfg.data.format != "translation":
            raise ConfigError("translate needs data.format=translation and data.dir")
        if args.command == "train":
            from megatron_moe.training.loop import train

            train(cfg, env)
        elif args.command == "translate":
            _translate(cfg, env, args)
        else:
            result = _evaluate(cfg, env)
            if is_main_rank():
                print(json.dumps(result), flush=True)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown_distributed()
    return 0


def _load_for_inference(cfg, env):
    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.training.setup import setup_run

    run = setup_run(cfg, env, training=False, inference=cfg.data.format == "translation")
    run.check_vocabulary(load_checkpoint(cfg.checkpoint.load, cfg, run.model))
    return run


def _evaluate(cfg, env) -> dict:
    from megatron_moe.runtime.distributed import is_main_rank
    from megatron_moe.training.evaluation import validation_loss

    run = _load_for_inference(cfg, env)
    result = {"loss": validation_loss(run)}
    if cfg.data.format == "translation":
        from megatron_moe.bleu import format_table
        from megatron_moe.translation_eval import Translator

        translator = Translator(run)
        scores = translator.bleu(translator.test_pairs(), show_progress=is_main_rank())
        if is_main_rank():
            print(format_table(scores), flush=True)
        result.update(scores)
    return result


def _translate(cfg, env, args) -> None:
    from megatron_moe.data.corpus import DataError
    from megatron_moe.runtime.distributed import is_main_rank
    from megatron_moe.translation_eval import Translator

    stream = open(args.input, encoding="utf-8") if args.input else sys.stdin
    items = []
    with stream:
        for lineno, line in enumerate(stream, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if args.lang:
                items.append((args.lang, line))
            elif "\t" in line:
                items.append(tuple(line.split("\t", 1)))
            else:
                raise DataError(f"{args.input or '<stdin>'}:{lineno}: expected 'lang<TAB>source' "
                                f"(or pass --lang)")
    translator = Translator(_load_for_inference(cfg, env))
    for text in translator.translate(items):
        if is_main_rank():
            print(text, flush=True)
