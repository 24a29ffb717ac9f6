"""Tier: integration (a fresh interpreter: it replaces socket.bind and opens a process group).
A single process without a launcher initialises its group without any TCP port."""

import pytest

from tests.conftest import run_python

pytestmark = pytest.mark.integration


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
