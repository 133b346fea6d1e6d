"""Preemption: SIGTERM / SIGINT ask the run to finish its step, checkpoint and exit 0; a second signal exits at once.

Slurm and Kubernetes signal every process of a job at once: the launcher, every rank, every DataLoader worker. Only
the ranks act on it. The launcher started by launch/pretrain.sh runs with both signals blocked (DeepSpeed's launcher
would otherwise forward a second SIGTERM to every rank and kill them 30 s later); each rank unblocks them here, and
DataLoader workers ignore them so that the current step can still read its batches. The ranks agree on the stop step
through a flag all-reduced once per step (trainer/train.py), so a signal seen by one rank stops them all together.
"""

from __future__ import annotations

import logging
import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger("trainer")


class StopRequest:
    """Set by the first SIGTERM/SIGINT; the handler then gives both signals back to the default (exit at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        """Unblock the signals (the launcher blocks them, and children inherit the mask) and handle them."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        for s in SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        # A log call from a signal handler may interleave with another line; that costs nothing here.
        log.warning("rank %s: %s received: finishing this step, then checkpoint and exit (send it again to exit "
                    "now)", os.environ.get("RANK", "0"), signal.Signals(signum).name)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: the parent rank handles preemption; a worker must live to finish the step."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def end_loader_workers() -> None:
    """SIGKILL this rank's remaining DataLoader workers (its daemonic multiprocessing children).

    They ignore SIGTERM (above), so at interpreter exit multiprocessing's terminate() cannot end them and its join
    waits forever. A rank leaving on an error (a dead peer in a collective) still holds its loader iterator in the
    traceback, so the workers are never told to stop: without this the rank, and the job, hang at exit.
    """
    import multiprocessing

    # torch's SIGCHLD handler raises in this process when a worker dies by a signal; we are leaving anyway.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(timeout=5)


STOP = StopRequest()
