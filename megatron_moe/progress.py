"""A dependency-free progress line for long work: count, percentage, rate and ETA on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=sys.stderr, min_interval: float = 1.0):
        self.label, self.total, self.stream = label, max(total, 1), stream
        self.started = self.last = time.perf_counter()
        self.min_interval = min_interval
        self.done = 0
        self.tty = getattr(stream, "isatty", lambda: False)()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.min_interval or self.done >= self.total:
            self.last = now
            self._print(now, final=self.done >= self.total)

    def _print(self, now: float, final: bool) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"[{self.label}] {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) "
                f"{rate:,.0f}/s elapsed {elapsed:.0f}s ETA {eta:.0f}s")
        end = "\n" if final or not self.tty else "\r"
        print(line, end=end, file=self.stream, flush=True)
