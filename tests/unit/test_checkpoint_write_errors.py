"""Tier: unit (one process). Saves that cannot be written: a save directory that cannot be created
fails before the first step, and a write that fails part-way (disk full, simulated) ends the run
with a one-line error naming the directory, its partial files removed and the previous checkpoint
still the one ``latest`` names."""

import json

from megatron_moe.checkpointing import TRACKER, iteration_dir
from tests.conftest import DEBUG_CONFIG, check, cli, run_python


def test_unwritable_save_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = cli("train", "train.steps=4", f"checkpoint.save={blocker / 'ckpt'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"error: checkpoint.save: cannot write to {blocker / 'ckpt'}: Not a directory"
            in proc.stderr)
    assert "step " not in proc.stdout + proc.stderr  # nothing trained
    assert "Traceback" not in proc.stderr


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    out = run_python(f"""
        import contextlib, errno, io, json
        from pathlib import Path
        import megatron.core.dist_checkpointing as dc

        real, calls = dc.save, []

        def save(state, path, **kwargs):  # the second save runs out of disk part-way
            calls.append(path)
            if len(calls) == 2:
                (Path(path) / "__0_0.distcp").write_bytes(b"x" * 64)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(state, path, **kwargs)

        dc.save = save
        from megatron_moe.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["train", "--config", "{DEBUG_CONFIG}", "--set", "train.steps=4",
                       "--set", "checkpoint.interval=2", "--set", "checkpoint.save={root}"])
        print(json.dumps({{"rc": rc, "stderr": err.getvalue()}}))
        """)
    result = json.loads(out.splitlines()[-1])
    assert result["rc"] == 2
    partial = root / ".iter_0000004.partial"
    assert (f"error: checkpoint.save: writing {partial} failed: No space left on device; "
            f"the previous checkpoint is kept") in result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert not partial.exists() and not iteration_dir(root, 4).exists()
    assert (root / TRACKER).read_text().strip() == "2"
    check(cli("evaluate", f"checkpoint.load={root}"))  # the kept checkpoint loads
