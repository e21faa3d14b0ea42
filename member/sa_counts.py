"""Per-connection SA counts of one member: what its heartbeat reports
(``MemberStats.connections``) and the metrics' labels (at most
MAX_CONNECTION_LABELS names per member and kind, the rest summed as ``_other``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from common.cluster.stats import ConnectionCounts

#: per member and kind, connection (or child) names with their own label value
MAX_CONNECTION_LABELS = 32
#: the label value of the connections beyond MAX_CONNECTION_LABELS
OTHER = "_other"
#: longest name kept (longer ones are cut)
MAX_NAME = 64


def connection_counts(ike_names: Iterable[str], child_names: Iterable[str]) -> ConnectionCounts:
    """Established IKE SAs per connection name and child SAs per child name
    (one name per SA) of one member: the figures behind the labelled metrics."""
    return ConnectionCounts(_capped(Counter(n[:MAX_NAME] for n in ike_names)),
                            _capped(Counter(n[:MAX_NAME] for n in child_names)))


def _capped(counts: Counter[str]) -> dict[str, int]:
    names = sorted(counts)
    kept = {name: counts[name] for name in names[:MAX_CONNECTION_LABELS]}
    rest = sum(counts[name] for name in names[MAX_CONNECTION_LABELS:])
    if rest:
        kept[OTHER] = rest
    return kept
