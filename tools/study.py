"""Run a study plan (resumable) and write its report with plots.

    python tools/study.py --plan examples/study/l10n10.yaml             # run what is left, report
    python tools/study.py --plan examples/study/l10n10.yaml --only top2 smoe
    python tools/study.py --plan examples/study/l10n10.yaml --report-only

Trains every (run, seed) of the plan at the plan's wall-clock budget (every run's first seed, then
the second, ...), evaluates it, and keeps its
small records in ``docs/results/<plan name>/runs/`` (checkpoints and full logs stay in
``--work``, default ``runs/study/<plan name>``). A killed study resumes the unfinished run from its
checkpoint and skips finished ones; on a finished study the runner only regenerates
``docs/results/<plan name>/RESULTS.md`` and its plots. See ``megatron_moe/study/``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.cli import exit_now  # noqa: E402
from megatron_moe.config import ConfigError, load_config  # noqa: E402
from megatron_moe.study.plan import PlanError, load_plan  # noqa: E402
from megatron_moe.study.report import write_report  # noqa: E402
from megatron_moe.study.runner import StudyRunner, prepare_data, run_overrides  # noqa: E402
from megatron_moe.validation import validate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _check_configs(plan) -> None:
    """Every run's config, validated for the plan's ranks before anything starts."""
    for run in plan.runs:
        for seed in run.seeds:
            try:
                validate(load_config(plan.config, run_overrides(plan, run, seed)), plan.nproc)
            except ConfigError as e:
                raise PlanError(f"{plan.path}: run {run.name}: {e}") from None


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: the running run's processes are ended


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="study plan YAML (see megatron_moe/study/plan.py)")
    ap.add_argument("--work", help="checkpoints and logs (default: runs/study/<plan name>)")
    ap.add_argument("--records", help="records and report (default: docs/results/<plan name>)")
    ap.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs of the plan")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the report")
    args = ap.parse_args(argv)
    try:
        plan = load_plan(args.plan)
        unknown = sorted(set(args.only or []) - {r.name for r in plan.runs})
        if unknown:
            raise PlanError(f"--only {unknown[0]}: not a run of {args.plan}")
        _check_configs(plan)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = Path(args.records or REPO / "docs" / "results" / plan.name)
    work = Path(args.work or REPO / "runs" / "study" / plan.name)
    signal.signal(signal.SIGTERM, _stop)
    if not args.report_only:
        prepare_data(plan)
        runner = StudyRunner(plan, work, records)
        for seed in sorted({s for run in plan.runs for s in run.seeds}):  # every run's first
            for run in plan.runs:                                         # seed comes first
                if seed in run.seeds and (not args.only or run.name in args.only):
                    runner.one(run, seed)
                    write_report(plan, records)  # after every run: a partial report
    path = write_report(plan, records)
    print(f"[study] report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    exit_now(main())
