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
checkpoint saves is not training time and is left out). The budget still stops a run that runs slower than it was timed.

With ``budget_schedule: stop`` the schedules keep ``train.steps`` and the budget only stops the
run wherever it is (the earlier behaviour). The fit happens after step
``WARMUP_STEPS + budget_timing_steps``; when ``train.warmup_steps`` is at least that, the learning
rate of every step equals that of a run configured with the fitted total from the start (the
warm-up does not depend on it); otherwise the few steps in between decayed towards ``train.steps``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

from megatron_moe.config import Config
from megatron_moe.runtime.distributed import max_over_ranks

WARMUP_STEPS = 5  # steps of each process not timed: the first steps run slow (allocation, caches)


class BudgetClock:
    """Training time against the budget, and the step count fitted to it."""

    def __init__(self, cfg: Config):
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
        """Count a finished step; returns a log note when the total was fitted at this step."""
        if not self.fit or self.fitted:
            return None
        self._steps_seen += 1
        if self._steps_seen == WARMUP_STEPS:
            self._mark = self.elapsed()
        if self._steps_seen < WARMUP_STEPS + self.timing_steps:
            return None
        per_step = (self.elapsed() - self._mark) / self.timing_steps
        remaining = self.budget_s - self.elapsed()
        fitted = int(max_over_ranks(done + max(int(remaining / per_step), 1)))  # clocks differ
        self.total_steps, self.fitted = max(min(fitted, self.max_steps), done + 1), True
        capped = " (capped by train.steps)" if fitted > self.max_steps else ""
        return (f"budget: {self.timing_steps} steps took {per_step:.3f}s each; the schedules now "
                f"end at step {self.total_steps}{capped}, {remaining:.0f}s of the {self.budget_s:.0f}s "
                f"budget left")

    def state(self) -> dict:
        """What a checkpoint keeps (collective: every rank saves the slowest rank's time, so the
        checkpoint's common state is the same on every rank)."""
        return {"total_steps": self.total_steps, "fitted": self.fitted,
                "train_seconds": max_over_ranks(self.elapsed())}

    def restore(self, state: dict) -> None:
        self.prior_s = float(state.get("train_seconds", 0.0))
        if state.get("fitted"):
            self.total_steps, self.fitted = int(state["total_steps"]), True


def resize_schedules(run, total_steps: int) -> None:
    """Point the LR / weight-decay schedule and the routing context at ``total_steps``."""
    warmup = run.cfg.train.warmup_steps
    run.scheduler.lr_decay_steps = max(total_steps, warmup + 1)
    run.scheduler.wd_incr_steps = max(total_steps, 1)
    run.context.total_steps = total_steps
