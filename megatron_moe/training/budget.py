"""A schedule that fits a wall-clock budget (``train.time_budget_minutes``).

Without a budget a run takes ``train.steps`` steps and its schedules (learning rate, SMoE-Dropout's
k) are sized to them. With a budget and ``train.budget_schedule: fit`` (the default), the run times
``train.budget_timing_steps`` steps after the first few of the process (start-up, allocator and
cache warm-up), then fixes the total number of steps so that the remaining budget ends at it:

    total = step + floor(remaining budget / measured seconds per step)   (at most train.steps)

and re-sizes every schedule to ``total``: the LR decay and weight-decay steps of megatron's
scheduler, and the routing context's ``total_steps`` (SMoE-Dropout's k schedule). The number is
logged and saved with every checkpoint, so a resumed run keeps it (and is not timed again); the
budget counts training time over all resumes (time spent in validation, periodic BLEU and
checkpoint saves is not training time and is left out). The budget still stops a run that runs
slower than it was timed.

With ``budget_schedule: stop`` the schedules keep ``train.steps`` and the budget only stops the
run wherever it is (the earlier behaviour). The fit happens after step
``WARMUP_STEPS + budget_timing_steps``; when ``train.warmup_steps`` is at least that, the learning
rate of every step equals that of a run configured with the fitted total from the start (the
warm-up does not depend on it); otherwise the few steps in between decayed towards ``train.steps``.

The first fit sees only ``budget_timing_steps`` steps, so every run is fitted again once, at
``REFIT_AT`` of the way from the first fit to its end, from all the steps timed so far: a short
slow (or fast) spell in the timing window, e.g. another job on the machine, no longer decides the
run's length (in the study, a timing window slowed by a concurrent test suite ended one run's
schedule 97 s before its budget, and a later slowdown cut another 9% short of its schedule). A
method whose step cost follows a schedule sized to the run (SMoE-Dropout: k grows from k_min to
k_max, and a step at k = 8 costs about 1.7x one at k = 2 on the study's CPU model) is timed at
k_min only, so its first fit overestimates the steps that fit (the study's first SMoE run stopped
at step 2875 of 3828, at k = 6 of 8): at the re-fit the seconds of every timed step are regressed
on the step's experts per token (``seconds = a + b * k``, b >= 0; the mean for a constant k), and
the total becomes the largest N for which the steps left, each at the k the schedule gives it
when it ends at N, fit the remaining budget. The learning rate and k of the steps after the re-fit
follow the schedules at the new total (the logged ``total_steps`` of each step says which); the
re-fitted total is saved like the first.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

from megatron_moe.config import Config
from megatron_moe.runtime.distributed import max_over_ranks

WARMUP_STEPS = 5  # steps of each process not timed: the first steps run slow (allocation, caches)
REFIT_AT = 1 / 3  # a fitted run is re-fitted once, this far from the first fit to its end
SchedulePairs = Callable[[int, int], Optional[float]]  # (total steps, step) -> experts per token


class BudgetClock:
    """Training time against the budget, and the step count fitted to it."""

    def __init__(self, cfg: Config, scheduled_pairs: Optional[SchedulePairs] = None):
        t = cfg.train
        self.budget_s: Optional[float] = t.time_budget_minutes * 60 if t.time_budget_minutes else None
        self.fit = self.budget_s is not None and t.budget_schedule == "fit"
        self.timing_steps = t.budget_timing_steps
        self.max_steps = t.steps
        self.total_steps = t.steps  # the schedules' length: train.steps until fitted
        self.fitted = False
        self.prior_s = 0.0  # training seconds of earlier processes (restored from a checkpoint)
        self._started = time.perf_counter()
        self._paused_s = 0.0  # validation / BLEU time of this process
        self._steps_seen = 0
        self._mark: Optional[float] = None
        # (experts per token, seconds) of each timed step, and the step of the one re-fit; the
        # experts per token of a step from RoutingMethod.scheduled_pairs, else a constant
        varying = scheduled_pairs is not None and scheduled_pairs(t.steps, 0) is not None
        self.pairs: SchedulePairs = scheduled_pairs if varying else (lambda total, step: 1.0)
        self.refit_step: Optional[int] = None
        self._samples: list[tuple[float, float]] = []
        self._last: Optional[float] = None

    def elapsed(self) -> float:
        """Training seconds so far, over every resume of the run."""
        return self.prior_s + time.perf_counter() - self._started - self._paused_s

    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s

    @contextlib.contextmanager
    def pause(self):
        """Time inside it (evaluation, saves) does not count against the budget."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - started

    def step_done(self, done: int) -> Optional[str]:
        """Count a finished step; returns a log note when the total was (re-)fitted at this step."""
        if not self.fit:
            return None
        now = self.elapsed()
        self._steps_seen += 1
        if self._steps_seen > WARMUP_STEPS:
            self._samples.append((self.pairs(self.total_steps, done - 1), now - self._last))
        self._last = now
        if self.fitted:
            return self._refit(done) if self.refit_step is not None and done == self.refit_step \
                else None
        if self._steps_seen == WARMUP_STEPS:
            self._mark = now
        if self._steps_seen < WARMUP_STEPS + self.timing_steps:
            return None
        per_step = (now - self._mark) / self.timing_steps
        remaining = self.budget_s - now
        fitted = int(max_over_ranks(done + max(int(remaining / per_step), 1)))  # clocks differ
        self.total_steps, self.fitted = max(min(fitted, self.max_steps), done + 1), True
        if self.total_steps - done >= 3:  # else there is nothing left to re-fit
            self.refit_step = done + max(int((self.total_steps - done) * REFIT_AT), 1)
        capped = " (capped by train.steps)" if fitted > self.max_steps else ""
        return (f"budget: {self.timing_steps} steps took {per_step:.3f}s each; the schedules now "
                f"end at step {self.total_steps}{capped}, {remaining:.0f}s of the {self.budget_s:.0f}s "
                f"budget left")

    def _refit(self, done: int) -> Optional[str]:
        """The one re-fit of a varying-cost run (module docstring)."""
        if len(self._samples) < self.timing_steps and done + 1 < self.total_steps:
            # resumed just before the re-fit: time as many steps as the first fit did
            self.refit_step = done + self.timing_steps - len(self._samples)
            return None
        self.refit_step = None
        cost = step_cost(self._samples)
        if cost is None:
            return None
        a, b = cost
        remaining = self.budget_s - self.elapsed()
        fitted = int(max_over_ranks(steps_that_fit(
            lambda total, step: a + b * self.pairs(total, step), done, remaining, self.max_steps)))
        self.total_steps = max(fitted, done + 1)
        cost = f"{a:.3f} + {b:.4f} x experts per token" if b else f"{a:.3f}"
        return (f"budget: re-timed at step {done} (seconds per step = {cost}, from "
                f"{len(self._samples)} steps); the schedules now end at step {self.total_steps}, "
                f"{remaining:.0f}s of the budget left")

    def state(self) -> dict:
        """What a checkpoint keeps (collective: every rank saves the slowest rank's time, so the
        checkpoint's common state is the same on every rank)."""
        return {"total_steps": self.total_steps, "fitted": self.fitted,
                "refit_step": self.refit_step, "train_seconds": max_over_ranks(self.elapsed())}

    def restore(self, state: dict) -> None:
        self.prior_s = float(state.get("train_seconds", 0.0))
        if state.get("fitted"):
            self.total_steps, self.fitted = int(state["total_steps"]), True
            self.refit_step = state.get("refit_step")  # None: re-fitted already (or never)


