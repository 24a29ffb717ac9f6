"""Tier: integration (the real CLI, one process per call). A bad or missing config stops the
command before training with one line on stderr and exit status 2; ``--help`` lists the commands.
(The validation rules themselves: tests/unit/test_config.py.)"""

import pytest

from tests.conftest import cli, launch, megatron_moe_cmd

pytestmark = pytest.mark.integration


def test_cli_bad_config_fails_before_training_with_one_line_and_exit_2():
    proc = cli("train", "moe.num_experts=6", "parallel.ep=4")
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1, proc.stderr
    assert "moe.num_experts (6)" in err[0] and "parallel.ep (4)" in err[0]
    assert "step" not in proc.stdout


def test_cli_missing_config_file():
    proc = cli("train", config="/nonexistent.yaml")
    assert proc.returncode == 2 and "config file /nonexistent.yaml does not exist" in proc.stderr


def test_cli_help_lists_commands():
    out = launch(megatron_moe_cmd("--help"))
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout
