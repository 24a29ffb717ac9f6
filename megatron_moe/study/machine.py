"""What machine a study run trained on, and how fast it was, measured just before it trains.

A study compares methods at an equal *wall-clock* budget, so a run on a slower machine buys
fewer steps. When a study spans sessions it spans machines: the runner records, per start of a
run, the CPU model, the logical cores and a fixed probe, and the report shows
the probe next to each run so that a difference of speed is seen rather than mistaken for a
difference of method.

The probe is a small model of the study's own work, timed on the plan's thread count: the
forward and backward of a two-layer MLP of the CPU config's shape (512 tokens, width 192, FFN
768), in ten slices of 0.2 s, reported as iterations per second: the best slice
(``probe_its_per_s``; what the machine can do, as ``timeit`` takes the best time: a passing
disturbance only lowers the other slices) and the median one (``probe_median_its_per_s``).
The first records of the l10n10 study (gate_drop-s2 to top1_reg-s2) kept the median of five
slices as ``probe_its_per_s``; they measured 87-112 it/s on one machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def probe_rates(threads: int, seconds: float = 2.0, slices: int = 10) -> list[float]:
    """Forward + backward iterations per second of the fixed MLP on ``threads`` threads, per
    slice of ``seconds / slices``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(512, 192, generator=gen)
        w1 = (torch.randn(192, 768, generator=gen) * 0.05).requires_grad_()
        w2 = (torch.randn(768, 192, generator=gen) * 0.05).requires_grad_()

        def step():
            loss = (torch.nn.functional.gelu(x @ w1) @ w2).square().mean()
            loss.backward()
            w1.grad = w2.grad = None

        for _ in range(5):  # warm-up: allocator, kernels
            step()
        rates = []
        for _ in range(slices):
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / slices:
                step()
                n += 1
            rates.append(n / elapsed)
        return rates
    finally:
        torch.set_num_threads(before)


def describe(threads: int) -> dict:
    """The record kept per start of a run (``run.json``'s ``machine``)."""
    rates = probe_rates(threads)
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "probe_its_per_s": round(max(rates), 2),
            "probe_median_its_per_s": round(statistics.median(rates), 2),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
