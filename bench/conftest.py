"""The benches as plain tests: with ``--benchmark-disable`` pytest-benchmark
runs a benchmarked function once and keeps no statistics, but the benches
read theirs (``benchmark.stats.stats.min``) for their tables. Here the
disabled fixture times that one run and keeps it as the statistics: every
bench runs its code path once and its checks hold."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture


class OneRun(BenchmarkFixture):
    """A disabled ``benchmark`` fixture whose one run is timed: ``stats.stats``
    has that time as min, max, mean and median."""

    def _timed(self, target: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                self.stats = SimpleNamespace(stats=SimpleNamespace(
                    min=took, max=took, mean=took, median=took, rounds=1))
        return run

    def __call__(self, function_to_benchmark: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> Any:
        return super().__call__(self._timed(function_to_benchmark), *args, **kwargs)

    def pedantic(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return super().pedantic(self._timed(target), *args, **kwargs)


@pytest.fixture
def benchmark(benchmark: BenchmarkFixture) -> BenchmarkFixture:
    """pytest-benchmark's fixture; when disabled, one timed run (``OneRun``)."""
    if benchmark.disabled:
        benchmark.__class__ = OneRun
    return benchmark
