"""Gating dropout vs top-k, side by side in one run: EP bytes per step and step time.

    torchrun --nproc_per_node 2 tools/bench_gating_dropout.py                    # EP=2 on CPU
    torchrun --nproc_per_node 2 tools/bench_gating_dropout.py --p 0 0.3 0.5 --steps 20 \
        --set model.hidden_size=256

One model is trained with the drop probabilities interleaved step by step (round robin, after a
warm-up round), so every configuration sees the same machine state; p = 0 is exactly megatron's
top-k router (a test proves it bitwise). Prints, per p: the measured drop rate, the megabytes the
EP collectives sent per step (all ranks), the megabytes the dropped calls did not send, the median
step time and its ratio to p = 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.config import load_config  # noqa: E402
from megatron_moe.runtime.distributed import is_main_rank, launch_env, shutdown_distributed  # noqa: E402
from megatron_moe.validation import validate  # noqa: E402

DEFAULTS = ["parallel.ep=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
            "model.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.warmup_steps=0", "moe.gating_dropout.p=0.5"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1]
                                            / "examples/configs/debug.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--steps", type=int, default=20, help="measured steps per p")
    args = ap.parse_args(argv)
    steps = (args.steps + 1) * len(args.p)
    cfg = load_config(args.config, DEFAULTS + args.overrides + [
        f"train.steps={steps}", f"moe.gating_dropout.p={max(args.p)}"])
    env = launch_env()
    validate(cfg, env.world_size)
    from megatron_moe.training.loop import interval_values, train_step
    from megatron_moe.training.setup import setup_run

    run = setup_run(cfg, env, training=True)
    rows = {p: [] for p in args.p}
    step = 0
    for round_ in range(args.steps + 1):
        for p in args.p:
            with run.context.overriding(drop_p=p):  # the config stays as validated
                values = train_step(run, step)
            values.update(interval_values(run, 1, values.pop("microbatches"))[0])  # this step's
            step += 1
            if round_ > 0:  # round 0 warms up every configuration
                rows[p].append(values)
        if is_main_rank() and round_ % 5 == 0:
            print(f"[bench] round {round_}/{args.steps}", flush=True)
    if is_main_rank():
        _print_table(rows, cfg, env.world_size)
    shutdown_distributed()


def _print_table(rows: dict, cfg, world: int) -> None:
    base = statistics.median(v["step_time_s"] for v in rows[min(rows)])
    print(f"\nEP={cfg.parallel.ep} x {world} ranks, dispatcher {cfg.moe.dispatcher}, "
          f"hidden {cfg.model.hidden_size}, {cfg.model.num_layers} MoE layers, "
          f"{cfg.train.global_batch_size}x{cfg.model.seq_length} tokens/step, "
          f"{len(rows[min(rows)])} steps per p")
    print(f"{'p':>5} {'drop rate':>10} {'EP MB/step':>11} {'saved MB/step':>14} "
          f"{'step ms':>8} {'vs p=0':>7}")
    for p, values in rows.items():
        t = statistics.median(v["step_time_s"] for v in values)
        drop = statistics.mean(v.get("drop_rate", 0.0) for v in values)
        sent = statistics.mean(v["ep_mbytes"] for v in values)
        saved = statistics.mean(v.get("ep_mbytes_saved", 0.0) for v in values)
        print(f"{p:>5.2f} {drop:>10.3f} {sent:>11.3f} {saved:>14.3f} {t * 1e3:>8.1f} "
              f"{t / base:>7.3f}")


if __name__ == "__main__":
    main()
