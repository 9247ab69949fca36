"""Ctrl-C and SIGTERM as a clean stop: finish the current optimiser step, save a checkpoint, exit.

Clusters send SIGTERM before they preempt a job, and a user presses Ctrl-C; either should leave a
checkpoint from which ``resume=auto`` continues exactly as if nothing had happened. Stopping in the
middle of a step cannot give that (the momentum model and the queues move inside the step), so the
signal only sets a flag: the loop stops at the next step boundary, where the state is the state a
regular checkpoint holds. A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("softmask")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The command stopped on a signal after saving its state; the message says where.

    ``resume_override``: what to add to the same command line to continue ("resume=auto" for a training
    run; "" when the same command continues by itself, as the demo does). ``exit_code`` is the shell's
    convention for a signal: 128 + the signal number (130 for Ctrl-C).
    """

    def __init__(self, message: str, signum: int = signal.SIGINT, resume_override: str = "resume=auto") -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.resume_override = resume_override


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


class StopRequest:
    """While installed (a context manager, or :meth:`install` / :meth:`restore`), SIGINT and SIGTERM
    set :attr:`signum` instead of interrupting.

    Only the process that entered it reacts (DataLoader workers forked inside inherit the handler and
    ignore the signal, so they keep feeding the last step). A second SIGINT raises KeyboardInterrupt.
    Outside the main thread (signals cannot be caught there) it does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker: the main process decides
            return
        if self.signum is None:
            self.signum = signum
            log.warning(f"{signal_name(signum)} received: stopping after this step with a checkpoint "
                        "(press Ctrl-C again to stop at once, without saving)")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def install(self) -> None:
        """Catch SIGINT and SIGTERM from now on (in the main thread; elsewhere signals cannot be caught)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
