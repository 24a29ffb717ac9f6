"""Tier: multi-rank gloo (2 processes). The CPU layer's uneven gather / reduce-scatter replacements.

megatron's alltoall dispatcher under TP>1 gathers blocks of different lengths from each rank, which
gloo's all_gather refuses; the CPU layer pads to the longest block. Gradients flow back through the
matching uneven reduce-scatter.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron_moe.runtime.cpu_support import apply_cpu_support

    apply_cpu_support()
    from megatron.core.tensor_parallel import mappings

    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    sizes = [3, 1]
    x = torch.full((sizes[rank], 2), float(rank + 1), requires_grad=True)
    y = mappings.gather_from_sequence_parallel_region(x, group=group, output_split_sizes=sizes)
    (y * torch.arange(1, 5, dtype=torch.float32)[:, None]).sum().backward()
    results[rank] = (y.detach().tolist(), x.grad.tolist())
    dist.destroy_process_group()


@pytest.mark.multirank
def test_uneven_gather_and_its_gradient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    gathered = [[1.0, 1.0]] * 3 + [[2.0, 2.0]]
    assert results[0][0] == gathered and results[1][0] == gathered
    # d/dx of sum(row_weight * y) summed over both ranks' identical graphs: 2 * row weight
    assert results[0][1] == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    assert results[1][1] == [[8.0, 8.0]]
