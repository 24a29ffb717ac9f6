"""SMoE-Dropout self-slimming: one checkpoint evaluated at every k from 1 to E.

    python tools/smoe_k_sweep.py --config examples/configs/debug.yaml \
        --set moe.router=smoe_dropout --set checkpoint.load=runs/smoe --csv k.csv --png k.png
    python tools/smoe_k_sweep.py --config examples/configs/debug.yaml \
        --set moe.router=smoe_dropout --set data.format=translation --set data.dir=data/mt \
        --set checkpoint.load=runs/mt --csv k.csv --png k.png --bleu-pairs 200
    torchrun --nproc_per_node 2 tools/smoe_k_sweep.py ... --set parallel.ep=2

Builds the model once, loads the checkpoint and, for k = 1 .. E or the --k given (the routing context's
``eval_topk``; the config is not changed), evaluates the validation loss and, with
``data.format=translation``, BLEU and chrF on the first --bleu-pairs test pairs (default all, 0
skips them). Prints a table (k, loss, perplexity, loss relative to k = E, BLEU, chrF); --csv writes
``k,loss,bleu,chrf`` and --png plots the metrics against k, each file written atomically.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.cli import _user_errors, exit_now  # noqa: E402
from megatron_moe.config import ConfigError, load_config  # noqa: E402
from megatron_moe.routing.registry import routing_method  # noqa: E402
from megatron_moe.runtime.distributed import is_main_rank, launch_env, shutdown_distributed  # noqa: E402
from megatron_moe.staging import staged_file  # noqa: E402
from megatron_moe.validation import validate  # noqa: E402


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("k", "loss", "bleu", "chrf"),
                                 *[["" if v is None else v for v in row] for row in rows]])


def _plot(path: Path, rows) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = [row[0] for row in rows]
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(ks, [row[1] for row in rows], "o-", color="tab:blue", label="validation loss")
    ax.set(xlabel="k (experts per token in evaluation)", ylabel="validation loss", xticks=ks,
           title="SMoE-Dropout: one checkpoint at every k")
    lines = list(ax.get_lines())
    if rows[0][2] is not None:
        ax2 = ax.twinx()
        ax2.plot(ks, [row[2] for row in rows], "s--", color="tab:orange", label="BLEU")
        ax2.plot(ks, [row[3] for row in rows], "^--", color="tab:green", label="chrF")
        ax2.set_ylabel("BLEU / chrF")
        lines += ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--csv", help="write k,loss,bleu,chrf to this CSV file")
    ap.add_argument("--png", help="plot the metrics against k into this PNG file")
    ap.add_argument("--k", type=int, nargs="+", metavar="K",
                    help="the k to evaluate (default: every k from 1 to moe.num_experts)")
    ap.add_argument("--bleu-pairs", type=int, metavar="N",
                    help="BLEU/chrF on the first N test pairs (default: all; 0: skip)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        env = launch_env()
        validate(cfg, env.world_size)
        if not routing_method(cfg).slimmable or not cfg.checkpoint.load:
            raise ConfigError(f"the sweep needs a method evaluated at any k (moe.router="
                              f"smoe_dropout, not {cfg.moe.router!r}) and checkpoint.load=DIR")
        bad = [k for k in args.k or [] if not 1 <= k <= cfg.moe.num_experts]
        if bad:
            raise ConfigError(f"--k {bad[0]} must be in 1..moe.num_experts "
                              f"({cfg.moe.num_experts})")
        if args.bleu_pairs is not None and args.bleu_pairs < 0:
            raise ConfigError(f"--bleu-pairs ({args.bleu_pairs}) must be >= 0")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _sweep(cfg, env, args)
    except _user_errors() as e:  # a bad checkpoint or test file: one line, as the CLI does
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown_distributed()


def _sweep(cfg, env, args) -> int:
    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.training.evaluation import validation_loss
    from megatron_moe.training.setup import setup_run
    from megatron_moe.translation_eval import Translator

    translation = cfg.data.format == "translation"
    run = setup_run(cfg, env, training=False, inference=translation)
    load_checkpoint(cfg.checkpoint.load, cfg, run.model)
    translator = Translator(run) if translation and args.bleu_pairs != 0 else None
    pairs = translator.test_pairs(args.bleu_pairs) if translator else None
    rows = []
    for k in sorted(set(args.k or range(1, cfg.moe.num_experts + 1))):
        with run.context.overriding(eval_topk=k):
            loss = validation_loss(run)
            scores = translator.bleu(pairs) if translator else {}
        rows.append((k, loss, scores.get("bleu"), scores.get("chrf")))
        if is_main_rank():
            extra = f", BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}" if scores else ""
            print(f"[sweep] k={k}: loss {loss:.4f}{extra}", file=sys.stderr, flush=True)
    if is_main_rank():
        full = rows[-1][1]
        print(f"{'k':>3} {'loss':>8} {'ppl':>9} {'vs k=' + str(rows[-1][0]):>7} {'BLEU':>6} "
              f"{'chrF':>6}")
        for k, loss, bleu, chrf in rows:
            scores = f"{bleu:>6.2f} {chrf:>6.2f}" if translator else f"{'-':>6} {'-':>6}"
            print(f"{k:>3} {loss:>8.4f} {math.exp(loss):>9.2f} {loss / full:>7.3f} {scores}")
        for path, write in ((args.csv, _write_csv), (args.png, _plot)):
            if path:
                with staged_file(path) as tmp:
                    write(tmp, rows)
    return 0


if __name__ == "__main__":
    exit_now(main())
