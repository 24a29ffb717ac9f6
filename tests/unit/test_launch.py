"""Tier: unit. Launch environments (torchrun, Slurm srun, single process) and the latter's group."""

import pytest

from megatron_moe.runtime.distributed import first_host, launch_env
from tests.conftest import run_python


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


def test_single_process_opens_no_rendezvous_port():
    """A single process must not pick a "free" port and bind it later: another job can take it in
    between (EADDRINUSE, seen with 8 test workers on one machine). Its group uses an in-process
    store, so it initialises even when every TCP bind from Python fails."""
    out = run_python("""
        import socket
        import torch, torch.distributed as dist
        from megatron_moe.config import Config
        from megatron_moe.runtime.distributed import init_distributed, launch_env, shutdown_distributed
        def refuse(self, address):
            raise OSError(98, "Address already in use (test)")
        socket.socket.bind = refuse
        env = launch_env({})
        assert (env.launcher, env.master_port) == ("single", 0), env
        init_distributed(Config(), env)
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0] and dist.get_world_size() == 1
        shutdown_distributed()
        print("initialised")
    """, timeout=120)
    assert "initialised" in out
