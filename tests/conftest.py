"""Shared helpers: run the real CLI in 1..4 processes (torchrun, gloo) and read its outputs.

Every process a test starts goes through :func:`launch`: the command runs from the repository root
in :func:`command_env` (one thread per process, no warnings, no inherited torchrun variables).
:func:`megatron_moe_cmd` builds ``python -m megatron_moe ...`` (under torchrun for several ranks, or
a ``python -c`` hook script that ends in the CLI); :func:`cli` and :func:`run_python` are the
two common cases.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = str(REPO / "examples" / "configs" / "debug.yaml")


def command_env() -> dict[str, str]:
    """The environment of every process a test starts: one OpenMP thread per process (N ranks
    share the machine's cores), warnings off, and no RANK / WORLD_SIZE inherited from a launcher
    around pytest."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def cli_args(command: str, *overrides: str, config: str = DEBUG_CONFIG) -> list[str]:
    """``COMMAND --config CONFIG --set A --set B ...``: the CLI's arguments for ``overrides``."""
    args = [command, "--config", config]
    for item in overrides:
        args += ["--set", item]
    return args


def megatron_moe_cmd(*args: str, nproc: int = 1, hook: str | None = None,
                     hook_args: tuple[str, ...] = ()) -> list[str]:
    """The command line of ``python -m megatron_moe ARGS``: under torchrun (``--standalone``, gloo)
    when ``nproc`` > 1; with ``hook``, ``python -c HOOK HOOK_ARGS... ARGS`` instead (a script that
    patches something, then calls ``megatron_moe.cli.main`` with the arguments after its own)."""
    if hook is not None:
        assert nproc == 1, "hook scripts run in one process"
        return [sys.executable, "-c", hook, *hook_args, *args]
    if nproc == 1:
        return [sys.executable, "-m", "megatron_moe", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "megatron_moe", *args]


def launch(cmd: list[str], *, background: bool = False, input: str | None = None,
           timeout: int = 600):
    """Run ``cmd`` from the repository root in :func:`command_env`.

    Returns the finished process (stdout and stderr captured as text), or with ``background`` the
    running ``Popen`` at once: in a session of its own (so :func:`kill_session` ends whatever it
    started), stderr merged into a stdout pipe that the test reads line by line."""
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=command_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=command_env(), input=input, capture_output=True,
                          text=True, timeout=timeout)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in the session of ``proc`` (started by :func:`launch` with
    ``background``) and close its pipe. A SIGKILLed parent leaves its children behind (e.g.
    megatron's checkpoint writer keeps a multiprocessing manager process holding the pipe)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.stdout.close()


def cli(command: str, *overrides: str, nproc: int = 1, timeout: int = 600,
        config: str = DEBUG_CONFIG, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m megatron_moe COMMAND`` (under torchrun when nproc > 1)."""
    return launch(megatron_moe_cmd(*cli_args(command, *overrides, config=config), nproc=nproc),
                  input=input, timeout=timeout)


def run_python(code: str, timeout: int = 300) -> str:
    """Run ``code`` (dedented) in a fresh interpreter from the repo root; return its stdout.
    For checks of process-wide state (patches, process groups) that must not leak between tests."""
    proc = launch([sys.executable, "-c", textwrap.dedent(code)], timeout=timeout)
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


def read_metrics(path, validation: bool = False) -> list[dict]:
    """The training-step rows of a metrics file (``validation``: its validation rows)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r for r in rows if ("valid_loss" in r) == validation]


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """A checkpoint trained 20 steps at (TP,PP,EP) = (1,1,1)."""
    root = tmp_path_factory.mktemp("ckpt_111")
    check(cli("train", "train.steps=20", f"checkpoint.save={root}"))
    return root


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    """Language-model data: 6,000 target sentences of the bundled sample as JSONL (train) and 400
    source sentences as plain text (valid), preprocessed with a 1,500-piece SentencePiece model.
    Returns (root, preprocess_lm's meta, the training texts); the indexed datasets are in
    root / "data"."""
    from megatron_moe.data.corpus import default_path
    from megatron_moe.data.lm_text import preprocess_lm
    from megatron_moe.data.pairs import read_pairs

    root = tmp_path_factory.mktemp("lm")
    pairs = read_pairs(default_path("train"))
    texts = [p.tgt for p in pairs[:6000]]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "valid.txt").write_text("\n".join(p.src for p in pairs[6000:6400]) + "\n")
    meta = preprocess_lm({"train": str(root / "train.jsonl"), "valid": str(root / "valid.txt")},
                         str(root / "data"), vocab_size=1500)
    return root, meta, texts


# The longest test files first (seconds of a full run on 2 cores, largest first): xdist's
# ``--dist loadfile`` hands files to its workers in collection order, so a long file collected
# last would run alone while the other worker idles (longest-first keeps both busy to the end).
LONGEST_FIRST = [
    "tests/multirank/test_convert.py", "tests/slurm/test_slurm_jobs.py",
    "tests/multirank/test_checkpoint_reshard.py", "tests/integration/test_checkpoint_crash.py",
    "tests/multirank/test_megatron_options.py", "tests/multirank/test_translation.py",
    "tests/multirank/test_routers.py", "tests/multirank/test_routing_training.py",
    "tests/multirank/test_gating_dropout.py", "tests/integration/test_study.py",
    "tests/multirank/test_smoe_eval.py", "tests/integration/test_checkpoint_safety.py",
    "tests/multirank/test_pipeline_options.py", "tests/integration/test_tokenizers.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
