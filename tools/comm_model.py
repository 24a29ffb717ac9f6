"""Step-time model of expert-parallel (EP) communication, for gating dropout at cluster scale.

    step_time(p) = compute_s + n_coll(p) * latency_s + bytes(p) / bandwidth_Bps

``n_coll`` and ``bytes`` are the EP collectives one rank issues per training step and the bytes it
sends through them (dispatch and combine, forward and backward); ``compute_s`` is everything else
(the step with no EP communication). Gating dropout (``gate_drop``) at rate p skips a fraction p
of the MoE layer calls' EP collectives (those tokens are served by local experts), so collectives
and bytes scale by (1 - drop rate) and compute stays. As in the paper (Liu et al., 2022), the
decision is per layer call, for all its tokens: a dropped call issues no collective at all (a
per-token drop would cut bytes by (1 - p) but keep every collective and its latency).

1. calibrate: fit (compute_s per setting, latency_s, bandwidth) by least squares on measured runs
   of ``tools/bench_gating_dropout.py --json``, then predict held-out runs (another p, another
   dispatcher) and report predicted vs measured step-time ratio to p = 0.
2. project: the step-time ratio at p = 0 ... 0.5 of a Mixtral-8x7B-shaped model at EP = 8 in one
   H100 node (NVLink) and EP = 64 over 8 nodes (InfiniBand), from FLOPs at a stated MFU and
   all-to-all bytes at stated bandwidths. Every assumption is in ``ASSUMPTIONS`` with its source.

Commands (repository root; each bench run is about a minute on 2 CPU cores):

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 60 --json docs/results/comm_model/bench_ep2.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 60 --set train.micro_batch_size=1 --set train.global_batch_size=2 \\
        --json docs/results/comm_model/bench_ep2_small.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 30 --set model.seq_length=512 \\
        --json docs/results/comm_model/bench_ep2_long.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 60 --set moe.dispatcher=allgather \\
        --json docs/results/comm_model/bench_ep2_allgather.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 30 --set moe.dispatcher=allgather --set model.seq_length=512 \\
        --json docs/results/comm_model/bench_ep2_allgather_long.json

    # calibrated at p = 0 and 0.5, predicting p = 0.3 (one setting: latency and bandwidth are not
    # separable there, see calibrate())
    .venv/bin/python tools/comm_model.py calibrate \\
        --fit docs/results/comm_model/bench_ep2.json:0,0.5 \\
        --predict docs/results/comm_model/bench_ep2.json:0.3
    # calibrated on alltoall (three token counts, p = 0 and 0.5), predicting allgather
    .venv/bin/python tools/comm_model.py calibrate \\
        --fit docs/results/comm_model/bench_ep2.json:0,0.5 \\
        --fit docs/results/comm_model/bench_ep2_small.json:0,0.5 \\
        --fit docs/results/comm_model/bench_ep2_long.json:0,0.5 \\
        --predict docs/results/comm_model/bench_ep2_allgather.json:0.3,0.5 \\
        --predict docs/results/comm_model/bench_ep2_allgather_long.json:0.3,0.5
    # (--anchor: each predicted file's compute_s from its own p = 0 row instead of the fit's;
    #  --stat mean: mean instead of median step times)
    .venv/bin/python tools/comm_model.py project \\
        --png docs/results/comm_model/projection.png --json docs/results/comm_model/projection.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.study.calibration import (BenchFileError, calibrate, load_bench,  # noqa: E402
                                             predict, select)
from megatron_moe.study.projection import (ASSUMPTIONS, Assumption, clusters,  # noqa: E402
                                           flops_per_token, param_counts, project_step, projection)


def write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def plot(rows: Sequence[dict], path: str) -> None:
    """Ratio vs p per cluster, the band between half and double the all-to-all bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, color) in zip(dict.fromkeys(r["cluster"] for r in rows), ("C0", "C1")):
        line = {b: [r for r in rows if r["cluster"] == name and r["bandwidth"] == b]
                for b in ("assumed", "bw_half", "bw_double")}
        ps = [r["p"] for r in line["assumed"]]
        ax.fill_between(ps, [r["ratio"] for r in line["bw_half"]],
                        [r["ratio"] for r in line["bw_double"]], color=color, alpha=0.2,
                        label=f"{name}: all-to-all bandwidth 0.5x..2x (<= peak)")
        ax.plot(ps, [r["ratio"] for r in line["assumed"]], "o-", color=color, label=name)
    ax.set_xlabel("gating dropout p (gate_drop)")
    ax.set_ylabel("step time / step time at p = 0")
    ax.set_title("Mixtral-8x7B shape on H100, projected (tools/comm_model.py)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _print_assumptions(a: Mapping[str, Assumption]) -> None:
    print("assumptions:")
    for name, x in a.items():
        print(f"  {name} = {x.value:g} {x.unit}\n      source: {x.source}")


def _spec(text: str) -> tuple[str, Optional[list[float]]]:
    """FILE or FILE:P[,P...]"""
    path, sep, ps = text.rpartition(":")
    if not sep or not ps or not all(_is_float(v) for v in ps.split(",")):
        return text, None
    return path, [float(v) for v in ps.split(",")]


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def run_calibrate(args: argparse.Namespace) -> dict:
    fit = []
    for spec in args.fit:
        path, ps = _spec(spec)
        fit += select(load_bench(path, args.stat), ps, path)
    cal = calibrate(fit)
    print(f"fit on {len(fit)} measurements ({args.stat} step time), {len(cal.compute_s)} "
          f"setting(s): latency {cal.latency_s * 1e6:.1f} us/collective, bandwidth "
          f"{cal.bandwidth_Bps / 1e6:.1f} MB/s, rms residual {cal.rms_residual_s * 1e3:.2f} ms")
    for s, c in cal.compute_s.items():
        print(f"  compute_s {c * 1e3:.1f} ms  [{s}]")
    for note in cal.notes:
        print(f"  note: {note}")
    preds = []
    for spec in args.predict:
        path, ps = _spec(spec)
        rows = load_bench(path, args.stat)
        baseline = select(rows, [0.0], path)[0]
        preds += [predict(cal, m, baseline, args.anchor) for m in select(rows, ps, path)]
    print(f"\n{'file':<36} {'p':>4} {'meas ms':>8} {'pred ms':>8} {'meas ratio':>10} "
          f"{'pred ratio':>10} {'ratio err':>9} {'saving err':>10}")
    for r in preds:
        print(f"{Path(r.source).name:<36} {r.p:>4.2f} {r.measured_s * 1e3:>8.1f} "
              f"{r.predicted_s * 1e3:>8.1f} {r.measured_ratio:>10.3f} {r.predicted_ratio:>10.3f} "
              f"{r.ratio_error:>+9.1%} {r.saving_error:>+10.1%}")
    return {"calibration": asdict(cal), "stat": args.stat, "anchor": args.anchor,
            "fit": [asdict(m) for m in fit],
            "predictions": [{**asdict(r), "ratio_error": r.ratio_error,
                             "saving_error": r.saving_error} for r in preds]}


def run_project(args: argparse.Namespace) -> dict:
    rows = projection(args.p)
    for c, s in clusters():
        n = param_counts(s)
        print(f"{c.name}, {s.experts} experts: {n['total'] / 1e9:.2f} B parameters, "
              f"{n['active_matmul'] / 1e9:.2f} B active (matmul), "
              f"{flops_per_token(s) / 1e9:.2f} GFLOP/token, all-to-all "
              f"{project_step(s, c, 0.0)['a2a_bytes_per_rank'] / 1e6:.1f} MB/rank each")
    print(f"\n{'cluster':<24} {'p':>4} {'compute ms':>10} {'EP ms':>7} {'ratio':>6} "
          f"{'ratio @0.5x bw':>14} {'ratio @2x bw*':>13}")
    by = {(r["cluster"], r["bandwidth"], r["p"]): r for r in rows}
    for r in (r for r in rows if r["bandwidth"] == "assumed"):
        lo, hi = by[(r["cluster"], "bw_half", r["p"])], by[(r["cluster"], "bw_double", r["p"])]
        print(f"{r['cluster']:<24} {r['p']:>4.2f} {r['compute_s'] * 1e3:>10.1f} "
              f"{r['comm_s'] * 1e3:>7.1f} {r['ratio']:>6.3f} {lo['ratio']:>14.3f} "
              f"{hi['ratio']:>13.3f}")
    print("* 2x the assumed all-to-all bandwidth, capped at the link peak")
    _print_assumptions(ASSUMPTIONS)
    if args.png:
        plot(rows, args.png)
        print(f"wrote {args.png}")
    return {"assumptions": {k: asdict(v) for k, v in ASSUMPTIONS.items()}, "rows": rows}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="fit on measured runs, predict held-out ones")
    cal.add_argument("--fit", action="append", required=True, metavar="FILE[:P,P...]")
    cal.add_argument("--predict", action="append", default=[], metavar="FILE[:P,P...]")
    cal.add_argument("--anchor", action="store_true",
                     help="compute_s of each predicted file from its own p = 0 row")
    cal.add_argument("--stat", choices=("median", "mean"), default="median")
    cal.add_argument("--json", help="write the fit and predictions to this file")
    proj = sub.add_parser("project", help="Mixtral-8x7B shape at EP=8 (NVLink), EP=64 (IB)")
    proj.add_argument("--p", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    proj.add_argument("--png", help="plot of the ratio vs p")
    proj.add_argument("--json", help="write the projection and its assumptions to this file")
    args = ap.parse_args(argv)
    try:
        doc = run_calibrate(args) if args.command == "calibrate" else run_project(args)
    except (BenchFileError, ValueError) as e:
        sys.exit(f"comm_model: {e}")
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
