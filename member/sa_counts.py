"""Per-connection SA counts of one member: what its heartbeat reports and the
metrics label (at most MAX_CONNECTION_LABELS names per member, the rest summed
as ``_other``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from member.worker import Member

#: per member and kind, connection (or child) names with their own label value
MAX_CONNECTION_LABELS = 32
#: the label value of the connections beyond MAX_CONNECTION_LABELS
OTHER = "_other"
#: heartbeat counter prefixes of the per-connection counts (member/process.py)
CONN_IKE, CONN_CHILD = "conn.ike.", "conn.child."


def sa_counts_by_connection(member: Member) -> dict[str, int]:
    """``conn.ike.NAME`` (established IKE SAs) and ``conn.child.NAME`` (child
    SAs) of one member, the heartbeat counters behind the labelled metrics."""
    ike = Counter(sa.name for sa in member.engine.established())
    child = Counter(route.name for route in member.by_spi.values())
    out: dict[str, int] = {}
    for prefix, counts in ((CONN_IKE, ike), (CONN_CHILD, child)):
        for name, n in _capped(counts).items():
            out[prefix + name[:64]] = n
    return out


def _capped(counts: Counter[str]) -> dict[str, int]:
    names = sorted(counts)
    kept = {name: counts[name] for name in names[:MAX_CONNECTION_LABELS]}
    rest = sum(counts[name] for name in names[MAX_CONNECTION_LABELS:])
    if rest:
        kept[OTHER] = rest
    return kept
