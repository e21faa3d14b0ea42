"""Waiting for a condition with a deadline and a diagnostic."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, predicate: Callable[[], T | None], *, timeout: float = 20.0,
             interval: float = 0.2, diag: Callable[[], str] = lambda: "") -> T:
    """Poll ``predicate`` until it returns something truthy and return that;
    AssertionError (a failed check, for the tests) naming ``what``, with
    ``diag()``, on timeout."""
    end = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diag()}")
        time.sleep(interval)
