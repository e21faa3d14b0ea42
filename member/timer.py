"""The one timer a shell keeps for its core (aioquic style: after every call
into the core, re-arm a single timer at ``core.get_timer()``). Shared by the
single-process gateway (dispatcher/gateway.py) and the member process
(member/process.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class CoreTimer:
    """Re-arms one ``loop.call_at`` at the core's next deadline. The deadline
    is kept here: uvloop's ``call_at`` returns a plain ``Handle`` without
    ``when()`` for a deadline already past."""

    __slots__ = ("_fire", "_handle", "_when")

    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._handle: asyncio.Handle | None = None
        self._when = 0.0

    def arm(self, loop: asyncio.AbstractEventLoop, when: float | None) -> None:
        if self._handle is not None:
            if when is not None and abs(self._when - when) < 1e-3:
                return
            self._handle.cancel()
            self._handle = None
        if when is not None:
            self._handle = loop.call_at(when, self._fired)
            self._when = when

    def _fired(self) -> None:
        self._handle = None
        self._fire()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
