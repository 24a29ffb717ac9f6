"""SMoE-Dropout self-slimming: validation loss of one checkpoint at every k from 1 to E.

    python tools/smoe_k_sweep.py --config examples/configs/debug.yaml \
        --set moe.router=smoe_dropout --set checkpoint.load=runs/smoe [--csv k_sweep.csv]
    torchrun --nproc_per_node 2 tools/smoe_k_sweep.py ... --set parallel.ep=2

Builds the model once, loads the checkpoint, and evaluates it with ``moe.eval_topk`` = 1 .. E;
prints a table (k, loss, perplexity, loss relative to k = E) and optionally writes it as CSV.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.config import ConfigError, load_config  # noqa: E402
from megatron_moe.runtime.distributed import is_main_rank, launch_env, shutdown_distributed  # noqa: E402
from megatron_moe.validation import validate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--csv", help="also write the table to this CSV file")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        env = launch_env()
        validate(cfg, env.world_size)
        if cfg.moe.router != "smoe_dropout" or not cfg.checkpoint.load:
            raise ConfigError("the sweep needs moe.router=smoe_dropout and checkpoint.load=DIR")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.training.evaluation import validation_loss
    from megatron_moe.training.setup import setup_run

    run = setup_run(cfg, env, training=False)
    load_checkpoint(cfg.checkpoint.load, cfg, run.model)
    rows = []
    for k in range(1, cfg.moe.num_experts + 1):
        cfg.moe.eval_topk = k
        loss = validation_loss(run)
        rows.append((k, loss))
        if is_main_rank():
            print(f"[sweep] k={k}: loss {loss:.4f}", flush=True)
    if is_main_rank():
        full = rows[-1][1]
        print(f"\n{'k':>3} {'loss':>8} {'ppl':>9} {'vs k=E':>7}")
        for k, loss in rows:
            print(f"{k:>3} {loss:>8.4f} {math.exp(loss):>9.2f} {loss / full:>7.3f}")
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                csv.writer(f).writerows([("k", "loss"), *rows])
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
