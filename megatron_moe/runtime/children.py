"""Helper processes die with their rank.

megatron-core's checkpoint writer starts helper processes: a ``multiprocessing`` manager (spawned
once, at the first save, to collect write results; ~270 MB) and forked writer processes. When a
rank is killed with SIGKILL (an OOM kill, ``scancel --signal=KILL``, a node agent) nothing runs
in it, and these children are re-parented and live on: the manager forever.

Linux's ``PR_SET_PDEATHSIG`` asks the kernel to send a signal to a process when its parent
exits. :func:`tie_children_to_this_process` (called once per rank at start-up) sets it to SIGKILL

1. in every child this process *forks* (``os.register_at_fork``): megatron's writers;
2. in the write-results manager, by starting it here (spawn context, as megatron does) with an
   initializer that sets it, and handing its queue to megatron, which creates it only when its
   module-level queue is still unset. Started at start-up, the manager is there when Slurm sends
   a stop signal to every process of the step, so it ignores those signals (a Slurm test found
   the manager killed by SIGUSR1 and the save it was asked for failing: "Connection refused").

The signal follows the death of the *thread* that created the child; both are created by a
rank's main thread, which lives as long as the rank. Elsewhere than Linux nothing changes.

The manager's initializer is :data:`MANAGER_INIT`, source code run by ``exec`` (a builtin), not a
function of this package: unpickling a function imports its package, and this package imports
torch. The rank waits for its manager to start; with the source the manager is up in ~0.05 s
instead of ~1.3 s (measured on 2 cores), and imports torch only later, when the first write
results (torch objects) reach it during a save.
"""

from __future__ import annotations

import functools
import os
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


# In a child: be SIGKILLed when the parent exits (and leave now if it already has). Source code, so
# that the manager can run it without importing this package (module docstring).
DIE_WITH_PARENT = f"""
import ctypes, os, signal
parent = os.getppid()
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL, 0, 0, 0) == 0 \\
        and os.getppid() != parent:  # the parent died before prctl took effect
    os._exit(1)
"""  # prctl refused (not permitted here): the child just outlives its parent, as before

# The write-results manager: dies with its rank, and ignores the stop signals a scheduler sends to
# every process of a job step (``scancel --signal=USR1``, srun forwarding SIGTERM): the rank
# decides what they mean and still needs its manager for the save they ask for.
MANAGER_INIT = DIE_WITH_PARENT + """
for name in ("SIGUSR1", "SIGTERM", "SIGINT"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
"""


def die_with_parent() -> None:
    """In a forked child: :data:`DIE_WITH_PARENT`."""
    exec(DIE_WITH_PARENT, {})


@functools.cache  # once per process
def tie_children_to_this_process() -> bool:
    """Return whether the helpers are tied (Linux), see the module docstring."""
    if not sys.platform.startswith("linux"):
        return False
    os.register_at_fork(after_in_child=die_with_parent)
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp

    if filesystem_async._results_queue is None:
        # at exit, multiprocessing asks the manager to shut down and waits shutdown_timeout for
        # it, then sends a SIGTERM (ignored, above), waits again and kills it: 2 s per rank at
        # the default 1 s, for a process that holds only a queue nobody reads any more
        manager = SyncManager(ctx=mp.get_context("spawn"), shutdown_timeout=0.1)
        manager.start(initializer=exec, initargs=(MANAGER_INIT, {}))
        filesystem_async._results_queue = manager.Queue()  # its proxy keeps the manager alive
    return True
