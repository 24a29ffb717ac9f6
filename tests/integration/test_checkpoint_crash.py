"""Tier: integration (one training process per run, real ``kill -9``).

A run killed with SIGKILL mid-training resumes from its last checkpoint and reproduces the
uninterrupted run's losses bit for bit; a run killed while it is saving (three points of the save
protocol, and the background save) leaves the previous checkpoint selected and loadable, and the
next save removes the debris. A background save (``checkpoint.async_save``) whose writer is slowed
down holds the state of the step it was started at."""

import signal

import pytest
import torch

from megatron_moe.checkpointing import iteration_dir, resolve
from megatron_moe.checkpointing.safety import check_files
from tests.conftest import (check, cli, cli_args, kill_session, launch, megatron_moe_cmd,
                            read_metrics)

pytestmark = pytest.mark.integration


def _losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r and "step" in r}


# Bit-for-bit is a CPU property. On an H100 (torch 2.11, bf16) two uninterrupted runs already
# differ at step 1 (5.95209 vs 5.95156): CUDA's scatter-add atomics in the MoE permutation sum in
# a varying order. There resuming continues the curve within that noise, not bit for bit.
cpu_bit_exact = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="bit-for-bit equality holds on CPU only")

COMMON = ["train.steps=10", "logging.interval=1", "checkpoint.interval=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The losses of an uninterrupted 10-step run without checkpoints."""
    metrics = tmp_path_factory.mktemp("reference") / "reference.jsonl"
    check(cli("train", *COMMON, f"logging.metrics_file={metrics}"))
    return _losses(metrics)


@cpu_bit_exact
def test_kill_9_mid_training_then_resume_is_bit_exact(tmp_path, reference):
    ckpt, killed = tmp_path / "ckpt", tmp_path / "killed.jsonl"
    proc = launch(megatron_moe_cmd(*cli_args("train", *COMMON, f"checkpoint.save={ckpt}",
                                             f"logging.metrics_file={killed}")), background=True)
    for line in proc.stdout:
        if line.startswith("step      6/"):  # after the step-4 save, before the step-8 one
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=120) == -signal.SIGKILL
    kill_session(proc)  # e.g. megatron's checkpoint writer's manager process
    assert resolve(str(ckpt)) == iteration_dir(ckpt, 4)
    resumed = tmp_path / "resumed.jsonl"
    out = check(cli("train", *COMMON, f"checkpoint.load={ckpt}",
                    f"logging.metrics_file={resumed}"))
    assert "at step 4 (iter_0000004, 32 samples consumed)" in out.stdout
    want, got = reference, _losses(resumed)
    assert sorted(got) == list(range(5, 11))
    assert [got[s] for s in got] == [want[s] for s in got]  # bit for bit


KILLER = r"""
import os, signal, sys
from megatron_moe.checkpointing import saveload, store
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

point, step = sys.argv[1], int(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "writing":  # megatron's writer has written the tensor files, not yet the index
    finish = FileSystemWriterAsync.finish
    def killing_finish(self, *args, **kwargs):
        if f".iter_{step:07d}.partial" in str(self.path):
            die()
        return finish(self, *args, **kwargs)
    FileSystemWriterAsync.finish = killing_finish
elif point == "manifest":  # megatron's save is complete, the manifest not written
    write_manifest = saveload.write_manifest
    def killing_manifest(directory, digests):
        if directory.name == f".iter_{step:07d}.partial":
            die()
        return write_manifest(directory, digests)
    saveload.write_manifest = killing_manifest
elif point == "slow_writer":  # the background writer starts 3 s late: training moves on
    import time
    write = FileSystemWriterAsync.write_preloaded_data_multiproc
    def slow_write(*args, **kwargs):
        time.sleep(3)
        return write(*args, **kwargs)
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow_write)
elif point == "tracker":  # iter_<step> renamed into place, tracker not yet replaced
    write_durably = store._write_durably
    def killing_write(path, text):
        if path.name == store.TRACKER and text.strip() == str(step):
            die()
        return write_durably(path, text)
    store._write_durably = killing_write
from megatron_moe.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _hooked(point: str, step: int, *overrides: str) -> list[str]:
    """The command running the CLI's ``train`` under the hook ``point`` (see KILLER)."""
    return megatron_moe_cmd(*cli_args("train", *overrides), hook=KILLER,
                            hook_args=(point, str(step)))


@pytest.mark.parametrize("point,async_save", [("manifest", False), ("tracker", False),
                                              ("writing", True)])
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, point, async_save):
    ckpt = tmp_path / "ckpt"
    cmd = _hooked(point, 6, "train.steps=6", "checkpoint.interval=3", f"checkpoint.save={ckpt}",
                  f"checkpoint.async_save={str(async_save).lower()}")
    proc = launch(cmd, background=True)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    kill_session(proc)  # e.g. megatron's checkpoint writer's manager process
    assert (ckpt / "latest").read_text().strip() == "3"
    debris = ckpt / (".iter_0000006.partial" if point != "tracker" else "iter_0000006")
    assert debris.is_dir()  # the killed save left something behind ...
    assert resolve(str(ckpt)) == iteration_dir(ckpt, 3)  # ... but step 3 is the one selected
    check_files(iteration_dir(ckpt, 3))
    out = check(cli("train", "train.steps=4", f"checkpoint.load={ckpt}",
                    f"checkpoint.save={ckpt}"))
    assert "at step 3 (iter_0000003" in out.stdout
    assert (ckpt / "latest").read_text().strip() == "4"
    assert not (ckpt / ".iter_0000006.partial").exists()


@cpu_bit_exact
def test_background_save_holds_the_step_it_was_started_at(tmp_path, reference):
    """The writer of the step-4 save sleeps 3 s while training runs on to later steps; resuming
    from iter_0000004 still reproduces the uninterrupted run bit for bit, and the saves do not
    change the training losses."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "async.jsonl"
    proc = launch(_hooked("slow_writer", 0, *COMMON, f"checkpoint.save={ckpt}",
                          "checkpoint.async_save=true", f"logging.metrics_file={metrics}"),
                  timeout=300)
    check(proc)
    assert _losses(metrics) == reference
    lines = proc.stdout.splitlines()
    published = [line for line in lines if "written in the background" in line]
    # training went on while the step-4 checkpoint was being written
    assert lines.index(published[0]) > next(i for i, line in enumerate(lines)
                                            if line.startswith("step      6/"))
    assert [line.split("saved checkpoint ")[1].split()[0] for line in published] == [
        str(iteration_dir(ckpt, s)) for s in (4, 8, 10)]
    assert (ckpt / "latest").read_text().strip() == "10"
    for step in (4, 8, 10):
        check_files(iteration_dir(ckpt, step))
    resumed = tmp_path / "resumed.jsonl"
    out = check(cli("train", *COMMON, f"checkpoint.load={iteration_dir(ckpt, 4)}",
                    f"logging.metrics_file={resumed}"))
    assert "at step 4 (iter_0000004, 32 samples consumed)" in out.stdout
    got = _losses(resumed)
    assert sorted(got) == list(range(5, 11))
    assert [got[s] for s in got] == [reference[s] for s in got]  # bit for bit
