"""A study plan: named runs (config + overrides + seeds) trained at one equal wall-clock budget.

    name: l10n10                      # docs/results/<name>/ gets the records and the report
    config: examples/configs/l10n10_cpu.yaml
    nproc: 2                          # ranks of every run (torchrun when > 1)
    threads: 1                        # OMP threads per rank
    budget_minutes: 15                # train.time_budget_minutes of every run
    seeds: [1, 2]                     # default seeds of a run
    data: {dir: runs/l10n10, preprocess: [--train, ..., --vocab-size, "4000"]}
    common: [parallel.ep=2, ...]      # overrides of every run
    evaluate: [data.beam_size=1]      # overrides of the final evaluation only
    runs:
      - {name: top2, label: "top-2"}
      - {name: smoe, overrides: [moe.router=smoe_dropout], eval_k: [1, 2, 4, 8]}
      - {name: adaptive_t02, overrides: [...], seeds: [1]}
    claims:                           # rows of the claims table (see report.py)
      - {claim: "...", run: gate_drop, baseline: top2, metric: bleu, kind: no_worse}
    plots: {expert_load: [top2, adaptive], smoe: [smoe], smoe_reference: [dense]}

Errors name the plan file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

METRICS = ("bleu", "chrf", "valid_loss", "step_time_s", "ep_mbytes", "two_expert_frac",
           "expert_tokens_per_token", "time_to_baseline_loss", "slimming_gain")
KINDS = ("better", "no_worse", "in_range")


class PlanError(ValueError):
    """A user error in a study plan; the message names the file and the field."""


@dataclass(frozen=True)
class PlannedRun:
    name: str
    label: str
    overrides: tuple
    seeds: tuple
    eval_k: tuple = ()  # SMoE-Dropout: evaluate at these inference k as well

    def run_id(self, seed: int) -> str:
        return f"{self.name}-s{seed}"


@dataclass(frozen=True)
class Claim:
    claim: str
    run: str
    baseline: str
    metric: str
    kind: str  # better: beyond the seed spread | no_worse: not worse beyond it | in_range
    paper: str = ""  # what the paper reports
    low: Optional[float] = None  # in_range: the run's mean must lie in [low, high]
    high: Optional[float] = None


@dataclass(frozen=True)
class Plan:
    path: Path
    name: str
    config: str
    nproc: int
    threads: int
    budget_minutes: float
    common: tuple
    evaluate: tuple
    runs: tuple
    claims: tuple
    data_dir: Optional[str] = None
    preprocess: tuple = ()
    comm_model: dict = field(default_factory=dict)
    plots: dict = field(default_factory=dict)  # which runs each plot compares (report.py)

    def run(self, name: str) -> PlannedRun:
        return next(r for r in self.runs if r.name == name)


def _get(d: dict, key: str, types, where: str, default=None, required=False):
    if key not in d:
        if required:
            raise PlanError(f"{where}: missing field {key}")
        return default
    value = d[key]
    if not isinstance(value, types):
        raise PlanError(f"{where}.{key}: {value!r} has the wrong type")
    return value


def _strings(values, where: str) -> tuple:
    if not isinstance(values, list) or not all(isinstance(v, str) and "=" in v for v in values):
        raise PlanError(f"{where}: expected a list of section.key=value strings, got {values!r}")
    return tuple(values)


def load_plan(path: str) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"plan {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PlanError(f"plan {path}: top level must be a mapping")
    w = str(path)
    seeds = _get(data, "seeds", list, w, [1])
    runs = []
    for i, r in enumerate(_get(data, "runs", list, w, required=True)):
        rw = f"{w}: runs[{i}]"
        if not isinstance(r, dict):
            raise PlanError(f"{rw}: expected a mapping")
        name = _get(r, "name", str, rw, required=True)
        if not name.replace("_", "").replace("-", "").isalnum() or name in [x.name for x in runs]:
            raise PlanError(f"{rw}.name: {name!r} must be unique and use letters, digits, - or _")
        runs.append(PlannedRun(
            name=name, label=_get(r, "label", str, rw, name),
            overrides=_strings(_get(r, "overrides", list, rw, []), f"{rw}.overrides"),
            seeds=tuple(_get(r, "seeds", list, rw, seeds)),
            eval_k=tuple(_get(r, "eval_k", list, rw, []))))
    names = {r.name for r in runs}
    claims = []
    for i, c in enumerate(_get(data, "claims", list, w, [])):
        cw = f"{w}: claims[{i}]"
        if not isinstance(c, dict):
            raise PlanError(f"{cw}: expected a mapping")
        claim = Claim(**{k: _get(c, k, str, cw, required=k != "paper") or ""
                         for k in ("claim", "run", "baseline", "metric", "kind", "paper")},
                      low=_get(c, "low", (int, float), cw), high=_get(c, "high", (int, float), cw))
        if claim.kind == "in_range" and (claim.low is None or claim.high is None):
            raise PlanError(f"{cw}: kind in_range needs low and high")
        for key in ("run", "baseline"):
            if getattr(claim, key) not in names:
                raise PlanError(f"{cw}.{key}: {getattr(claim, key)!r} is not a run of the plan")
        if claim.metric not in METRICS:
            raise PlanError(f"{cw}.metric: {claim.metric!r} must be one of: {', '.join(METRICS)}")
        if claim.kind not in KINDS:
            raise PlanError(f"{cw}.kind: {claim.kind!r} must be one of: {', '.join(KINDS)}")
        claims.append(claim)
    data_section = _get(data, "data", dict, w, {})
    return Plan(
        path=p, name=_get(data, "name", str, w, required=True),
        config=_get(data, "config", str, w, required=True),
        nproc=_get(data, "nproc", int, w, 1), threads=_get(data, "threads", int, w, 1),
        budget_minutes=float(_get(data, "budget_minutes", (int, float), w, required=True)),
        common=_strings(_get(data, "common", list, w, []), f"{w}: common"),
        evaluate=_strings(_get(data, "evaluate", list, w, []), f"{w}: evaluate"),
        runs=tuple(runs), claims=tuple(claims),
        data_dir=_get(data_section, "dir", str, f"{w}: data"),
        preprocess=tuple(str(a) for a in _get(data_section, "preprocess", list, f"{w}: data", [])),
        comm_model=_get(data, "comm_model", dict, w, {}),
        plots=_plots(_get(data, "plots", dict, w, {}), names, w))


PLOTS = ("expert_load", "adaptive", "adaptive_baseline", "smoe", "smoe_reference")


def _plots(plots: dict, names: set, where: str) -> dict:
    for key, value in plots.items():
        if key not in PLOTS:
            raise PlanError(f"{where}: plots.{key} is not a plot (plots: {', '.join(PLOTS)})")
        for name in value if isinstance(value, list) else [value]:
            if name not in names:
                raise PlanError(f"{where}: plots.{key}: {name!r} is not a run of the plan")
    return plots
