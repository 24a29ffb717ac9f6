"""Shared helpers: run the real CLI in 1..4 processes (torchrun, gloo) and read its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = str(REPO / "examples" / "configs" / "debug.yaml")


def cli(command: str, *overrides: str, nproc: int = 1, timeout: int = 600,
        config: str = DEBUG_CONFIG) -> subprocess.CompletedProcess:
    """Run ``python -m megatron_moe COMMAND`` (under torchrun when nproc > 1)."""
    args = [command, "--config", config]
    for item in overrides:
        args += ["--set", item]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_moe", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "megatron_moe", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_python(code: str, timeout: int = 300) -> str:
    """Run ``code`` (dedented) in a fresh interpreter from the repo root; return its stdout.
    For checks of process-wide state (patches, process groups) that must not leak between tests."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"command failed with {proc.returncode}:\n{tail}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """A checkpoint trained 20 steps at (TP,PP,EP) = (1,1,1)."""
    root = tmp_path_factory.mktemp("ckpt_111")
    check(cli("train", "train.steps=20", f"checkpoint.save={root}"))
    return root
