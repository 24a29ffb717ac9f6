"""The study's PNG plots, drawn from the run records (matplotlib's Agg canvas, no display).

Each function takes the plan, the finished runs by name ({name: [RunRecords per seed]}) and a
path, and returns whether it drew anything (a plot whose runs have not finished is skipped).
Curves over seeds: the mean on a common grid (linear interpolation, up to the shortest seed) with
the min-max band of the seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from megatron_moe.staging import staged_file


def _figure(rows: int = 1, cols: int = 1, size=(7.0, 4.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _band(ax, seeds: list[tuple[list, list]], label: str) -> None:
    end = min(xs[-1] for xs, _ in seeds)
    grid = np.linspace(max(xs[0] for xs, _ in seeds), end, 100)
    ys = np.array([np.interp(grid, xs, vals) for xs, vals in seeds])
    line, = ax.plot(grid, ys.mean(axis=0), label=f"{label} ({len(seeds)} seeds)")
    if len(seeds) > 1:
        ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)


def validation_curves(plan, runs, path: Path, x: str) -> bool:
    fig, axes = _figure()
    ax = axes[0][0]
    for planned in plan.runs:
        seeds = []
        for r in runs.get(planned.name, []):
            rows = [v for v in r.valid if "train_s" in v]
            if len(rows) >= 2:
                xs = [v["train_s"] / 60 if x == "time" else v["step"] for v in rows]
                seeds.append((xs, [v["valid_loss"] for v in rows]))
        if seeds:
            _band(ax, seeds, planned.label)
    if not ax.lines:
        return False
    ax.set(xlabel="training time (minutes)" if x == "time" else "step", ylabel="validation loss",
           title=f"Validation loss against {'wall-clock training time' if x == 'time' else 'step'}")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def _per_run(plan, runs, value) -> tuple[list[str], list[list[float]]]:
    labels, values = [], []
    for planned in plan.runs:
        got = [value(r) for r in runs.get(planned.name, [])]
        got = [v for v in got if v is not None]
        if got:
            labels.append(planned.name)
            values.append(got)
    return labels, values


def _dots(ax, labels, values, ylabel: str) -> None:
    for i, vals in enumerate(values):
        ax.bar(i, statistics.mean(vals), color="lightsteelblue")
        ax.plot([i] * len(vals), vals, "ko", markersize=4)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)


def quality(plan, runs, path: Path) -> bool:
    fig, axes = _figure(1, 2, size=(10.0, 4.2))
    drew = False
    for ax, key, name in ((axes[0][0], "bleu", "test BLEU"), (axes[0][1], "chrf", "test chrF")):
        labels, values = _per_run(plan, runs, lambda r, k=key: r.evaluation.get(k))
        if labels:
            _dots(ax, labels, values, name)
            ax.set_title(f"{name} per run (bar: mean, dots: seeds)")
            drew = True
    if drew:
        _save(fig, path)
    return drew


def cost(plan, runs, path: Path) -> bool:
    fig, axes = _figure(1, 2, size=(10.0, 4.2))
    panels = ((axes[0][0], "ep_mbytes", "EP megabytes sent per step (all ranks)"),
              (axes[0][1], "step_time_s", "median step time (s)"))
    for ax, key, name in panels:
        labels, values = _per_run(plan, runs, lambda r, k=key: r.record["summary"].get(k))
        if not labels:
            return False
        _dots(ax, labels, values, name)
        ax.set_title(name)
    _save(fig, path)
    return True


def _expert_share(r) -> dict[int, np.ndarray]:
    """Layer -> share of the routed (token, expert) pairs per expert, over the whole run."""
    totals: dict[int, dict[int, float]] = {}
    for row in r.train:
        for key, value in row.get("layers", {}).items():
            layer, _, what = key.removeprefix("moe/layer").partition("/")
            if what.startswith("expert") and what.endswith("_tokens"):
                e = int(what[len("expert"):-len("_tokens")])
                totals.setdefault(int(layer), {}).setdefault(e, 0.0)
                totals[int(layer)][e] += value
    return {layer: np.array([c[e] for e in sorted(c)]) / max(sum(c.values()), 1.0)
            for layer, c in sorted(totals.items())}


def expert_load(plan, runs, path: Path) -> bool:
    names = [n for n in plan.plots.get("expert_load", []) if runs.get(n)]
    if not names:
        return False
    fig, axes = _figure(1, len(names), size=(3.6 * len(names), 3.8))
    for ax, name in zip(axes[0], names):
        shares = _expert_share(runs[name][0])
        for layer, share in shares.items():
            ax.plot(range(len(share)), share, "o-", label=f"layer {layer}")
        worst = max((s.max() * len(s) for s in shares.values()), default=float("nan"))
        ax.set(title=f"{name} (seed {runs[name][0].seed}): max/mean {worst:.2f}", xlabel="expert",
               ylabel="share of routed tokens")
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def smoe_k(plan, runs, path: Path) -> bool:
    names = [n for n in plan.plots.get("smoe", []) if any(r.k_sweep for r in runs.get(n, []))]
    if not names:
        return False
    fig, axes = _figure()
    ax = axes[0][0]
    col, key, ylabel = 2, "bleu", "test BLEU"  # (k, loss, bleu, chrf) rows
    if any(row[2] is None for n in names for r in runs[n] for row in r.k_sweep):
        col, key, ylabel = 1, "loss", "validation loss"  # no translation data: the loss
    for name in names:
        sweeps = [r.k_sweep for r in runs[name] if r.k_sweep]
        ks = [row[0] for row in sweeps[0]]
        for sweep in sweeps:
            ax.plot(ks, [row[col] for row in sweep], "o", color="grey", markersize=3)
        ax.plot(ks, [statistics.mean(s[i][col] for s in sweeps) for i in range(len(ks))], "o-",
                label=f"{name} (mean of {len(sweeps)} seeds; dots: seeds)")
    for name in plan.plots.get("smoe_reference", []):
        values = [r.evaluation.get(key) for r in runs.get(name, [])]
        if values and None not in values:
            ax.axhline(statistics.mean(values), linestyle="--", color="tab:red" if "dense" in name
                       else "tab:green", label=f"{name} (mean)")
    ax.set(xlabel="experts per token at inference (k)", ylabel=ylabel,
           title="SMoE-Dropout: one checkpoint at several k")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def adaptive(plan, runs, path: Path) -> bool:
    names = [n for n in plan.plots.get("adaptive", []) if runs.get(n)]
    base = plan.plots.get("adaptive_baseline")
    if not names:
        return False
    fig, axes = _figure(1, 2, size=(10.0, 4.0))
    for name in names:
        for r in runs[name]:
            rows = [row for row in r.train if row.get("two_expert_frac") is not None]
            axes[0][0].plot([row["step"] for row in rows], [row["two_expert_frac"] for row in rows],
                            label=f"{r.run_id}", linewidth=1)
    axes[0][0].set(xlabel="step", ylabel="fraction of tokens on two experts",
                   title="Adaptive gating: two-expert tokens")
    axes[0][0].legend(fontsize=7)
    labels, values = _per_run(plan, {n: runs[n] for n in names + ([base] if base in runs else [])},
                              lambda r: r.record["summary"].get("expert_tokens_per_token"))
    _dots(axes[0][1], labels, values, "routed (token, expert) pairs per token")
    axes[0][1].set_title("Expert-token count (top-2 = 2)")
    _save(fig, path)
    return True


def draw_all(plan, runs, out: Path) -> list[tuple[str, str]]:
    """Draw every plot that has data; return (title, file name) of those drawn."""
    drawn = []
    for title, name, draw in (
            ("Validation loss against training time", "valid_loss_time.png",
             lambda p: validation_curves(plan, runs, p, "time")),
            ("Validation loss against step", "valid_loss_step.png",
             lambda p: validation_curves(plan, runs, p, "step")),
            ("Test BLEU and chrF per run", "quality.png", lambda p: quality(plan, runs, p)),
            ("EP bytes per step and step time", "cost.png", lambda p: cost(plan, runs, p)),
            ("Expert load per layer", "expert_load.png", lambda p: expert_load(plan, runs, p)),
            ("SMoE-Dropout BLEU against inference k", "smoe_k.png", lambda p: smoe_k(plan, runs, p)),
            ("Adaptive gating: two-expert fraction and expert-token count", "adaptive.png",
             lambda p: adaptive(plan, runs, p))):
        if draw(out / name):
            drawn.append((title, name))
    return drawn
