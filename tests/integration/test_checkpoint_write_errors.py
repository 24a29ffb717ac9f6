"""Tier: integration (one training process per run, the real CLI). Saves that cannot be written:
a save directory that cannot be created fails before the first step, and a write that fails
part-way (disk full, simulated inside megatron's file writer, synchronous and in its forked
background writer) ends the run with a one-line error naming the directory, its partial files
removed and the previous checkpoint still the one ``latest`` names."""

import json
import textwrap

import pytest

from megatron_moe.checkpointing import TRACKER, iteration_dir
from tests.conftest import check, cli, cli_args, run_python

pytestmark = pytest.mark.integration


def test_unwritable_save_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = cli("train", "train.steps=4", f"checkpoint.save={blocker / 'ckpt'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"error: checkpoint.save: cannot write to {blocker / 'ckpt'}: Not a directory"
            in proc.stderr)
    assert "step " not in proc.stdout + proc.stderr  # nothing trained
    assert "Traceback" not in proc.stderr


_DISK_FULL = """
    import functools
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fa
    real = fa._write_item

    @functools.wraps(real)  # megatron inspects its signature
    def write_item(*args, **kwargs):  # step 4's files hit a full disk (in whichever process)
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if ".iter_0000004" in str(stream.name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    fa._write_item = write_item
"""


def _train_with(patch: str, root, *overrides: str) -> dict:
    """Train 4 steps saving at 2 and 4 in a fresh interpreter with ``patch`` applied first."""
    argv = cli_args("train", "train.steps=4", "checkpoint.interval=2", f"checkpoint.save={root}",
                    *overrides)
    out = run_python(f"""
        import contextlib, errno, io, json
        from pathlib import Path
        {textwrap.indent(textwrap.dedent(patch), " " * 8).strip()}
        from megatron_moe.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main({argv!r})
        print(json.dumps({{"rc": rc, "stderr": err.getvalue()}}))
        """)
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("async_save, how", [("false", ""), ("true", " in the background")])
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, async_save, how):
    root = tmp_path / "ckpt"
    result = _train_with(_DISK_FULL, root, f"checkpoint.async_save={async_save}")
    assert result["rc"] == 2, result["stderr"][-3000:]
    partial = root / ".iter_0000004.partial"
    assert (f"error: checkpoint.save: writing {partial}{how} failed: Worker failure: [Errno 28] "
            f"No space left on device; the previous checkpoint is kept"
            in result["stderr"]), result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"]
    assert not partial.exists() and not iteration_dir(root, 4).exists()
    assert (root / TRACKER).read_text().strip() == "2"
    check(cli("evaluate", f"checkpoint.load={root}"))  # the kept checkpoint loads
