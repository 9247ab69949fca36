"""Bad samples during training: skipped and counted, logged at a bounded rate, and a stop when the
data mostly cannot be read (a wrong ``data.image_root`` must not spin forever filling the log).

The rule: when more than ``max_share`` of the last ``window`` samples read were bad (or of all the
samples of an epoch, for data smaller than the window), training stops with one line naming how many
failed, an example, and the setting to check. The first ``log_first`` bad samples are logged one by
one; later ones are summarised at most once per ``summary_every_s`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections import deque

log = logging.getLogger("softmask")


class BadDataError(RuntimeError):
    """The training data cannot be read (too many bad samples); nothing was trained on it."""


class BadSampleMonitor:
    """Watches the batches' bad samples. Call :meth:`record` per batch and :meth:`end_epoch` per epoch.

    Args:
        max_share: the share of bad samples (0-1) over the window above which training stops.
        window: how many of the most recent samples the share is taken over.
        hint: what to check, for the stop message (e.g. "data.image_root (now '/data')").
        log_first: bad samples logged one by one before summaries start.
        summary_every_s: at most one summary line per this many seconds.
    """

    def __init__(self, max_share: float, window: int, hint: str, log_first: int = 10,
                 summary_every_s: float = 60.0) -> None:
        self.max_share, self.window, self.hint = max_share, window, hint
        self.log_first, self.summary_every_s = log_first, summary_every_s
        self._recent: deque[tuple[int, int]] = deque()  # (good, bad) per batch, newest last
        self._recent_total = 0
        self.total_read = self.total_bad = 0
        self._epoch_good = self._epoch_read = 0
        self._logged = self._unlogged = 0
        self._last_example = ""
        self._last_summary = time.monotonic()

    def record(self, good: int, bad: list[str], *, bad_elsewhere: int = 0) -> None:
        """One batch: ``good`` samples, the messages of this rank's ``bad`` ones, and the count of bad
        samples on other ranks (counted, not logged here).

        Raises:
            BadDataError: the share of bad samples over the window exceeds ``max_share``.
        """
        n_bad = len(bad) + bad_elsewhere
        self.total_read += good + n_bad
        self.total_bad += n_bad
        self._epoch_good += good
        self._epoch_read += good + n_bad
        for message in bad:
            self._last_example = message
            if self._logged < self.log_first:
                log.warning(f"skipped bad sample: {message}")
                self._logged += 1
            else:
                self._unlogged += 1
        if self._unlogged and time.monotonic() - self._last_summary >= self.summary_every_s:
            self.summary()
        self._recent.append((good, n_bad))
        self._recent_total += good + n_bad
        while self._recent and self._recent_total - sum(self._recent[0]) >= self.window:
            self._recent_total -= sum(self._recent.popleft())
        if self._recent_total >= self.window:
            self._check(self._recent_total, sum(b for _, b in self._recent), f"of the last {self._recent_total}")

    def end_epoch(self) -> None:
        """Raises BadDataError when the epoch (smaller than the window) was mostly bad, or had no good sample."""
        read, good = self._epoch_read, self._epoch_good
        self._epoch_read = self._epoch_good = 0
        if read and (good == 0 or read < self.window):
            self._check(read, read - good, f"of the {read} in an epoch")

    def _check(self, read: int, bad: int, which: str) -> None:
        if bad == 0 or (bad / read <= self.max_share and bad < read):
            return
        raise BadDataError(
            f"{bad} {which} samples could not be read ({bad / read:.0%}; data.max_bad_share is "
            f"{self.max_share:g}), e.g. {self._last_example}. Check {self.hint}")

    def summary(self) -> None:
        """Log the bad samples not logged one by one since the last summary (if any)."""
        if self._unlogged:
            share = self.total_bad / max(1, self.total_read)
            log.warning(f"skipped {self._unlogged} more bad samples ({self.total_bad} of {self.total_read} read so "
                        f"far, {share:.1%}), e.g. {self._last_example}")
            self._unlogged = 0
        self._last_summary = time.monotonic()
