"""Tier: integration (the real CLI). A training rank killed with SIGKILL after saving checkpoints
leaves none of its child processes alive: megatron's
write-results manager and writers die with it (PR_SET_PDEATHSIG, megatron_moe/runtime/children.py)."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import cli_args, kill_session, launch, megatron_moe_cmd

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> set[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, set()).add(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkilled_rank_leaves_no_child_process(tmp_path):
    """Background saves: the rank has the manager and forked writers as children (a synchronous
    save has the manager only)."""
    proc = launch(megatron_moe_cmd(*cli_args(
        "train", "train.steps=1000", "checkpoint.interval=3", f"checkpoint.save={tmp_path}",
        "checkpoint.async_save=true")), background=True)
    children = set()
    try:
        for line in proc.stdout:
            if "saved checkpoint" in line:
                children = _descendants(proc.pid)
                break
        assert children, "the rank has no child process to check"
        os.kill(proc.pid, signal.SIGKILL)  # the rank only, not its session
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 10  # PDEATHSIG acts at once; polled, not slept through
        while (left := sorted(pid for pid in children if _alive(pid))) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"children alive 10 s after the rank was killed: {left}"
    finally:
        kill_session(proc)
