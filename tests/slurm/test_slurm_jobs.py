"""Tier: Slurm (a real one-node Slurm started by the test; 2 CPU tasks, gloo).

The sbatch scripts in examples/slurm/ run unchanged with DEVICE=cpu: the training job completes with
loss lines in its log; a job requeued mid-run (``scontrol requeue``) resumes from its checkpoint; the
time-limit signal makes the ranks save, the script requeue itself and the next run resume at the
saved step; the preprocessing and conversion jobs complete with their outputs.
Skipped, with the reason shown, when Debian's slurm-wlm and munge binaries are not installed
(``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.cluster import SlurmCluster, missing_binaries

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(missing_binaries()), reason="Slurm tier needs slurm-wlm and munge "
                       f"(missing: {', '.join(missing_binaries())}); .ci/run installs them"),
]
STEPS_LINE = re.compile(r"^step\s+(\d+)/(\d+) .*\| loss (\d+\.\d+)", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = Path(f"/tmp/mm-slurm-{os.getpid()}")  # short: munge's socket path has a length limit
    c = SlurmCluster(root)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _env(**settings) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHON=sys.executable, DEVICE="cpu", PYTHONWARNINGS="ignore", **settings)
    return env


def _submit(cluster, script: str, log: Path, *options: str, **settings) -> int:
    return cluster.sbatch(str(REPO / "examples" / "slurm" / script), f"--output={log}", *options,
                          env=_env(**settings), cwd=str(REPO))


def _wait_for(predicate, timeout: float, what: str, cluster=None, job=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    state = cluster.state(job) if cluster and job else "?"
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what} (job state {state})\n{tail}")


def _saved_step(ckpt: Path) -> int:
    try:
        return int((ckpt / "latest").read_text())
    except (OSError, ValueError):
        return 0


def _train_settings(run_dir: Path, steps: int, extra: str = "") -> dict:
    return dict(RUN_DIR=str(run_dir), EXTRA=f"--set parallel.ep=2 --set train.steps={steps} "
                                            f"--set logging.interval=1 {extra}".strip())


def test_training_job_completes_and_requeued_job_resumes(cluster, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = _submit(cluster, "train.sbatch", log, "--ntasks=2",
                  **_train_settings(run_dir, 15), SAVE_INTERVAL="5")
    ckpt = run_dir / "checkpoints"
    _wait_for(lambda: _saved_step(ckpt) >= 5, 300, "the first checkpoint", cluster, job, log)
    assert cluster.state(job) == "RUNNING"
    cluster.run("scontrol", "requeue", str(job))  # as preemption or a node failure would
    state = cluster.wait(job, 600)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert cluster.restarts(job) == 1
    assert text.count("starting fresh") == 1 and text.count("resuming from") == 1
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert resumed >= 5
    steps = [int(m.group(1)) for m in STEPS_LINE.finditer(text)]
    assert steps[0] == 1 and steps[-1] == 15  # loss lines from both runs
    after = steps[steps.index(resumed + 1, 1):] if resumed + 1 in steps[1:] else []
    assert after and after[0] == resumed + 1  # the second run continued, not restarted at step 1
    assert steps.count(1) == 1
    assert _saved_step(ckpt) == 15


def test_time_limit_signal_saves_and_requeues(cluster, tmp_path):
    """What --signal=B:USR1@120 does before the time limit, sent by hand with scancel."""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = _submit(cluster, "train.sbatch", log, "--ntasks=2", **_train_settings(run_dir, 40),
                  SAVE_INTERVAL="1000")
    _wait_for(lambda: log.exists() and re.search(r"^step\s+3/", log.read_text(), re.M), 300,
              "training to start", cluster, job, log)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    state = cluster.wait(job, 600)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    stopped = int(re.search(r"stop signal \(SIGUSR1\) after step (\d+): checkpoint saved",
                            text).group(1))
    assert 3 <= stopped < 40
    assert f"requeueing job {job}" in text
    assert f"at step {stopped}" in text and cluster.restarts(job) == 1
    assert _saved_step(run_dir / "checkpoints") == 40


def test_preprocess_job(cluster, tmp_path):
    """On slices of the bundled sample given as TRAIN/VALID/TEST (the whole sample's
    SentencePiece training would take most of this tier's time)."""
    import lzma

    from megatron_moe.data.corpus import default_path

    log, out = tmp_path / "pre.log", tmp_path / "data"
    splits = {}
    for split, n in (("train", 1500), ("valid", 100), ("test", 100)):
        with lzma.open(default_path(split), "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(n)]
        splits[split.upper()] = str(tmp_path / f"{split}.tsv")
        Path(splits[split.upper()]).write_text("".join(lines), encoding="utf-8")
    job = _submit(cluster, "preprocess.sbatch", log, "--cpus-per-task=2", OUTPUT=str(out),
                  VOCAB_SIZE="500", **splits)
    state = cluster.wait(job, 600)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "wrote" in text and (out / "meta.json").is_file() and (out / "train.idx").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 500 and (out / "test.idx").is_file(), meta


def test_convert_job(cluster, tmp_path):
    from tests.conftest import check, cli

    ckpt, log, out = tmp_path / "ckpt", tmp_path / "convert.log", tmp_path / "hf"
    check(cli("train", "train.steps=2", f"checkpoint.save={ckpt}"))
    job = _submit(cluster, "convert.sbatch", log, "--cpus-per-task=1", TO="hf", LOAD=str(ckpt),
                  OUTPUT=str(out))
    state = cluster.wait(job, 600)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "max_logit_diff" in text and (out / "config.json").is_file()
    assert (out / "model.safetensors").is_file()
