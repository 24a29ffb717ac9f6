"""megatron_moe's MoE layer against stock megatron-core's, side by side in one run.

    python tools/bench_overhead.py                                      # 1 rank (CPU or GPU)
    torchrun --nproc_per_node 2 tools/bench_overhead.py --set parallel.ep=2
    python tools/bench_overhead.py --set model.hidden_size=1024 --set model.ffn_hidden_size=4096 \
        --set model.seq_length=2048 --tokens 8192                       # a GPU-sized layer

Builds, from one config, stock megatron-core's ``MoELayer`` (its ``TopKRouter`` and token
dispatcher) and megatron_moe's layer with each routing method (``topk`` at gating-dropout p = 0
is the configuration that must cost nothing), then times forward + backward of one layer on the
same input, the variants interleaved round by round (after a warm-up round) so every variant sees
the same machine state. Prints, per variant: the median time, the ratio to stock per round (median
and the 25-75% spread of the rounds), and on a GPU the tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_moe.config import load_config  # noqa: E402
from megatron_moe.runtime.distributed import (init_distributed, is_main_rank, launch_env,  # noqa: E402
                                              shutdown_distributed)
from megatron_moe.validation import validate  # noqa: E402

VARIANTS = {"megatron": [], "topk": [], "thor": ["moe.router=thor"],
            "smoe_dropout": ["moe.router=smoe_dropout"], "adaptive": ["moe.router=adaptive"]}


def build_layer(cfg, stock: bool):
    """Layer 1's MoE block, stock megatron-core's or megatron_moe's, on the compute device."""
    from megatron_moe.model.build import build_moe_block, transformer_config
    from megatron_moe.routing.context import RoutingContext
    from megatron_moe.runtime.cpu_support import compute_device

    context = RoutingContext(seed=cfg.train.seed)
    layer = build_moe_block(cfg, transformer_config(cfg), context, stock=stock)
    return layer.to(compute_device()).train(), context


def _timed(layer, context, x_SBH, step: int) -> float:
    from megatron_moe.runtime.cpu_support import compute_device, cuda_available

    context.start_step(step)
    context.next_microbatch()
    x = x_SBH.detach().requires_grad_(True)
    if cuda_available():
        torch.cuda.synchronize(compute_device())
    started = time.perf_counter()
    out, _ = layer(x)
    out.float().square().mean().backward()
    if cuda_available():
        torch.cuda.synchronize(compute_device())
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()  # the slowest rank's time, as in training
    return time.perf_counter() - started


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1]
                                            / "examples/configs/debug.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (after one warm-up)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank per call")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    env = launch_env()
    cfgs = {}
    for name in args.variants:
        cfgs[name] = load_config(args.config, args.overrides + VARIANTS[name])
        validate(cfgs[name], env.world_size)
    init_distributed(cfgs[args.variants[0]], env)
    from megatron_moe.runtime.cpu_support import compute_device

    layers = {name: build_layer(cfgs[name], stock=name == "megatron") for name in args.variants}
    h, S = cfgs[args.variants[0]].model.hidden_size, cfgs[args.variants[0]].model.seq_length
    g = torch.Generator().manual_seed(env.rank)
    x = torch.randn(S, max(args.tokens // S, 1), h, generator=g).to(compute_device())
    times = {name: [] for name in layers}
    for round_ in range(args.rounds + 1):
        for name, (layer, context) in layers.items():
            seconds = _timed(layer, context, x, round_)
            if round_ > 0:
                times[name].append(seconds)
    if is_main_rank():
        _print(times, args, env.world_size, x.shape[0] * x.shape[1], cfgs[args.variants[0]])
    shutdown_distributed()
    return 0


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def _print(times: dict, args, world: int, tokens: int, cfg) -> None:
    print(f"\nMoE layer forward+backward, {world} rank(s), ep={cfg.parallel.ep}, "
          f"{cfg.moe.num_experts} experts top-{cfg.moe.topk}, hidden {cfg.model.hidden_size}, "
          f"ffn {cfg.model.ffn_hidden_size}, {tokens} tokens per rank, {args.rounds} rounds")
    print(f"{'variant':>13} {'median ms':>10} {'ratio to stock (25%..75%)':>27} {'tokens/s':>10}")
    base = times.get("megatron")
    for name, values in times.items():
        ratio = "-"
        if base is not None:
            lo, mid, hi = _quartiles([t / b for t, b in zip(values, base)])
            ratio = f"{mid:.3f} ({lo:.3f}..{hi:.3f})"
        median = statistics.median(values)
        print(f"{name:>13} {median * 1e3:>10.2f} {ratio:>27} {tokens / median:>10.0f}")


if __name__ == "__main__":
    sys.exit(main())
