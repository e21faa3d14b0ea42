"""Placement: which member carries what, as pure functions.

The dispatcher's membership machine (common/cluster/membership.py) uses
these to spread and heal backups and to pace the autobalance of a joining
member; a member (member/process.py) uses them to read the loads the
dispatcher tells it and to place a new child SA on the least loaded member.

Rules of this file:
- Nothing here changes a table: functions return the moves (``SegmentMove``)
  or the segments to move; the caller applies them.
- Ties are broken by a fixed order (member ids, the table's member order,
  segment numbers), so the same inputs give the same plan in every process.
- A "load" is the number of child SAs a member carries (their inbound SPIs
  are routed to it); a segment's load is the number of child SAs whose
  inbound SPI falls in it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping

from common.cluster.segments import SegmentMove, SegmentTable
from common.cluster.spi import segment_of_esp_spi

#: autobalance: one step every so often; a segment moves this long after its
#: future owner became its backup (time for the bulk transfer); segments
#: prepared per step
AUTOBALANCE_STEP_S = 0.25
PREPARE_S = 1.0
JOIN_BATCH = 32


# -- loads ---------------------------------------------------------------------------


def member_loads(carriers: Iterable[int], members: Iterable[int]) -> dict[int, int]:
    """Member -> child SAs it carries, for each of ``members`` (0 when none),
    from ``carriers``: the member carrying each child SA."""
    loads = Counter(carriers)
    return {m: loads.get(m, 0) for m in members}


def segment_loads(children: Iterable[int], segment_bits: int) -> Counter[int]:
    """Segment -> child SAs whose inbound SPI (``children``) falls in it."""
    return Counter(segment_of_esp_spi(c, segment_bits) for c in children)


def read_loads(loads: Mapping[int, int], max_member: int) -> tuple[dict[int, int], int]:
    """A member's reading of the loads the dispatcher sent: (member id ->
    children it carries, how many entries named no member id in
    1..``max_member`` and were left out)."""
    out = {m: n for m, n in loads.items() if 1 <= m <= max_member}
    return out, len(loads) - len(out)


def least_loaded(table: SegmentTable, loads: Mapping[int, int], me: int) -> int | None:
    """The member a new child SA goes to: among the members owning segments,
    the one carrying the fewest children (``loads``), ``me`` on a tie, then
    the first in the table's member order; None when nobody owns a segment."""
    members = [m for m in table.members if table.segments_of(m)]
    if not members:
        return None
    return min(members, key=lambda m: (loads.get(m, 0), m != me))


# -- backups -------------------------------------------------------------------------


def spread_backups(table: SegmentTable) -> list[SegmentMove]:
    """Moves that make each member's segments backed up by all the others in
    turn, so that when it dies its load is split among the survivors, not
    dumped on one (nothing to do with fewer than three members)."""
    members = sorted(table.members)
    moves = []
    for m in members:
        others = [o for o in members if o != m]
        if len(others) < 2:
            continue
        for i, s in enumerate(table.segments_of(m)):
            want = others[i % len(others)]
            if table.backup(s) != want:
                moves.append(SegmentMove(s, m, m, want))
    return moves


def heal_backups(table: SegmentTable, alive: Collection[int]) -> list[SegmentMove]:
    """Moves that give every segment a live backup again where a live member
    of the table can be one (after deaths, and when a member comes back):
    otherwise its SAs would go on unreplicated for good. The least busy
    backup first (ties: lowest id)."""
    live = [m for m in table.members if m in alive]
    if len(live) < 2:
        return []
    duty = {m: len(table.backups_of(m)) for m in live}
    moves = []
    for s in range(table.segments):
        owner, backup = table.owner(s), table.backup(s)
        if owner is None or (backup in duty and backup != owner):
            continue
        candidates = [m for m in live if m != owner]
        if not candidates:
            continue
        pick = min(candidates, key=lambda m: (duty[m], m))
        duty[pick] += 1
        moves.append(SegmentMove(s, owner, owner, pick))
    return moves


def backup_missing(table: SegmentTable, member: int, alive: Collection[int]) -> bool:
    """True when some segment of ``member`` has no live backup: its SAs go on
    unreplicated (a death would lose them)."""
    for s in table.segments_of(member):
        b = table.backup(s)
        if b is None or b not in alive:
            return True
    return False


# -- autobalance -----------------------------------------------------------------------


def fair_share(table: SegmentTable, live: int) -> int:
    """Segments each of ``live`` members should own."""
    return table.segments // max(1, live)


def donor_segments(table: SegmentTable, member: int, n: int, children: Mapping[int, int],
                   alive: Collection[int], prepared: Mapping[int, tuple[int, float]]
                   ) -> list[int]:
    """At most ``n`` segments to give ``member``: first segments carrying
    child SAs (``children``: segment -> count), from the members carrying the
    most, until it carries its fair share of children (so traffic, not only
    segment counts, comes back to a rejoining member); then empty segments
    from the members owning most. ``prepared`` (segment -> (future owner,
    since)) are already on their way and are not picked again."""
    t = table
    owned = {m: t.segments_of(m) for m in t.members}
    load = {m: sum(children.get(s, 0) for s in segs) for m, segs in owned.items()}
    counts = {m: len(segs) for m, segs in owned.items()}
    live = [m for m in t.members if m in alive]
    fair_children = sum(load.values()) // max(1, len(live))
    taken = set(prepared)
    for s, (m, _since) in prepared.items():   # already on their way
        if m == member:
            owner = t.owner(s)
            if owner in load:
                load[owner] -= children.get(s, 0)
            load[member] = load.get(member, 0) + children.get(s, 0)
    out: list[int] = []
    while len(out) < n and load.get(member, 0) < fair_children:
        donor = max((m for m in owned if m != member), key=lambda m: load[m], default=None)
        if donor is None:
            break
        segs = [s for s in owned[donor] if s not in taken and children.get(s, 0)]
        segs = [s for s in segs if load[donor] - children[s] >= load.get(member, 0)]
        if not segs:
            break
        pick = min(segs, key=lambda s: children[s])
        out.append(pick)
        taken.add(pick)
        load[donor] -= children[pick]
        load[member] = load.get(member, 0) + children[pick]
        counts[donor] -= 1
        counts[member] = counts.get(member, 0) + 1
    while len(out) < n:
        donor = max((m for m in counts if m != member), key=lambda m: counts[m], default=None)
        if donor is None or counts[donor] <= counts.get(member, 0) + 1:
            break
        segs = [s for s in owned[donor] if s not in taken and not children.get(s, 0)]
        if not segs:
            break
        out.append(segs[-1])
        taken.add(segs[-1])
        counts[donor] -= 1
        counts[member] = counts.get(member, 0) + 1
    return out
