"""Tier: integration (one training process). SIGUSR1 / SIGTERM during training: the run finishes its
step, saves, says so and exits 0; resuming from that checkpoint continues at the next step."""

import re
import signal

import pytest

from tests.conftest import check, cli, cli_args, launch, megatron_moe_cmd

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGUSR1: tests/slurm (time-limit signal)
def test_signal_saves_and_stops_then_resume_continues(tmp_path, sig):
    ckpt = tmp_path / "ckpt"
    proc = launch(megatron_moe_cmd(*cli_args("train", "train.steps=100000", "logging.interval=1",
                                             f"checkpoint.save={ckpt}")), background=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step      3/"):
            proc.send_signal(sig)
            break
    out, _ = proc.communicate(timeout=300)
    text = "".join(lines) + out
    assert proc.returncode == 0, text[-3000:]
    stopped = int(re.search(rf"stop signal \({sig.name}\) after step (\d+): checkpoint saved",
                            text).group(1))
    assert 3 <= stopped < 100000
    assert (ckpt / "latest").read_text().strip() == str(stopped)
    resumed = check(cli("train", f"checkpoint.load={ckpt}", f"train.steps={stopped + 2}",
                        "logging.interval=1"))
    assert f"resumed from {ckpt} at step {stopped}" in resumed.stdout
    assert re.search(rf"^step\s+{stopped + 1}/", resumed.stdout, re.M)
