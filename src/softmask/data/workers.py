"""What every worker process does first: training DataLoader workers, and the pools that draw worlds."""

from __future__ import annotations

import signal


def ignore_ctrl_c(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore SIGINT in the worker.

    A terminal's Ctrl-C reaches every process of the foreground job, DataLoader workers included; the
    training process then stops at the next step boundary with a checkpoint (:mod:`softmask.train.stop`)
    and needs its workers until then. SIGTERM keeps PyTorch's handling (the loader ends its workers
    with it); when a cluster sends it to every process, the loop saves at the step boundary where
    the data stopped.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pool_worker_signals() -> None:
    """``multiprocessing.Pool`` initializer: ignore SIGINT (the parent stops the pool on Ctrl-C) and
    die quietly on SIGTERM, which ``Pool.terminate`` (the end of a ``with Pool(...)`` block) sends; a
    forked worker would otherwise inherit the command line's SIGTERM handler and print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
