"""Counted, rate-limited refusals: what a shell does with input it will not
act on, and with an exception nobody foresaw in the handling of one message.

Every process loop (the member's live and bulk loops, timers and heartbeat
task, the gateway's datagram/inner/timer paths, the dispatcher's member
frames) is a barrier: one message can be refused or can fail, the loop goes
on. Each refusal and each failure is counted by reason; the log sees it at
most once per (reason, source) per ``LOG_INTERVAL_S``, with the number of
repeats it suppressed, and a traceback at most once per reason, so that a
datagram flood cannot become a log flood.

Reasons: ``<what>`` for a refusal (``push_unknown_transform``,
``sync_not_owner``, ...) and ``bug.<where>.<ExceptionType>`` for an
unexpected exception (``bug.ike.EncryptedWithoutKeys``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

#: a (reason, source) pair is logged at most once per interval
LOG_INTERVAL_S = 10.0
#: distinct reasons kept; beyond, new ones are counted under OVERFLOW_REASON
#: (every reason travels in the member's heartbeat, which has room for 255
#: counters in all)
MAX_REASONS = 64
#: distinct (reason, source) pairs remembered for rate limiting
MAX_SOURCES = 4096
#: log lines per reason per interval, whatever the sources (spoofed source
#: addresses are free: the per-source limit alone would not bound the log)
MAX_LINES_PER_REASON = 10
OVERFLOW_REASON = "other"
#: the prefix of unexpected exceptions' reasons
BUG = "bug"


@dataclass(slots=True)
class _Seen:
    last: float
    suppressed: int


class Refusals:
    """One per process. ``counts`` is what status shows."""

    def __init__(self, log: logging.Logger, *, name: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 interval: float = LOG_INTERVAL_S) -> None:
        self.log = log
        self.name = name
        self.clock = clock
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._traced: set[str] = set()
        #: reason -> (start of its interval, lines logged in it)
        self._lines: dict[str, tuple[float, int]] = {}

    def _reason(self, reason: str) -> str:
        if reason in self.counts or len(self.counts) < MAX_REASONS:
            return reason
        return OVERFLOW_REASON

    def _due(self, reason: str, source: str) -> int | None:
        """Suppressed repeats if this (reason, source) may be logged now, else None."""
        now = self.clock()
        key = (reason, source)
        seen = self._seen.get(key)
        if seen is not None and now - seen.last < self.interval:
            seen.suppressed += 1
            return None
        start, lines = self._lines.get(reason, (now, 0))
        if now - start >= self.interval:
            start, lines = now, 0
        if lines >= MAX_LINES_PER_REASON:
            if seen is not None:
                seen.suppressed += 1
            return None
        self._lines[reason] = (start, lines + 1)
        if seen is None:
            if len(self._seen) >= MAX_SOURCES:
                self._seen.clear()
            self._seen[key] = _Seen(now, 0)
            return 0
        n, seen.last, seen.suppressed = seen.suppressed, now, 0
        return n

    def refuse(self, reason: str, source: object = "", detail: object = "", *,
               what: str = "") -> None:
        """Input we will not act on (malformed, invalid, not ours): counted,
        logged as a WARNING at most once per (reason, source) per interval
        (``what`` names it in the log line; "refused <reason>" by default)."""
        reason = self._reason(reason)
        self.counts[reason] += 1
        src = str(source)
        suppressed = self._due(reason, src)
        if suppressed is None:
            return
        more = f" (and {suppressed} more in {self.interval:.0f} s)" if suppressed else ""
        self.log.warning("%s%s from %s: %s%s", self._who(), what or f"refused {reason}",
                         src or "?", detail, more)

    def failed(self, where: str, exc: BaseException, source: object = "") -> str:
        """An exception nobody foresaw while handling one message: counted as
        ``bug.<where>.<type>``, logged like a refusal, with its traceback the
        first time only. Returns the reason."""
        reason = self._reason(f"{BUG}.{where}.{type(exc).__name__}")
        self.counts[reason] += 1
        src = str(source)
        suppressed = self._due(reason, src)
        if suppressed is None:
            return reason
        more = f" (and {suppressed} more in {self.interval:.0f} s)" if suppressed else ""
        trace = reason not in self._traced
        self._traced.add(reason)
        self.log.error("%s%s from %s failed: %s: %s%s", self._who(), where, src or "?",
                       type(exc).__name__, exc, more, exc_info=exc if trace else None)
        return reason

    def _who(self) -> str:
        return f"{self.name}: " if self.name else ""
