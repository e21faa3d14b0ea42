"""Shared fixtures, and the skip-or-fail rule for lab tests.

Tests marked ``interop`` (root, namespaces, strongSwan) or ``netns`` (root,
namespaces) are skipped with the precise reason when the lab cannot run here;
with IPSEC_CLUSTER_REQUIRE_INTEROP=1 (CI) they FAIL with that reason instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.netns import Lab, lab_unavailable_reason

REQUIRE_ENV = "IPSEC_CLUSTER_REQUIRE_INTEROP"


@functools.cache
def _reason(need_charon: bool) -> str | None:
    return lab_unavailable_reason(need_charon=need_charon)


def _require_lab(need_charon: bool) -> None:
    reason = _reason(need_charon)
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the lab cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("interop") is not None:
        _require_lab(need_charon=True)
    elif item.get_closest_marker("netns") is not None:
        _require_lab(need_charon=False)


@pytest.fixture(scope="session")
def lab_available() -> str | None:
    """None if the full lab (incl. strongSwan) can run here, else the reason."""
    return _reason(True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A fresh Lab per test; its namespaces and processes are gone afterwards.

    Charon run dirs (configs, charon.log) stay in the test's tmp_path.
    """
    _require_lab(need_charon=False)
    lb = Lab(workdir=tmp_path)
    try:
        yield lb
    finally:
        lb.close()
