"""Pick the ESP implementation (compiled or pure Python) for the SAs a test builds.

``use_impl("fast", monkeypatch)`` makes new SAs use ``common.esp._esp_fast``;
``use_impl("pure", monkeypatch)`` the pure-Python reference.  When the
extension is not built the fast variant is skipped with the reason, or FAILS
when IPSEC_CLUSTER_REQUIRE_INTEROP=1 (CI), so CI proves the fast path.
"""

from __future__ import annotations

import importlib
import os

import pytest

from common.esp import transforms as esp

IMPLS = ("fast", "pure")
REQUIRE_ENV = "IPSEC_CLUSTER_REQUIRE_INTEROP"


def compiled() -> type:
    """The compiled ``SaCipher`` class; skip (or fail under CI) without it."""
    try:
        return importlib.import_module("common.esp._esp_fast").SaCipher  # type: ignore[no-any-return]
    except ImportError as exc:
        reason = (f"common.esp._esp_fast is not built ({exc}); "
                  "install libssl-dev and a C compiler, then `pip install -e .`")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)


def use_impl(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAs created from now on in this test use ``impl`` ("fast" or "pure")."""
    monkeypatch.setattr(esp, "_compiled", compiled() if impl == "fast" else None)
