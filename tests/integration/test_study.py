"""Tier: integration (the study runner as a user starts it, which starts the CLI). A two-run,
two-seed plan on the debug config runs end to end (train at a budget, evaluate, SMoE k sweep,
records, RESULTS.md with its tables and the PNG plots): the runner is killed with SIGKILL in the
first run and started again, resumes that run from its checkpoint (its fitted schedule kept) and
finishes the plan; a third call only regenerates the report. Processes of a run that a killed
runner left behind are ended before the run resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megatron_moe.checkpointing.store import tracked_step
from megatron_moe.study.runner import STUDY_RUN_TAG, _end_tagged, _tagged_pids
from tests.conftest import DEBUG_CONFIG, launch

pytestmark = pytest.mark.integration

COMMON = ["train.steps=100000", "train.eval_interval=10", "logging.interval=1",
          "train.budget_timing_steps=5", "train.warmup_steps=3"]


def _plan(tmp_path, runs, budget, extra=()) -> str:
    plan = {"name": "tiny", "config": DEBUG_CONFIG, "nproc": 1, "threads": 1,
            "budget_minutes": budget, "seeds": [1, 2], "common": COMMON + list(extra),
            "evaluate": ["train.eval_iters=1"], "runs": runs,
            "claims": [{"claim": "SMoE-Dropout no worse than top-2", "run": "smoe",
                        "baseline": "top2", "metric": "valid_loss", "kind": "no_worse",
                        "paper": "beats dense"}],
            "plots": {"expert_load": ["top2", "smoe"], "smoe": ["smoe"],
                      "smoe_reference": ["top2"]}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def _study(plan, tmp_path, *args, background=False):
    cmd = [sys.executable, "tools/study.py", "--plan", plan, "--work", str(tmp_path / "work"),
           "--records", str(tmp_path / "records"), *args]
    return launch(cmd, background=background, timeout=600)


RUNS = [{"name": "top2", "label": "top-2"},
        {"name": "smoe", "overrides": ["moe.router=smoe_dropout"], "eval_k": [1, 2]}]


def _kill_runner_mid_run(plan, tmp_path) -> None:
    """Start the runner; SIGKILL it (its training is left running) once the first run has a
    checkpoint of its fitted schedule (step 10: the budget is timed over steps 1-5). Keyed to
    top2-s1's own step lines: on a slow machine its budget may end before a given step."""
    ckpt = tmp_path / "work" / "top2-s1" / "ckpt"
    proc = _study(plan, tmp_path, background=True)
    for line in proc.stdout:
        step = re.search(r"top2-s1: step\s+(\d+)/", line)
        if step and int(step.group(1)) > 10 and (tracked_step(ckpt) or 0) >= 10:
            os.kill(proc.pid, signal.SIGKILL)  # the runner only
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stdout.close()


def test_two_run_two_seed_plan_killed_resumed_reported_then_report_only(tmp_path):
    plan = _plan(tmp_path, RUNS, budget=0.1, extra=["checkpoint.interval=5"])
    _kill_runner_mid_run(plan, tmp_path)
    proc = _study(plan, tmp_path)  # resumes top2-s1, then runs the other three
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    assert "top2-s1: resuming from" in out and out.count("resuming from") == 1
    log = (tmp_path / "work" / "top2-s1" / "train.log").read_text()
    assert "resumed from" in log and log.count("steps took") == 1  # timed once, re-fit aside
    records = tmp_path / "records"
    report = (records / "RESULTS.md").read_text()
    for rid in ("top2-s1", "top2-s2", "smoe-s1", "smoe-s2"):
        run = json.loads((records / "runs" / rid / "run.json").read_text())
        steps = run["summary"]["steps"]
        assert steps > 10 and run["summary"]["train_s"] > 0
        assert any("megatron_moe train" in c for c in run["commands"])
        starts = run["machine"]  # one record per start of training: the killed one resumed
        assert len(starts) == (2 if rid == "top2-s1" else 1)
        assert all(m["probe_its_per_s"] > 0 and m["cores"] >= 1 for m in starts)
        name, seed = rid.split("-s")
        assert f"| {name} | {seed} | {steps} / " in report  # runs table row
        assert f"| {starts[-1]['probe_its_per_s']:.1f}" in report
    assert "4 of 4 runs finished" in report
    assert "| SMoE-Dropout no worse than top-2 | beats dense | smoe valid_loss:" in report
    assert "| smoe-s1 | 1 |" in report and "| smoe-s2 | 2 |" in report  # k sweep rows
    assert "smoe_k_sweep.py" in report  # the sweep's command is listed
    for png in ("valid_loss_time", "valid_loss_step", "cost", "expert_load", "smoe_k"):
        assert (records / f"{png}.png").stat().st_size > 5000, png
        assert f"]({png}.png)" in report
    # a finished study: the runner only regenerates the report
    before = {p: p.stat().st_mtime_ns for p in (records / "runs").rglob("*")}
    (records / "RESULTS.md").unlink()
    again = _study(plan, tmp_path)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4
    assert "megatron_moe train" not in again.stdout and (records / "RESULTS.md").exists()
    assert {p: p.stat().st_mtime_ns for p in (records / "runs").rglob("*")} == before
    assert not _tagged_pids(str((tmp_path / "work" / "top2-s1").resolve()))


def test_processes_a_killed_runner_left_behind_are_ended(tmp_path):
    """An orphan may outlive its runner until its next write to the closed pipe (or forever
    when it writes nothing, e.g. in a long checkpoint save or evaluation)."""
    tag = str(tmp_path)
    env = dict(os.environ, **{STUDY_RUN_TAG: tag})
    orphans = [subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
               for _ in range(2)]
    for _ in range(100):  # until both have started
        if len(_tagged_pids(tag)) == 2:
            break
        time.sleep(0.05)
    assert len(_tagged_pids(tag)) == 2
    _end_tagged(tag)
    assert [p.wait(timeout=10) for p in orphans] == [-signal.SIGKILL] * 2
    assert not _tagged_pids(tag)
