"""RESULTS.md of a study, from its records only (``<records>/runs/<id>/``) and the plan.

Every number in the report is read from the records the runner wrote; runs without records are
listed as pending, so a study in progress gets a partial report.

Verdicts of the claims table: each claim compares a run with a baseline on one metric. The
difference of the seed means counts only beyond the *seed spread*: the larger of the two runs'
ranges over their seeds (one seed each: no spread is known, the verdict is inconclusive).

- ``better``: holds when the run is better by more than the spread, does not hold when it is
  worse by more, inconclusive otherwise;
- ``no_worse`` ("equal or better"): holds unless the run is worse by more than the spread;
- ``in_range``: the run's mean (e.g. a time ratio, a fraction) lies in [low, high].

The *paired* verdict applies the same rules to the per-seed differences (run seed i minus
baseline seed i): their mean counts only beyond their range. Runs of one seed share the data
order and the initial weights, and, when run back to back, the machine; pairing removes what
they share, which the seed ranges of the means verdict include. A pair whose two runs both carry
a machine probe that differ by more than 10% is left out (the wall-clock budget bought them
different compute); a pair where either run lacks a probe is counted and marked ``?``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from megatron_moe.study.plan import Claim, Plan

LOWER_IS_BETTER = {"valid_loss", "step_time_s", "ep_mbytes", "time_to_baseline_loss",
                   "expert_tokens_per_token"}
SPEED_TOLERANCE = 0.10  # machine probes further apart than this: not the same compute budget


def _sign(metric_name: str) -> float:
    """The sign that makes a difference of ``metric_name`` positive when the run is better."""
    return -1.0 if metric_name in LOWER_IS_BETTER else 1.0


@dataclass
class RunRecords:
    run_id: str
    name: str
    seed: int
    record: dict
    evaluation: dict
    curve: list
    k_sweep: list = field(default_factory=list)  # [(k, loss, bleu, chrf)]

    @property
    def valid(self) -> list[dict]:
        return [r for r in self.curve if "valid_loss" in r]

    @property
    def train(self) -> list[dict]:
        return [r for r in self.curve if "valid_loss" not in r]


def load_records(records: Path) -> dict[str, list[RunRecords]]:
    """Finished runs (those with ``eval.json``), grouped by the plan's run name."""
    by_name: dict[str, list[RunRecords]] = {}
    for d in sorted((records / "runs").glob("*")):  # none yet: an empty report
        if not (d / "eval.json").exists():
            continue
        record = json.loads((d / "run.json").read_text())
        curve = [json.loads(line) for line in (d / "curve.jsonl").read_text().splitlines()]
        sweep = []
        if (d / "k_sweep.csv").exists():
            for row in list(csv.reader((d / "k_sweep.csv").open()))[1:]:
                sweep.append((int(row[0]), *(float(v) if v else None for v in row[1:])))
        by_name.setdefault(record["run"], []).append(RunRecords(
            d.name, record["run"], record["seed"], record, json.loads((d / "eval.json").read_text()),
            curve, sweep))
    return by_name


def metric(run: RunRecords, name: str, baseline: list[RunRecords] | None = None):
    """One seed's value of a claims-table metric (None when the run did not record it)."""
    if name in ("bleu", "chrf"):
        return run.evaluation.get(name)
    if name == "valid_loss":
        return run.evaluation.get("loss")
    if name == "time_to_baseline_loss":
        return time_to_loss_ratio(run, baseline or [])
    if name == "slimming_gain":  # BLEU at the largest evaluated k minus BLEU at the smallest
        rows = [row for row in run.k_sweep if row[2] is not None]
        return rows[-1][2] - rows[0][2] if len(rows) > 1 else None
    return run.record["summary"].get(name)


def time_to_loss_ratio(run: RunRecords, baseline: list[RunRecords]) -> float:
    """Training time until the run's validation loss first reaches the baseline's final one
    (mean over its seeds), over the baseline's training time (inf if never reached)."""
    target = statistics.mean(b.evaluation["loss"] for b in baseline)
    base_s = statistics.mean(b.record["summary"]["train_s"] for b in baseline)
    for row in run.valid:
        if row["valid_loss"] <= target:
            return row["train_s"] / base_s
    return math.inf


