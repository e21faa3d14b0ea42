"""Settings for the hostile-input (fuzz) targets.

Every test that feeds untrusted bytes to a parser or a handler is marked
``@pytest.mark.fuzz`` and takes its Hypothesis settings from ``fuzz_settings``:
a bounded number of examples in ``make test``, a hundred times more in
``make fuzz`` (``IPSEC_CLUSTER_FUZZ=1``; ``IPSEC_CLUSTER_FUZZ_FACTOR`` scales it).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

#: set by ``make fuzz``
FUZZ = os.environ.get("IPSEC_CLUSTER_FUZZ") == "1"
FACTOR = int(os.environ.get("IPSEC_CLUSTER_FUZZ_FACTOR", "100")) if FUZZ else 1


def fuzz_settings(examples: int, **kwargs: Any) -> settings:
    """``examples`` in the quick loop, ``examples * FACTOR`` under ``make fuzz``."""
    return settings(max_examples=examples * FACTOR, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much],
                    **kwargs)
