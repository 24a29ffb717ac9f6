"""Tier: multi-rank (4 gloo processes under torchrun, CPU).

Resharding: a run saved under (TP, PP, EP) = (1, 2, 2) resumes under (2, 1, 2) and (1, 1, 1) with
its optimizer state (megatron's distributed optimizer, fully reshardable format) and continues
the original loss curve for 5 steps (so the two layouts follow the same curve); without the
optimizer state it does not. That save is a background one (``checkpoint.async_save``), written
while the original run goes on. Crash: a 4-rank (TP2, EP2) run
killed with SIGKILL resumes and matches the uninterrupted run; a damaged checkpoint fails on every
rank with one clear error instead of a hang."""

import os
import shutil
import signal

import pytest

from megatron_moe.checkpointing import iteration_dir
from tests.conftest import (check, cli, cli_args, kill_session, launch, megatron_moe_cmd,
                            read_metrics)

COMMON = ["train.steps=8", "logging.interval=1", "parallel.distributed_optimizer=true"]


def _losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r and "step" in r}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(1, 2, 2) on 4 ranks (DP 2), saved in the background at step 3, continued to step 8."""
    root = tmp_path_factory.mktemp("reshard")
    check(cli("train", *COMMON, "parallel.pp=2", "parallel.ep=2", "checkpoint.interval=3",
              "checkpoint.async_save=true", f"checkpoint.save={root / 'ckpt'}",
              f"logging.metrics_file={root / 'm.jsonl'}", nproc=4))
    return iteration_dir(root / "ckpt", 3), _losses(root / "m.jsonl")


@pytest.mark.parametrize("tp, pp, ep, nproc", [(2, 1, 2, 4), (1, 1, 1, 1)])
def test_resume_under_another_layout_continues_the_curve(original, tmp_path, tp, pp, ep, nproc):
    ckpt, want = original
    metrics = tmp_path / "m.jsonl"
    out = check(cli("train", *COMMON, f"parallel.tp={tp}", f"parallel.pp={pp}",
                    f"parallel.ep={ep}", f"checkpoint.load={ckpt}",
                    f"logging.metrics_file={metrics}", nproc=nproc))
    assert "at step 3 (iter_0000003, 24 samples consumed)" in out.stdout
    got = _losses(metrics)
    assert sorted(got) == [4, 5, 6, 7, 8]
    for step in got:  # 5..8 depend on the optimizer state restored at 3
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])


def test_without_optimizer_state_the_curve_differs(original, tmp_path):
    """The control for the test above: the steps after 4 are sensitive to the optimizer state."""
    ckpt, want = original
    metrics = tmp_path / "m.jsonl"
    check(cli("train", *COMMON, f"checkpoint.load={ckpt}", "checkpoint.load_optimizer=false",
              f"logging.metrics_file={metrics}"))
    got = _losses(metrics)
    assert abs(got[4] - want[4]) < 1e-5 and abs(got[8] - want[8]) > 1e-3


def test_kill_9_on_four_ranks_then_resume_matches(tmp_path):
    """The killed run's own steps 4-6 (after its step-3 save) are the reference for the resumed
    run's (a separate uninterrupted run would cost another four-rank start)."""
    common = ["train.steps=8", "logging.interval=1", "parallel.tp=2", "parallel.ep=2",
              "checkpoint.interval=3"]
    ckpt, killed = tmp_path / "ckpt", tmp_path / "killed.jsonl"
    proc = launch(megatron_moe_cmd(*cli_args("train", *common, f"checkpoint.save={ckpt}",
                                             f"logging.metrics_file={killed}"), nproc=4),
                  background=True)
    for line in proc.stdout:
        if line.startswith("step      7/"):  # after the step-6 save began, before step 8
            os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, at once
            break
    proc.wait(timeout=120)
    kill_session(proc)
    assert (ckpt / "latest").read_text().strip() in ("3", "6")
    if (ckpt / "latest").read_text().strip() == "6":  # the step-6 save was published: undo it
        shutil.rmtree(iteration_dir(ckpt, 6))
        (ckpt / "latest").write_text("3\n")
    resumed = tmp_path / "resumed.jsonl"
    check(cli("train", *common, f"checkpoint.load={ckpt}", f"logging.metrics_file={resumed}",
              nproc=4))
    want, got = _losses(killed), _losses(resumed)
    assert sorted(got) == list(range(4, 9)) and {4, 5, 6, 7} <= set(want)
    assert max(abs(got[s] - want[s]) for s in (4, 5, 6, 7)) < 1e-6


def test_damaged_checkpoint_fails_on_every_rank_without_hanging(original, tmp_path):
    ckpt, _ = original
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    victim = broken / "__3_0.distcp"  # same size: only the one rank hashing it can tell
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = cli("evaluate", f"checkpoint.load={broken}", "parallel.tp=2", "parallel.ep=2",
               nproc=4, timeout=300)
    assert proc.returncode != 0
    assert f"error: {victim}: corrupt: its SHA-256 differs from manifest.json" in proc.stderr