def _stats(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (max(values) - min(values)) if len(values) > 1 else math.nan


def verdict(claim: Claim, run_values: list, base_values: list) -> tuple[str, float]:
    """(holds | does not hold | inconclusive, difference of means oriented so > 0 is better)."""
    mean, spread = _stats(run_values)
    if claim.kind == "in_range":
        if math.isnan(mean):
            return "inconclusive (no value)", math.nan
        return ("holds" if claim.low <= mean <= claim.high else "does not hold"), math.nan
    base_mean, base_spread = _stats(base_values)
    diff = _sign(claim.metric) * (mean - base_mean)
    spreads = [s for s in (spread, base_spread) if not math.isnan(s)]
    if not spreads or math.isnan(diff):
        return "inconclusive (one seed)", diff
    return _decide(claim.kind, diff, max(spreads)), diff


def _decide(kind: str, diff: float, noise: float) -> str:
    """A ``better`` or ``no_worse`` verdict on a difference (> 0 is better) and its noise."""
    if kind == "no_worse":
        return "holds" if diff >= -noise else "does not hold"
    if abs(diff) <= noise:
        return "inconclusive (within seed spread)"
    return "holds" if diff > 0 else "does not hold"


def machines_comparable(a: RunRecords, b: RunRecords,
                        tolerance: float = SPEED_TOLERANCE) -> bool | None:
    """Whether two runs' machine probes agree within ``tolerance`` (None: a probe is missing)."""
    pa, pb = probe(a), probe(b)
    if pa is None or pb is None:
        return None
    return abs(pa / pb - 1) <= tolerance


def paired_differences(claim: Claim, mine: list[RunRecords], base: list[RunRecords]
                       ) -> list[tuple[int, float, bool | None]]:
    """(seed, run minus baseline with > 0 better, machines comparable) for each seed both ran."""
    by_seed = {b.seed: b for b in base}
    pairs = []
    for r in sorted(mine, key=lambda r: r.seed):
        b = by_seed.get(r.seed)
        if b is None:
            continue
        if claim.metric == "time_to_baseline_loss":  # against that seed's baseline alone
            rv, bv = time_to_loss_ratio(r, [b]), 1.0
        else:
            rv, bv = metric(r, claim.metric, base), metric(b, claim.metric, base)
        if rv is not None and bv is not None:
            pairs.append((r.seed, _sign(claim.metric) * (rv - bv), machines_comparable(r, b)))
    return pairs


def paired_verdict(claim: Claim, pairs: list[tuple[int, float, bool | None]]) -> str:
    """The claim's verdict on the per-seed differences of the pairs not left out."""
    if claim.kind == "in_range":
        return "-"
    diffs = [d for _, d, same in pairs if same is not False]
    if len(diffs) < 2:
        return "inconclusive (fewer than two pairs)"
    if not all(math.isfinite(d) for d in diffs):
        return "inconclusive (a run never reached the target)"
    return _decide(claim.kind, statistics.mean(diffs), max(diffs) - min(diffs))


def _pairs_cell(pairs: list[tuple[int, float, bool | None]]) -> str:
    marks = {True: "", None: "?", False: " (left out: machines differ)"}
    return ", ".join(f"s{seed} {d:+.3f}{marks[same]}" for seed, d, same in pairs) or "-"


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "never"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def claims_table(plan: Plan, runs: dict) -> list[str]:
    lines = ["| claim | paper | ours: run (per seed) | baseline (per seed) | difference | verdict "
             "| paired by seed | paired verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in plan.claims:
        mine, base = runs.get(c.run, []), runs.get(c.baseline, [])
        if not mine or (not base and c.kind != "in_range"):
            lines.append(f"| {c.claim} | {c.paper} | pending | pending | - | pending | - | - |")
            continue
        rv = [metric(r, c.metric, base) for r in mine]
        bv = [metric(r, c.metric, base) for r in base] if c.metric != "time_to_baseline_loss" \
            else [1.0 for _ in base]
        result, diff = verdict(c, rv, bv)
        seeds = lambda vals: " / ".join(_fmt(v) for v in vals)  # noqa: E731
        target = f" (target {c.low:g}..{c.high:g})" if c.kind == "in_range" else ""
        pairs = paired_differences(c, mine, base) if c.kind != "in_range" else []
        lines.append(
            f"| {c.claim} | {c.paper} | {c.run} {c.metric}: {_fmt(_stats(rv)[0])} "
            f"({seeds(rv)}){target} | {c.baseline}: {_fmt(_stats(bv)[0])} ({seeds(bv)}) | "
            f"{_fmt(diff)} | **{result}** | {_pairs_cell(pairs)} | "
            f"**{paired_verdict(c, pairs)}** |")
    return lines


def probe(run: RunRecords) -> float | None:
    """The machine probe (best slice, it/s) of the run's last training start; None for runs
    recorded before the runner kept one, or kept only the earlier median probe."""
    seen = run.record.get("machine") or []
    if not seen or "probe_median_its_per_s" not in seen[-1]:
        return None
    return seen[-1]["probe_its_per_s"]


def _probe_cell(run: RunRecords, off: set) -> str:
    seen = run.record.get("machine") or []
    if probe(run) is not None:
        return f"{probe(run):.1f}{' (off)' if run.run_id in off else ''}"
    if seen and seen[-1].get("probe_its_per_s"):  # the earlier probe: a median, not compared
        return f"~{seen[-1]['probe_its_per_s']:.1f}"
    return "-"


def speed_outliers(runs: dict, tolerance: float = SPEED_TOLERANCE
                   ) -> tuple[float | None, set[str]]:
    """The median probe over the runs that have one, and the ids of those off it by more than
    ``tolerance`` (their wall-clock budget bought a different amount of compute)."""
    probes = {r.run_id: probe(r) for rs in runs.values() for r in rs if probe(r)}
    if not probes:
        return None, set()
    median = statistics.median(probes.values())
    return median, {k for k, v in probes.items() if abs(v / median - 1) > tolerance}


def runs_table(plan: Plan, runs: dict) -> list[str]:
    _, off = speed_outliers(runs)
    lines = ["| run | seed | steps / fitted | train min | step s | valid loss | test BLEU | "
             "test chrF | EP MB/step | two-expert | expert-tokens/token | machine probe it/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for planned in plan.runs:
        done = {r.seed: r for r in runs.get(planned.name, [])}
        for seed in planned.seeds:
            r = done.get(seed)
            if r is None:
                lines.append(f"| {planned.name} | {seed} | pending |" + " |" * 9)
                continue
            s = r.record["summary"]
            lines.append(
                f"| {planned.name} | {seed} | {s['steps']} / {s['total_steps']} | "
                f"{_fmt((s.get('train_s') or 0) / 60, 1)} | {_fmt(s['step_time_s'])} | "
                f"{_fmt(r.evaluation.get('loss'))} | {_fmt(r.evaluation.get('bleu'), 2)} | "
                f"{_fmt(r.evaluation.get('chrf'), 2)} | {_fmt(s.get('ep_mbytes'), 2)} | "
                f"{_fmt(s.get('two_expert_frac'))} | {_fmt(s.get('expert_tokens_per_token'))} | "
                f"{_probe_cell(r, off)} |")
    return lines


def _speed_note(runs: dict) -> list[str]:
    median, off = speed_outliers(runs)
    text = ("The budget is wall-clock, so a slower machine buys fewer steps. `machine probe` is "
            "`megatron_moe/study/machine.py`'s fixed forward-backward rate (best of ten 0.2 s "
            "slices), measured on the plan's threads just before the run trained (`-`: recorded "
            "before the runner kept it; `~`: the earlier probe, a median of five slices, not "
            "compared)")
    if median is None:
        return [text + "."]
    return [text + f"; median {median:.1f} it/s, `(off)`: more than 10% from it "
            f"({len(off)} run(s))."]


def smoe_table(plan: Plan, runs: dict) -> list[str]:
    lines = []
    for name in plan.plots.get("smoe", []):
        for r in runs.get(name, []):
            if r.k_sweep:
                if not lines:
                    lines = ["| run | k | valid loss | test BLEU | test chrF |", "|---|---|---|---|---|"]
                lines += [f"| {r.run_id} | {k} | {_fmt(loss)} | {_fmt(bleu, 2)} | {_fmt(chrf, 2)} |"
                          for k, loss, bleu, chrf in r.k_sweep]
    return lines


def comm_section(plan: Plan) -> list[str]:
    """Gating dropout at cluster scale: the comm model's calibration check and projection, read
    from the JSON files ``tools/comm_model.py`` wrote (the plan's ``comm_model`` section)."""
    files = {k: Path(v) for k, v in plan.comm_model.items()}
    if not files or not all(p.exists() for p in files.values()):
        return []
    lines = ["## Gating dropout at cluster scale (calibrated communication model)", "",
             "`tools/comm_model.py`: step time = compute + collectives x latency + bytes / "
             "bandwidth, calibrated on this machine's gloo runs (`tools/bench_gating_dropout.py`, "
             "EP=2), then projected to a Mixtral-8x7B-shaped model.", "",
             "| calibrated on | predicted | p | measured ratio | predicted ratio | error |",
             "|---|---|---|---|---|---|"]
    for key in ("calibration", "transfer"):
        if key not in files:
            continue
        data = json.loads(files[key].read_text())
        fitted = ", ".join(sorted({f"{Path(f['source']).stem} p={f['p']:g}" for f in data["fit"]}))
        for pr in data["predictions"]:
            lines.append(f"| {fitted} | {Path(pr['source']).stem} | {pr['p']:g} | "
                         f"{pr['measured_ratio']:.3f} | {pr['predicted_ratio']:.3f} | "
                         f"{100 * pr['ratio_error']:+.1f}% |")
    if "projection" in files:
        proj = json.loads(files["projection"].read_text())
        lines += ["", "Projected step-time ratio against p = 0 (assumptions and their sources "
                  "below):", "", *_projection_table(proj), "", "Assumptions:", ""]
        lines += [f"- `{k}` = {a['value']:g} {a.get('unit', '')}: {a['source']}"
                  for k, a in proj["assumptions"].items()]
    if "png" in files:
        rel = Path("..") / files["png"].relative_to("docs/results") \
            if files["png"].is_relative_to("docs/results") else files["png"]
        lines += ["", f"![comm model projection]({rel.as_posix()})"]
    return lines


def _projection_table(proj: dict) -> list[str]:
    """Rows of (cluster, bandwidth) columns by p, from the projection's rows."""
    columns = list(dict.fromkeys((r["cluster"], r["bandwidth"]) for r in proj["rows"]))
    ratio = {(r["cluster"], r["bandwidth"], r["p"]): r["ratio"] for r in proj["rows"]}
    ps = sorted({r["p"] for r in proj["rows"]})
    lines = ["| p | " + " | ".join(f"{c} ({b} bandwidth)" for c, b in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for p in ps:
        lines.append(f"| {p:g} | " + " | ".join(f"{ratio.get((c, b, p), float('nan')):.3f}"
                                                 for c, b in columns) + " |")
    return lines


def write_report(plan: Plan, records: Path) -> Path:
    """Write ``records/RESULTS.md`` and the PNG plots next to it; return the report's path."""
    from megatron_moe.staging import staged_file
    from megatron_moe.study import plots

    records.mkdir(parents=True, exist_ok=True)
    runs = load_records(records)
    images = plots.draw_all(plan, runs, records)
    planned = sum(len(r.seeds) for r in plan.runs)
    finished = sum(len(v) for v in runs.values())
    lines = [f"# Study `{plan.name}`: results", "",
             f"Generated by `python tools/study.py --plan {plan.path.as_posix()}` from the run "
             f"records in `runs/` (this file is rewritten by the runner; do not edit it). "
             f"{finished} of {planned} runs finished.", "",
             f"Every run: `{plan.config}` with the overrides below, {plan.nproc} rank(s) x "
             f"{plan.threads} thread(s), a training budget of {plan.budget_minutes:g} minutes "
             f"(the LR and k schedules fitted to it), evaluated on the test set with "
             f"{', '.join(plan.evaluate) or 'the config as it is'}.", "",
             f"Common overrides: `{' '.join(plan.common) or '-'}`", "",
             "## Claims", "", *claims_table(plan, runs), "",
             "Verdicts: the difference of seed means (positive = the run is better) counts only "
             "beyond the larger seed range of the two runs; `no_worse` claims hold unless the run "
             "is worse beyond it; one seed gives no spread (inconclusive). Paired: the same rules "
             "on the per-seed differences (run seed i minus baseline seed i), their mean against "
             "their range; `?`: a run of the pair has no machine probe, so it is not known that "
             "both ran at the same speed; pairs whose probes differ by more than 10% are left "
             "out.", "",
             "## Runs", "", *runs_table(plan, runs), "", *_speed_note(runs), ""]
    sweep = smoe_table(plan, runs)
    if sweep:
        lines += ["## SMoE-Dropout at inference k", "", *sweep, ""]
    comm = comm_section(plan)
    if comm:
        lines += [*comm, ""]
    if images:
        lines += ["## Plots", ""]
        for title, name in images:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += ["## Commands", ""]
    for planned in plan.runs:
        for r in sorted(runs.get(planned.name, []), key=lambda r: r.seed):
            lines += [f"`{r.run_id}`:", "", "```", *r.record["commands"], "```", ""]
    path = records / "RESULTS.md"
    with staged_file(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path
