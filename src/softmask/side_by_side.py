"""Run ``softmask`` commands as child processes, several at a time, each logging to its own file.

Used by the demo (both methods train at once) and ``benchmarks/world_study.py`` (many runs). On a
small CPU, two single-threaded processes side by side train ~1.3x faster in all than one process
with two threads, and two multi-threaded torch processes at once are far slower than either
(BENCHMARKS.md): give each child ``threads_per_process(parallel)`` threads.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("softmask")


def softmask_command(*args: str, quiet: bool = True) -> list[str]:
    """``python -m softmask [-q] ARGS`` with this interpreter."""
    return [sys.executable, "-m", "softmask", *(["-q"] if quiet else []), *args]


def threads_per_process(parallel: int) -> int:
    """CPU threads for each of ``parallel`` processes sharing this machine (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel))


def run_side_by_side(commands: Sequence[tuple[list[str], Path]], parallel: int, env: Mapping[str, str] | None = None,
                     cwd: str | Path | None = None, poll: Callable[[], None] | None = None,
                     poll_every_s: float = 30.0) -> list[int]:
    """Run ``(command, log_file)`` pairs ``parallel`` at a time; returns the exit codes in order.

    Each log file starts with the command line, then the command's stdout and stderr. ``poll``, when
    given, is called every ``poll_every_s`` seconds while anything runs (e.g. to report progress).
    """
    codes: list[int | None] = [None] * len(commands)
    running: dict[int, subprocess.Popen] = {}
    pending = list(range(len(commands)))
    last_poll = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                i = pending.pop(0)
                cmd, log_file = commands[i]
                Path(log_file).parent.mkdir(parents=True, exist_ok=True)
                with open(log_file, "w") as handle:
                    handle.write(" ".join(cmd) + "\n")
                    handle.flush()
                    running[i] = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                                  env=None if env is None else dict(env), cwd=cwd)
            for i, proc in list(running.items()):
                if proc.poll() is not None:
                    codes[i] = proc.returncode
                    del running[i]
            if poll is not None and time.monotonic() - last_poll >= poll_every_s:
                poll()
                last_poll = time.monotonic()
            time.sleep(0.5)
    except KeyboardInterrupt:
        if running:
            log.warning(f"stopping {len(running)} running command(s): a training run finishes its step and saves a "
                        "checkpoint first")
        raise
    finally:  # interrupted: do not leave children running in the background. SIGTERM makes a training
        for proc in running.values():  # child stop at its next step boundary with a checkpoint
            proc.terminate()
        for proc in running.values():
            proc.wait()
    return [int(c) for c in codes]