def step_cost(samples: list[tuple[float, float]]) -> Optional[tuple[float, float]]:
    """Least-squares (a, b) of seconds = a + b * pairs over (pairs, seconds) samples, with b >= 0
    (a single pairs value, or a cost not growing with pairs, gives the mean cost and b = 0);
    None without samples."""
    n = len(samples)
    if n == 0:
        return None
    mean_k, mean_t = sum(k for k, _ in samples) / n, sum(t for _, t in samples) / n
    var_k = sum((k - mean_k) ** 2 for k, _ in samples)
    b = sum((k - mean_k) * (t - mean_t) for k, t in samples) / var_k if var_k else 0.0
    return (mean_t - b * mean_k, b) if b > 0 else (mean_t, 0.0)


def steps_that_fit(seconds_at: Callable[[int, int], float], done: int, remaining: float,
                   max_steps: int, samples: int = 2000) -> int:
    """The largest total N (done < N <= max_steps) whose steps done .. N-1, each costing
    ``seconds_at(N, step)``, fit in ``remaining`` seconds (at least done + 1). The sum over the
    steps is estimated from at most ``samples`` evenly spaced steps."""
    def cost(total: int) -> float:
        count = total - done
        stride = max(count // samples, 1)
        picked = range(done, total, stride)
        return sum(max(seconds_at(total, s), 0.0) for s in picked) * count / len(picked)

    low, high = done + 1, max_steps
    if cost(low) > remaining or cost(high) <= remaining:
        return low if cost(low) > remaining else high
    while high - low > 1:  # cost(low) fits, cost(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if cost(mid) <= remaining else (low, mid)
    return low


def resize_schedules(run, total_steps: int) -> None:
    """Point the LR / weight-decay schedule and the routing context at ``total_steps``."""
    warmup = run.cfg.train.warmup_steps
    run.scheduler.lr_decay_steps = max(total_steps, warmup + 1)
    run.scheduler.wd_incr_steps = max(total_steps, 1)
    run.context.total_steps = total_steps
