"""Command line: ``python -m megatron_moe {train,evaluate} --config F [--set section.key=value ...]``.

    python -m megatron_moe train --config examples/configs/debug.yaml
    torchrun --nproc_per_node 4 -m megatron_moe train --config examples/configs/debug.yaml \
        --set parallel.tp=2 --set parallel.ep=2
    srun --ntasks 8 python -m megatron_moe train --config my.yaml      # one task per GPU
    python -m megatron_moe evaluate --config examples/configs/debug.yaml --set checkpoint.load=DIR

User errors (config, data, checkpoint) print one line ``error: ...`` and exit with status 2, before
any training starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from megatron_moe.config import ConfigError, load_config
from megatron_moe.validation import validate


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m megatron_moe",
                                 description="MoE training on megatron-core.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train (or resume) a model"),
                        ("evaluate", "validation loss of a checkpoint, printed last as JSON")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    return ap


def _user_errors():
    from megatron_moe.checkpointing import CheckpointError
    from megatron_moe.data.corpus import DataError

    return (ConfigError, DataError, CheckpointError)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron_moe.routing.routers import ROUTERS
    from megatron_moe.runtime.distributed import is_main_rank, launch_env, shutdown_distributed

    try:
        cfg = load_config(args.config, args.overrides)
        env = launch_env()
        validate(cfg, env.world_size, routers=ROUTERS)
        if args.command == "evaluate" and not cfg.checkpoint.load:
            raise ConfigError("evaluate needs checkpoint.load (--set checkpoint.load=DIR)")
        if args.command == "train":
            from megatron_moe.training.loop import train

            train(cfg, env)
        else:
            loss = _evaluate(cfg, env)
            if is_main_rank():
                print(json.dumps({"loss": loss}), flush=True)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown_distributed()
    return 0


def _evaluate(cfg, env) -> float:
    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.training.evaluation import validation_loss
    from megatron_moe.training.setup import setup_run

    run = setup_run(cfg, env, training=False)
    load_checkpoint(cfg.checkpoint.load, cfg, run.model)
    return validation_loss(run)
