"""Save-and-stop on a signal, for Slurm time limits, preemption and requeue.

Slurm can warn a job before its time limit (``#SBATCH --signal=B:USR1@120``); the sbatch scripts in
``examples/slurm/`` forward that SIGUSR1 to the training ranks, and ``scancel``/preemption sends
SIGTERM. :class:`StopRequest` records such a signal instead of dying; the training loop asks
:meth:`StopRequest.agreed` after every step, saves a checkpoint and returns. Ranks may receive the
signal a step apart, so the decision is one all-reduce (MAX) of a flag per step: every rank stops
after the same step and the collective save cannot hang. The time budget's flag (each rank's own
clock) rides in the same all-reduce.
"""

from __future__ import annotations

import signal

from megatron_moe.runtime.distributed import maxima_over_ranks

SIGNALS = ("SIGUSR1", "SIGTERM")


class StopRequest:
    """Context manager: while active, the signals in ``SIGNALS`` set a flag instead of killing."""

    def __init__(self, signals=SIGNALS):
        self.signals = [getattr(signal, name) for name in signals]
        self.received: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, *others: bool) -> tuple[bool, ...]:
        """(any rank received a signal, then for each of ``others``: true on any rank), the same
        on every rank: one collective call (e.g. the time budget, read from each rank's clock)."""
        return agree_any(self.received is not None, *others)


def agree_any(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks (one all-reduce MAX), so that every rank takes the same
    branch before a collective."""
    return tuple(v > 0 for v in maxima_over_ranks([float(f) for f in flags]))
