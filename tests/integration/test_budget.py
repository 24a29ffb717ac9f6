"""Tier: integration (the real CLI, one process per run). A time budget sizes the run: after
timing its first steps the run fixes its total steps, and the learning-rate and SMoE-Dropout k
schedules of every later step are those of a run configured with that total (ending at min_lr and
k_max); the number survives kill -9 and resume (not timed again, same schedules), and the budget
counts the training time of both processes; validation rows carry the training time."""

import math
import re
import signal

import pytest

from megatron_moe.config import load_config
from megatron_moe.routing.schedules import scheduled_topk
from tests.conftest import (DEBUG_CONFIG, check, cli, cli_args, kill_session, launch,
                            megatron_moe_cmd, read_metrics)

pytestmark = pytest.mark.integration

COMMON = ["train.steps=100000", "train.time_budget_minutes=0.15", "train.budget_timing_steps=5",
          "train.warmup_steps=5", "moe.router=smoe_dropout", "moe.smoe_dropout.k_min=1",
          "logging.interval=5", "checkpoint.interval=10", "train.eval_interval=40"]
FITTED = re.compile(r"steps took .*the schedules now end at step (\d+)")
REFITTED = re.compile(r"re-timed at step (\d+) .*the schedules now end at step (\d+)")


def _expected_lr(step: int, total: int, lr=3e-3, min_lr=3e-4, warmup=5) -> float:
    """megatron's warm-up + cosine decay to ``total`` steps, after ``step`` scheduler steps."""
    if step <= warmup:
        return lr * step / warmup
    ratio = min((step - warmup) / (total - warmup), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def _check_schedules(rows, total, first_step, refit=None):
    """Every row from ``first_step``: LR and k of the schedules at ``total``, or after the re-fit
    ``(step, new total)`` at the new total."""
    moe = load_config(DEBUG_CONFIG, COMMON).moe
    for row in rows:
        at = refit[1] if refit and row["step"] > refit[0] else total
        if refit and row["step"] == refit[0]:  # ran on the old total, logs the new one
            assert row["total_steps"] == refit[1] and row["k"] == scheduled_topk(
                moe, total, row["step"] - 1), row
        elif row["step"] >= first_step:
            assert row["total_steps"] == at, row
            assert row["lr"] == pytest.approx(_expected_lr(row["step"], at), rel=1e-6), row
            assert row["k"] == scheduled_topk(moe, at, row["step"] - 1), row


def test_budget_fits_the_schedules_and_survives_kill_and_resume(tmp_path):
    ckpt, first, second = tmp_path / "ckpt", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    proc = launch(megatron_moe_cmd(*cli_args("train", *COMMON, f"checkpoint.save={ckpt}",
                                             f"logging.metrics_file={first}")), background=True)
    total, killed_after = None, None
    for line in proc.stdout:
        if total is None and (match := FITTED.search(line)):
            total = int(match.group(1))
        elif total is not None and "saved checkpoint" in line:
            killed_after = int(re.search(r"iter_(\d+)", line).group(1))
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=120) == -signal.SIGKILL
    kill_session(proc)
    assert total is not None and killed_after is not None
    assert 5 + 5 < total < 100000  # fitted after 5 warm-up + 5 timed steps, far below the cap
    out = check(cli("train", *COMMON, f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}",
                    f"logging.metrics_file={second}")).stdout
    assert not FITTED.search(out)  # the resumed run keeps the saved total
    assert f"/{total} [" in out
    # SMoE-Dropout's cost grows with k: the run is re-timed once, a third of the way to its end,
    # here by the resumed process (killed at its first save, before that point)
    refit = tuple(int(g) for g in REFITTED.search(out).groups())
    assert killed_after < refit[0] < total
    before, after = read_metrics(first), read_metrics(second)
    _check_schedules(before, total, first_step=11)
    _check_schedules(after, total, first_step=0, refit=refit)
    assert after[0]["step"] == killed_after + 1
    assert after[0]["train_s"] > before[-1]["train_s"] * 0.5  # counts the first process's time
    last = after[-1]
    assert last["step"] <= refit[1]
    if last["step"] == refit[1]:  # the run ended with its schedules (not cut by the budget)
        assert last["lr"] == pytest.approx(3e-4) and last["k"] == 4
    validation = read_metrics(second, validation=True)
    assert validation[-1]["step"] == last["step"] and validation[-1]["train_s"] > 0


def test_budget_stop_keeps_train_steps_schedule(tmp_path):
    metrics = tmp_path / "m.jsonl"
    out = check(cli("train", "train.steps=100000", "train.time_budget_minutes=0.05",
                    "train.budget_schedule=stop", f"logging.metrics_file={metrics}")).stdout
    assert "reached after step" in out and not FITTED.search(out)
    rows = read_metrics(metrics)
    assert rows[-1]["lr"] == pytest.approx(_expected_lr(rows[-1]["step"], 100000), rel=1e-6)
