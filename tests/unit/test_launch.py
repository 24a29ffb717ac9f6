"""Tier: unit. Launch environments (torchrun, Slurm srun, single process); the single process's
group without a rendezvous port: tests/integration/test_rendezvous.py."""

import pytest

from megatron_moe.runtime.distributed import first_host, launch_env


@pytest.mark.parametrize("nodelist, host", [
    ("gpu07", "gpu07"), ("gpu[07-09,12]", "gpu07"), ("node[3,5]", "node3"),
    ("a100-[001-004],b1", "a100-001"), ("cpu1,cpu2", "cpu1"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_environment():
    env = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                      "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 4, 1, "n1", 1234, "torchrun")


def test_slurm_environment():
    env = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[10-11]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        5, 8, 1, "gpu10", "slurm")
    assert env.master_port == 20000 + 4242 % 10000


def test_single_process_without_launcher():
    env = launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
