"""Launch environment (single process, torchrun, Slurm srun) and megatron-core parallel setup.

:func:`launch_env` reads the environment without side effects so the config can be validated against
the world size before any process group exists; :func:`init_distributed` then creates the default
process group (NCCL on GPU, gloo on CPU) and megatron's TP/PP/EP/DP groups.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_moe.config import Config
from megatron_moe.runtime.cpu_support import (apply_cpu_support, compute_device, cuda_available,
                                              distributed_backend)
from megatron_moe.runtime.te_fallback import apply_te_fallbacks


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # single | torchrun | slurm


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST ({nodelist!r}) is not a Slurm node list")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def single_process() -> LaunchEnv:
    """One process without a launcher. It needs no rendezvous: its process group uses an in-process
    store, so no port is opened (a port picked as free and bound later can be taken in between by
    another job on the node: seen as EADDRINUSE with eight test workers on one machine)."""
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


def launch_env(environ=None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also srun + torchrun per node)
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per rank
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "9500")) % 10000))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return single_process()


def init_distributed(cfg: Config, env: LaunchEnv) -> None:
    """Default process group, megatron's parallel groups and its RNG tracker."""
    apply_te_fallbacks()
    apply_cpu_support()
    if cuda_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        if env.launcher == "single":
            rendezvous = {"store": dist.HashStore()}
        else:
            rendezvous = {"init_method": f"tcp://{env.master_addr}:{env.master_port}"}
        dist.init_process_group(backend=distributed_backend(), rank=env.rank,
                                world_size=env.world_size,
                                timeout=datetime.timedelta(
                                    minutes=cfg.parallel.distributed_timeout_minutes),
                                **rendezvous)
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def maxima_over_ranks(values: list[float]) -> list[float]:
    """Collective (one all-reduce): each value's largest over all ranks (float64), e.g. so every
    rank takes the same decision from its own clock or signal flag."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def max_over_ranks(value: float) -> float:
    """Collective: the largest ``value`` over all ranks."""
    return maxima_over_ranks([value])[0]


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
