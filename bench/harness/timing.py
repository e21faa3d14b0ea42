"""The one way the micro-benchmarks time a call: pytest-benchmark's
``pedantic`` with warm-up, the best round, per packet of the batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def best_us_per_packet(benchmark: Any, fn: Callable[[], object], *, rounds: int,
                       per_call: int, setup: Callable[[], None] | None = None) -> float:
    """Time ``fn`` (``per_call`` packets a call) over ``rounds`` rounds, each
    after ``setup`` when given; the best round in microseconds per packet."""
    def target() -> None:
        fn()
    if setup is None:
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=5)
    else:
        def with_setup() -> tuple[tuple[object, ...], dict[str, object]]:
            setup()
            return (), {}
        benchmark.pedantic(target, setup=with_setup, rounds=rounds, warmup_rounds=5)
    return float(benchmark.stats.stats.min) / per_call * 1e6
