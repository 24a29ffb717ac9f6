"""Gating dropout vs top-k, side by side in one run: EP bytes per step and step time.

    torchrun --nproc_per_node 2 tools/bench_gating_dropout.py                    # EP=2 on CPU
    torchrun --nproc_per_node 2 tools/bench_gating_dropout.py --p 0 0.3 0.5 --steps 20 \
        --set model.hidden_size=256

One model is trained with the drop probabilities interleaved step by step (round robin, after a
warm-up round), so every configuration sees the same machine state; p = 0 is exactly megatron's
top-k router (a test proves it bitwise). Prints, per p: the measured drop rate, the megabytes the
EP collectives sent per step (all ranks), the megabytes the dropped calls did not send, the median
step time and its ratio to p = 0. ``--json FILE`` also writes the table rows (and the setting) as
JSON, the input of ``tools/comm_model.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.config import load_config, moe_layer_pattern  # noqa: E402
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
    ap.add_argument("--json", help="also write the table rows and the setting to this JSON file")
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
            microbatches = values.pop("microbatches")
            values.pop("processed")
            values.update(interval_values(run, 1, microbatches)[0])  # this step's
            values["microbatches"] = microbatches
            step += 1
            if round_ > 0:  # round 0 warms up every configuration
                rows[p].append(values)
        if is_main_rank() and round_ % 5 == 0:
            print(f"[bench] round {round_}/{args.steps}", flush=True)
    if is_main_rank():
        _print_table(rows, cfg, env.world_size)
        if args.json:
            _write_json(args.json, rows, cfg, env.world_size, args.overrides)
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


def _write_json(path: str, rows: dict, cfg, world: int, overrides: list) -> None:
    """The table rows plus what a comm model needs: MoE layer calls (and dropped calls) per step
    on one rank, and the setting. Written to a temporary file, then renamed (atomic)."""
    m = cfg.model
    moe_layers = sum(moe_layer_pattern(m)) // cfg.parallel.pp  # on one pipeline stage
    out_rows = []
    for p, values in rows.items():
        drop = statistics.mean(v.get("drop_rate", 0.0) for v in values)
        calls = statistics.mean(v["microbatches"] * moe_layers for v in values)
        out_rows.append({
            "p": p, "drop_rate": drop,
            "ep_mbytes": statistics.mean(v["ep_mbytes"] for v in values),
            "ep_mbytes_saved": statistics.mean(v.get("ep_mbytes_saved", 0.0) for v in values),
            "step_time_s": statistics.median(v["step_time_s"] for v in values),
            "step_time_mean_s": statistics.mean(v["step_time_s"] for v in values),
            "steps": {"step_time_s": [v["step_time_s"] for v in values],
                      "drop_rate": [v.get("drop_rate", 0.0) for v in values],
                      "ep_mbytes": [v["ep_mbytes"] for v in values]},
            "moe_calls_per_rank": calls, "dropped_calls_per_rank": calls * drop})
    setting = {"dispatcher": cfg.moe.dispatcher, "ep": cfg.parallel.ep, "world_size": world,
               "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
               "num_layers": m.num_layers, "moe_layers": moe_layers, "seq_length": m.seq_length,
               "micro_batch_size": cfg.train.micro_batch_size,
               "global_batch_size": cfg.train.global_batch_size,
               "num_experts": cfg.moe.num_experts, "topk": cfg.moe.topk,
               "gating_dropout_mode": cfg.moe.gating_dropout.mode, "overrides": overrides}
    note = ("ep_mbytes: MB the EP collectives sent per step, summed over all ranks, forward only "
            "(dispatch + combine); moe_calls_per_rank: MoE layer calls per step on one rank; "
            "step_time_s: median (step_time_mean_s: mean) over the measured steps; steps: the "
            "per-step values")
    doc = {"note": note, "setting": setting, "rows": out_rows}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
