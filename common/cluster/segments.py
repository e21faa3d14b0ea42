"""The segment table: segment -> (owner member, backup member, epoch).

Rules of this file:
- Segments, not members, move (docs/routing.md). SPIs carry their segment
  in their top bits, so a row rewrite re-routes every SA of that segment at
  once and no SPI ever changes.
- Every segment has exactly one owner once the table is assigned (RFC 6027
  §3.7 "sticky": one sender per SA), and its backup, when there is one, is a
  different member.
- Every change (``assign``, ``hot_standby``, ``fail_over``, ``apply``) bumps
  the table epoch exactly once; a row remembers the epoch it last changed in.
  Planning (``join``, ``join_plan``, ``diff``) changes nothing.
- A ``SegmentMove`` names one segment and its new (owner, backup); applying a
  list of moves touches exactly the segments it names. ``apply`` refuses a
  move whose ``old_owner`` is not the current owner (a stale plan).
- Ties are broken by the members' order (the order of ``assign``, then of
  joining), so every process computes the same moves from the same table.
- ``decode`` reads bytes from the network: bad bytes raise ``MalformedMessage``
  and nothing else.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.errors import LocalProtocolError, MalformedMessage

DEFAULT_SEGMENT_BITS = 8
MAX_SEGMENT_BITS = 16
MAX_MEMBER_ID = 0xFFFF
NO_MEMBER = 0  # on the wire only; the API says None
TABLE_VERSION = 1

# version, segment_bits, mode, reserved, epoch, member count
_HEAD = struct.Struct("!BBBBQH")
_MEMBER = struct.Struct("!H")
# owner, backup, row epoch
_ROW = struct.Struct("!HHQ")


class TableMode(enum.IntEnum):
    LOAD_SHARING = 0
    HOT_STANDBY = 1


@dataclass(slots=True, frozen=True)
class SegmentMove:
    """Segment ``segment`` passes from ``old_owner`` to ``new_owner`` (the same
    member when only the backup changes), with ``new_backup`` as its backup."""

    segment: int
    old_owner: int | None
    new_owner: int | None
    new_backup: int | None


def _check_member(member: object) -> int:
    if isinstance(member, bool) or not isinstance(member, int) \
            or not 1 <= member <= MAX_MEMBER_ID:
        raise ValueError(f"member id must be an int in 1..{MAX_MEMBER_ID}, got {member!r}")
    return member


def _opt(member: int) -> int | None:
    return None if member == NO_MEMBER else member


class SegmentTable:
    """Maps each of ``2**segment_bits`` segments to an owner and a backup."""

    __slots__ = ("_backup", "_epoch", "_members", "_mode", "_owner", "_row_epoch",
                 "_segment_bits")

    def __init__(self, segment_bits: int = DEFAULT_SEGMENT_BITS) -> None:
        if isinstance(segment_bits, bool) or not isinstance(segment_bits, int) \
                or not 0 <= segment_bits <= MAX_SEGMENT_BITS:
            raise ValueError(f"segment_bits must be an int in 0..{MAX_SEGMENT_BITS}, "
                             f"got {segment_bits!r}")
        self._segment_bits = segment_bits
        n = 1 << segment_bits
        self._owner = [NO_MEMBER] * n
        self._backup = [NO_MEMBER] * n
        self._row_epoch = [0] * n
        self._epoch = 0
        self._members: list[int] = []
        self._mode = TableMode.LOAD_SHARING

    # -- reading ------------------------------------------------------------------

    @property
    def segment_bits(self) -> int:
        return self._segment_bits

    @property
    def segments(self) -> int:
        return len(self._owner)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def mode(self) -> TableMode:
        return self._mode

    @property
    def members(self) -> tuple[int, ...]:
        """The live members, in tie-breaking order."""
        return tuple(self._members)

    def _check_segment(self, segment: int) -> int:
        if not 0 <= segment < len(self._owner):
            raise ValueError(f"segment {segment} out of 0..{len(self._owner) - 1}")
        return segment

    def owner(self, segment: int) -> int | None:
        return _opt(self._owner[self._check_segment(segment)])

    def backup(self, segment: int) -> int | None:
        return _opt(self._backup[self._check_segment(segment)])

    def row_epoch(self, segment: int) -> int:
        """The table epoch in which this segment's row last changed."""
        return self._row_epoch[self._check_segment(segment)]

    def segments_of(self, member: int) -> list[int]:
        return [s for s, o in enumerate(self._owner) if o == member]

    def backups_of(self, member: int) -> list[int]:
        return [s for s, b in enumerate(self._backup) if b == member]

    def copy(self) -> SegmentTable:
        other = SegmentTable(self._segment_bits)
        other._owner = list(self._owner)
        other._backup = list(self._backup)
        other._row_epoch = list(self._row_epoch)
        other._epoch = self._epoch
        other._members = list(self._members)
        other._mode = self._mode
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SegmentTable):
            return NotImplemented
        return (self._segment_bits, self._epoch, self._mode, self._members, self._owner,
                self._backup, self._row_epoch) == (
            other._segment_bits, other._epoch, other._mode, other._members, other._owner,
            other._backup, other._row_epoch)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        load = {m: len(self.segments_of(m)) for m in self._members}
        return (f"SegmentTable(bits={self._segment_bits}, epoch={self._epoch}, "
                f"mode={self._mode.name}, owned={load})")

    # -- whole-table changes ---------------------------------------------------------

    def assign(self, members: Sequence[int]) -> SegmentTable:
        """Spread the segments round-robin over ``members``; the backup of a
        segment is the next member in the ring (none with one member)."""
        ids = self._check_members(members)
        if not ids:
            raise ValueError("assign needs at least one member")
        m = len(ids)
        for s in range(len(self._owner)):
            self._owner[s] = ids[s % m]
            self._backup[s] = ids[(s + 1) % m] if m > 1 else NO_MEMBER
        self._members = ids
        self._mode = TableMode.LOAD_SHARING
        self._bump(range(len(self._owner)))
        return self

    def hot_standby(self, active: int, standbys: Sequence[int]) -> SegmentTable:
        """Every segment owned by ``active``, backed up by the first standby;
        the other standbys take over in their order."""
        ids = self._check_members([active, *standbys])
        first = ids[1] if len(ids) > 1 else NO_MEMBER
        self._owner = [ids[0]] * len(self._owner)
        self._backup = [first] * len(self._owner)
        self._members = ids
        self._mode = TableMode.HOT_STANDBY
        self._bump(range(len(self._owner)))
        return self

    @staticmethod
    def _check_members(members: Iterable[int]) -> list[int]:
        ids = [_check_member(m) for m in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate member ids in {ids}")
        return ids

    def _bump(self, changed: Iterable[int]) -> None:
        self._epoch += 1
        for s in changed:
            self._row_epoch[s] = self._epoch

    def restore(self, other: SegmentTable, epoch: int) -> None:
        """Become ``other`` (a table a member reported to a dispatcher that
        lost its own: docs/failover.md "Reattach") at ``epoch``, which is never
        below ``other``'s or our own (an epoch never goes back), in place:
        whoever holds this table sees the new rows."""
        if other.segment_bits != self._segment_bits:
            raise ValueError(f"a table of {other.segment_bits} segment bits, "
                             f"ours has {self._segment_bits}")
        if epoch < max(other.epoch, self._epoch):
            raise ValueError(f"epoch {epoch} is below {max(other.epoch, self._epoch)}")
        self._owner = list(other._owner)
        self._backup = list(other._backup)
        self._row_epoch = list(other._row_epoch)
        self._members = list(other._members)
        self._mode = other._mode
        self._epoch = epoch

    def advance(self) -> None:
        """One epoch bump without a row change (a table handed out anew)."""
        self._bump(())

    # -- moves -------------------------------------------------------------------

    def apply(self, moves: Sequence[SegmentMove]) -> None:
        """Carry out ``moves`` in order (one epoch bump for all). New members
        named by a move join the member list."""
        if not moves:
            return
        trial = self.copy()
        for mv in moves:
            trial._move(mv)
        self._owner, self._backup, self._members = trial._owner, trial._backup, trial._members
        self._bump({mv.segment for mv in moves})

    def _move(self, mv: SegmentMove) -> None:
        s = self._check_segment(mv.segment)
        if _opt(self._owner[s]) != mv.old_owner:
            raise LocalProtocolError(
                f"stale move {mv}: segment {s} is owned by {_opt(self._owner[s])}")
        owner = NO_MEMBER if mv.new_owner is None else _check_member(mv.new_owner)
        backup = NO_MEMBER if mv.new_backup is None else _check_member(mv.new_backup)
        if backup != NO_MEMBER and backup == owner:
            raise LocalProtocolError(f"move {mv}: owner and backup are the same member")
        if owner == NO_MEMBER and backup != NO_MEMBER:
            raise LocalProtocolError(f"move {mv}: a backup without an owner")
        for m in (owner, backup):
            if m != NO_MEMBER and m not in self._members:
                self._members.append(m)
        self._owner[s] = owner
        self._backup[s] = backup

    def fail_over(self, dead_member: int) -> list[SegmentMove]:
        """``dead_member`` is gone: its segments go to their backups, and every
        segment it owned or backed up gets a new backup among the live members
        (least loaded first; in hot-standby mode the next standby) where one
        exists. One epoch bump (the member list changes even when no row
        does); returns exactly the moves made."""
        if dead_member not in self._members:
            return []
        trial = self.copy()
        trial._members.remove(dead_member)
        owned = trial._load(trial._owner)
        backed = trial._load(trial._backup)
        moves: list[SegmentMove] = []
        for pass_owned in (True, False):
            for s in range(len(self._owner)):
                owner, backup = trial._owner[s], trial._backup[s]
                if pass_owned and owner == dead_member:
                    # No replica: the segment's SAs are lost, but it still needs
                    # an owner so that new SAs can be placed and routed there.
                    if backup != NO_MEMBER:
                        owner = backup
                        backed[owner] -= 1
                    else:
                        owner = trial._pick(owned, NO_MEMBER)
                    owned[owner] = owned.get(owner, 0) + 1
                elif pass_owned or backup != dead_member:
                    continue
                new_backup = trial._pick(backed, owner)
                backed[new_backup] = backed.get(new_backup, 0) + 1
                mv = SegmentMove(s, _opt(trial._owner[s]), _opt(owner), _opt(new_backup))
                trial._move(mv)
                moves.append(mv)
        self._owner, self._backup, self._members = trial._owner, trial._backup, trial._members
        self._bump({mv.segment for mv in moves})
        return moves

    def _load(self, column: list[int]) -> dict[int, int]:
        load = dict.fromkeys(self._members, 0)
        for m in column:
            if m in load:
                load[m] += 1
        return load

    def _pick(self, load: dict[int, int], exclude: int) -> int:
        """The live member with the least ``load``, not ``exclude`` (ties: member
        order; hot standby: simply the first); NO_MEMBER when there is none."""
        best, best_load = NO_MEMBER, -1
        for m in self._members:
            if m == exclude:
                continue
            if self._mode == TableMode.HOT_STANDBY:
                return m
            if best == NO_MEMBER or load[m] < best_load:
                best, best_load = m, load[m]
        return best

    def join(self, member: int) -> list[SegmentMove]:
        """The whole plan that gives a new or returning member its fair share
        (nothing changes until ``apply``)."""
        return self.join_plan(member, len(self._owner) * 3)

    def join_plan(self, member: int, max_moves: int) -> list[SegmentMove]:
        """The next at most ``max_moves`` moves towards ``member``'s fair share
        (autobalance: apply them, hand the state over, ask again; the plan is
        done when this returns []). Order: first backups for segments that
        have none, then owned segments from the most loaded members, then
        backup duties. In hot-standby mode a joining member only ever backs up."""
        _check_member(member)
        trial = self.copy()
        if member not in trial._members:
            trial._members.append(member)
        moves: list[SegmentMove] = []

        def take(mv: SegmentMove) -> bool:
            trial._move(mv)
            moves.append(mv)
            return len(moves) < max_moves

        if max_moves <= 0:
            return moves
        # Segments nobody owns (everyone died) carry no state to hand over: the
        # joining member takes them all at once, whatever max_moves says, so a
        # table with a live member never has an ownerless segment.
        for s in range(len(self._owner)):
            if trial._owner[s] == NO_MEMBER:
                mv = SegmentMove(s, None, member, None)
                trial._move(mv)
                moves.append(mv)
        for s in range(len(self._owner)):
            o = trial._owner[s]
            if o != NO_MEMBER and o != member and trial._backup[s] == NO_MEMBER:
                if not take(SegmentMove(s, o, o, member)):
                    return moves
        if trial._mode == TableMode.LOAD_SHARING:
            while (seg := trial._donor_segment(trial._owner, member)) is not None:
                o, b = trial._owner[seg], trial._backup[seg]
                backup = b if b not in (NO_MEMBER, member) else o
                if not take(SegmentMove(seg, o, member, backup)):
                    return moves
            while (seg := trial._donor_segment(trial._backup, member)) is not None:
                o = trial._owner[seg]
                if not take(SegmentMove(seg, o, o, member)):
                    return moves
        return moves

    def _donor_segment(self, column: list[int], member: int) -> int | None:
        """A segment of the most loaded member in ``column`` when it has at
        least two more entries than ``member`` (moving one then narrows the
        gap); for backups only segments ``member`` does not own qualify."""
        counts = self._load(column)
        mine = counts.get(member, 0)
        for donor in sorted(self._members, key=lambda m: -counts[m]):
            if donor == member or counts[donor] - mine < 2:
                return None
            for s, m in enumerate(column):
                if m == donor and (column is self._owner or self._owner[s] != member):
                    return s
        return None

    def diff(self, other: SegmentTable) -> list[SegmentMove]:
        """The moves that turn this table's rows into ``other``'s."""
        if other._segment_bits != self._segment_bits:
            raise ValueError("tables with different segment_bits cannot be compared")
        return [SegmentMove(s, _opt(self._owner[s]), _opt(other._owner[s]),
                            _opt(other._backup[s]))
                for s in range(len(self._owner))
                if (self._owner[s], self._backup[s]) != (other._owner[s], other._backup[s])]

    # -- wire ------------------------------------------------------------------------

    def encode(self) -> bytes:
        """Version 1: head, member ids (u16 each), then one (owner, backup,
        row epoch) row per segment; 0 means no member."""
        n_members = len(self._members)
        buf = bytearray(_HEAD.size + _MEMBER.size * n_members + _ROW.size * len(self._owner))
        _HEAD.pack_into(buf, 0, TABLE_VERSION, self._segment_bits, self._mode, 0,
                        self._epoch, n_members)
        pos = _HEAD.size
        for m in self._members:
            _MEMBER.pack_into(buf, pos, m)
            pos += _MEMBER.size
        for row in zip(self._owner, self._backup, self._row_epoch, strict=True):
            _ROW.pack_into(buf, pos, *row)
            pos += _ROW.size
        return bytes(buf)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> SegmentTable:
        """Parse and check ``encode``'s output; ``MalformedMessage`` on bad bytes."""
        if len(data) < _HEAD.size:
            raise MalformedMessage(f"segment table: {len(data)} bytes is too short")
        version, bits, mode, reserved, epoch, n_members = _HEAD.unpack_from(data, 0)
        if version != TABLE_VERSION:
            raise MalformedMessage(f"segment table version {version}, we speak {TABLE_VERSION}")
        if bits > MAX_SEGMENT_BITS or reserved != 0 or mode not in (0, 1):
            raise MalformedMessage(f"segment table: bad head bits={bits} mode={mode}")
        n = 1 << bits
        want = _HEAD.size + _MEMBER.size * n_members + _ROW.size * n
        if len(data) != want:
            raise MalformedMessage(f"segment table: {len(data)} bytes, expected {want}")
        members = [_MEMBER.unpack_from(data, _HEAD.size + _MEMBER.size * i)[0]
                   for i in range(n_members)]
        if NO_MEMBER in members or len(set(members)) != len(members):
            raise MalformedMessage(f"segment table: bad member list {members}")
        live = set(members)
        table = cls(bits)
        table._mode = TableMode(mode)
        table._epoch = epoch
        table._members = members
        pos = _HEAD.size + _MEMBER.size * n_members
        for s in range(n):
            owner, backup, row_epoch = _ROW.unpack_from(data, pos)
            pos += _ROW.size
            if (owner != NO_MEMBER and owner not in live) or \
                    (backup != NO_MEMBER and (backup not in live or backup == owner
                                              or owner == NO_MEMBER)) or row_epoch > epoch:
                raise MalformedMessage(f"segment table: bad row {s}: "
                                       f"{owner}, {backup}, epoch {row_epoch}")
            table._owner[s], table._backup[s], table._row_epoch[s] = owner, backup, row_epoch
        return table
