"""Cluster membership as a state machine without I/O.

The dispatcher is the membership authority (docs/failover.md): a HELLO gives
a member incarnation its IV sender id and the segment table; heartbeats keep
it alive; a member that misses ``dead_after`` of them, or whose process
exited, is dead and its segments go to their backups (epoch bumped); every
segment gets a live backup again as soon as one exists; a member that comes
(back) gets its share gradually: first the state (as a backup, bulk
transfer), then the segments (autobalance, common/cluster/placement.py).

Rules of this file:
- No clock, sleep, socket, randomness or logging. The shell passes the time
  in (``tick(now)`` once per heartbeat interval, ``hello(..., now)``,
  ``heartbeat(..., now)``), makes the incarnation's secret (``token``), and
  carries out what every input returns (``Outputs``): the messages to send
  to which member, the table moves made (the cleartext routes follow them),
  the events to publish and the lines to log.
- Only this machine changes ``table``; every change bumps its epoch once and
  is broadcast to the live members as a copy of the table as it was then.
- A dead incarnation stays dead: its heartbeats never make it alive or give
  it segments; only a HELLO (a new incarnation, a new sender id) does, and a
  HELLO for a member whose incarnation is alive is refused.
- Sender ids are handed out 1..MAX_SENDER_ID in turn, skipping every id an
  incarnation we hold (alive or dead) has: no two live incarnations ever
  share one, and a new incarnation never gets its predecessor's.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from common.cluster.events import Event, EventType
from common.cluster.placement import (
    AUTOBALANCE_STEP_S,
    JOIN_BATCH,
    PREPARE_S,
    backup_missing,
    donor_segments,
    fair_share,
    heal_backups,
    member_loads,
    segment_loads,
    spread_backups,
)
from common.cluster.segments import SegmentMove, SegmentTable
from common.cluster.wire import Channel, Heartbeat, TableUpdate
from common.errors import LocalProtocolError
from common.esp.iv import MAX_SENDER_ID

#: how long the dispatcher waits for ``expect_members`` before it starts with
#: whoever came (member processes take a few seconds to start on a loaded host)
STARTUP_WAIT_S = 20.0
#: an event lists the segments it moved up to this many (the event stream
#: refuses longer lists); beyond, the list is left empty
MAX_EVENT_SEGMENTS = 1024


class Carried(Protocol):
    """A child SA the dispatcher routes: the member carrying it."""

    @property
    def member(self) -> int: ...


#: child id (its inbound SPI) -> what carries it
Children = Mapping[int, Carried]
_NO_CHILDREN: Children = MappingProxyType({})


class Level(enum.IntEnum):
    """How loud a log line is (the numbers of Python's logging levels)."""

    INFO = 20
    WARNING = 30


@dataclass(slots=True, frozen=True)
class LogLine:
    level: Level
    text: str


@dataclass(slots=True, frozen=True)
class Send:
    """Send ``message`` to ``member``'s current incarnation."""

    member: int
    message: Heartbeat | TableUpdate


@dataclass(slots=True)
class Outputs:
    """What one input asks the shell to do."""

    sends: list[Send] = field(default_factory=list)
    #: the table moves made (a whole-table assignment lists every row it changed)
    moves: list[SegmentMove] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)
    #: the table's epoch changed (its rows, or only its member list)
    table_changed: bool = False
    #: why the input was refused (nothing else is set then)
    refused: str | None = None

    def log(self, level: Level, text: str) -> None:
        self.logs.append(LogLine(level, text))


@dataclass(slots=True)
class Incarnation:
    """One run of a member process, from its HELLO on."""

    member_id: int
    sender_id: int
    pid: int = 0
    host: str = ""
    last_seen: float = 0.0
    alive: bool = True
    #: heartbeats after it was declared dead were logged (once per incarnation)
    back_logged: bool = False
    #: the incarnation's secret (its HEARTBEAT and BULK channels show it)
    token: int = field(default=0, repr=False)


def _event_segments(segments: list[int]) -> tuple[int, ...]:
    return tuple(sorted(segments)) if len(segments) <= MAX_EVENT_SEGMENTS else ()


class Membership:
    """HELLO, heartbeats, failure detection, the segment table, autobalance."""

    def __init__(self, segment_bits: int, *, expect: int, heartbeat_interval: float,
                 dead_after: int, hot_standby: bool = False, pid: int = 0) -> None:
        """``pid``: the dispatcher's, in the heartbeats it sends."""
        self.table = SegmentTable(segment_bits)
        self.expect = expect
        self.interval = heartbeat_interval
        self.dead_after = dead_after
        self.hot_standby = hot_standby
        self.pid = pid
        self.members: dict[int, Incarnation] = {}
        self.next_sender_id = 1
        #: members getting their share of segments, and segments whose future
        #: owner is already their backup (segment -> (member, since))
        self.balancing: set[int] = set()
        self.prepared: dict[int, tuple[int, float]] = {}
        self._started: float | None = None
        self._last_balance = float("-inf")

    # -- reading ------------------------------------------------------------------------

    def alive(self) -> list[int]:
        """The live members, by id."""
        return sorted(m for m, i in self.members.items() if i.alive)

    def is_alive(self, member: int | None) -> bool:
        inc = self.members.get(member) if member is not None else None
        return inc is not None and inc.alive

    def backup_missing(self, member: int) -> bool:
        """True when some segment of ``member`` has no live backup."""
        return backup_missing(self.table, member, self.alive())

    # -- inputs -------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The monitor starts: the startup wait for ``expect`` counts from now."""
        if self._started is None:
            self._started = now

    def hello(self, member_id: int, pid: int, host: str, token: int, now: float,
              children: Children = _NO_CHILDREN) -> Outputs:
        """A LIVE HELLO: a new incarnation of ``member_id`` (refused while
        its current one is alive: it must be dead or fenced first). It gets
        its sender id and token first, then the table; it is the last one
        ``expect`` waited for (the table is assigned), or it joins the
        autobalance."""
        old = self.members.get(member_id)
        if old is not None and old.alive:
            return Outputs(refused="hello_member_alive")
        out = Outputs()
        sender_id = self._next_sender_id()
        inc = Incarnation(member_id, sender_id, pid, host, now, token=token)
        self.members[member_id] = inc
        self.balancing.discard(member_id)
        out.log(Level.INFO, f"member {member_id} joined (pid {pid} on {host}), sender id "
                            f"{sender_id}{' (restarted)' if old else ''}")
        out.events.append(Event(EventType.MEMBER_JOINED, member=member_id, sender_id=sender_id))
        out.sends.append(Send(member_id, self._own_heartbeat(inc, children)))
        alive = self.alive()
        if not self.table.members and len(alive) >= self.expect:
            self._assign(alive, out)
        else:
            out.sends.append(Send(member_id, TableUpdate(self.table.copy())))
            if self.table.members and member_id not in self.table.members:
                # A new or returning member: it gets state first (as a backup),
                # then segments, a batch at a time (autobalance).
                self.balancing.add(member_id)
        return out

    def answer(self, member_id: int, children: Children = _NO_CHILDREN) -> Outputs:
        """The live incarnation asked again (its HELLO's answer was lost):
        the same answer."""
        out = Outputs()
        inc = self.members.get(member_id)
        if inc is None or not inc.alive:
            out.refused = "hello_no_incarnation"
            return out
        out.sends.append(Send(member_id, self._own_heartbeat(inc, children)))
        out.sends.append(Send(member_id, TableUpdate(self.table.copy())))
        return out

    def heartbeat(self, member_id: int, sender_id: int, now: float,
                  via: Channel = Channel.HEARTBEAT) -> Outputs:
        """A heartbeat of incarnation ``sender_id`` of ``member_id``, on its
        heartbeat connection or its live one. Only the current incarnation's
        count; a dead one stays dead (its live connection's heartbeat is
        logged once: its output is ignored from now on)."""
        out = Outputs()
        inc = self.members.get(member_id)
        if inc is None or inc.sender_id != sender_id:
            return out
        if inc.alive:
            inc.last_seen = now
        elif via is Channel.LIVE:
            inc.last_seen = now
            if not inc.back_logged:
                inc.back_logged = True
                out.log(Level.WARNING, f"member {member_id} (pid {inc.pid}) is back after "
                                       "being declared dead; its output is ignored until it "
                                       "rejoins")
        return out

    def exited(self, member_id: int, pid: int) -> Outputs:
        """The supervisor saw this incarnation's process end: it is dead now,
        not after ``dead_after`` heartbeats, so that its successor's HELLO is
        taken. Another pid (an older incarnation) changes nothing."""
        out = Outputs()
        inc = self.members.get(member_id)
        if inc is not None and inc.alive and inc.pid == pid:
            out.log(Level.WARNING, f"member {member_id} (pid {pid}) exited: fenced")
            self._dead(inc, out, f"process {pid} exited")
        return out

    def tick(self, now: float, children: Children = _NO_CHILDREN) -> Outputs:
        """Once per heartbeat interval: declare dead who missed ``dead_after``
        heartbeats, send everyone else ours (with the loads), start with
        whoever came once the startup wait is over, and every
        AUTOBALANCE_STEP_S heal backups and take the autobalance a step."""
        out = Outputs()
        self.start(now)
        limit = self.interval * self.dead_after
        loads = self._loads(children)
        dead = [i for i in self.members.values() if i.alive and now - i.last_seen > limit]
        for inc in dead:      # (all of them first: no table goes to one about to die)
            inc.alive = False
        for inc in dead:
            self._dead(inc, out, f"no heartbeat for {self.dead_after} intervals")
        for inc in self.members.values():
            if inc.alive:
                out.sends.append(Send(inc.member_id, Heartbeat(0, inc.sender_id, self.pid,
                                                               self.table.epoch, loads=loads)))
        started = self._started if self._started is not None else now
        alive = self.alive()
        if not self.table.members and alive and now - started > STARTUP_WAIT_S:
            # Not everyone came: start with whoever is here.
            self._assign(alive, out)
        if now - self._last_balance >= AUTOBALANCE_STEP_S and self.table.members:
            self._last_balance = now
            self._heal(out)
            if self.balancing:
                self._autobalance(now, children, out)
        return out

    # -- the table ------------------------------------------------------------------------

    def _own_heartbeat(self, inc: Incarnation, children: Children) -> Heartbeat:
        """The answer to a HELLO: the incarnation's sender id and its token."""
        return Heartbeat(0, inc.sender_id, self.pid, self.table.epoch, token=inc.token,
                         loads=self._loads(children))

    def _loads(self, children: Children) -> dict[int, int]:
        return member_loads((c.member for c in children.values()), self.members)

    def _next_sender_id(self) -> int:
        held = {i.sender_id for i in self.members.values()}
        for _ in range(MAX_SENDER_ID):
            sender_id = self.next_sender_id
            self.next_sender_id = sender_id % MAX_SENDER_ID + 1
            if sender_id not in held:
                return sender_id
        raise LocalProtocolError("every IV sender id is held by an incarnation")

    def _changed(self, out: Outputs, moves: list[SegmentMove], reason: str,
                 member: int = 0) -> None:
        out.moves.extend(moves)
        out.table_changed = True
        out.events.append(Event(EventType.SEGMENTS_MOVED, member=member, reason=reason,
                                epoch=self.table.epoch,
                                segments=_event_segments([mv.segment for mv in moves])))
        self._broadcast(out)

    def _broadcast(self, out: Outputs) -> None:
        update = TableUpdate(self.table.copy())
        for inc in self.members.values():
            if inc.alive:
                out.sends.append(Send(inc.member_id, update))

    def _assign(self, members: list[int], out: Outputs) -> None:
        before = self.table.copy()
        if self.hot_standby:
            self.table.hot_standby(members[0], members[1:])
        else:
            self.table.assign(members)
            self.table.apply(spread_backups(self.table))
        owned = {m: len(self.table.segments_of(m)) for m in members}
        out.log(Level.INFO, f"segment table epoch {self.table.epoch}: {owned}")
        self._changed(out, before.diff(self.table), "assign")

    def _heal(self, out: Outputs) -> None:
        moves = heal_backups(self.table, self.alive())
        if moves:
            self.table.apply(moves)
            self._changed(out, moves, "backups")
            out.log(Level.INFO, f"segment table epoch {self.table.epoch}: {len(moves)} "
                                "segments got a live backup again")

    def _dead(self, inc: Incarnation, out: Outputs, reason: str) -> None:
        inc.alive = False
        member = inc.member_id
        out.log(Level.WARNING, f"member {member} declared dead (no heartbeat for "
                               f"{self.dead_after} intervals)")
        out.events.append(Event(EventType.MEMBER_DEAD, member=member, reason=reason))
        # (what it was being prepared for is not on its way any more)
        self.balancing.discard(member)
        for s in [s for s, (m, _) in self.prepared.items() if m == member]:
            del self.prepared[s]
        if member in self.table.members:
            moves = self.table.fail_over(member)
            out.log(Level.INFO, f"segment table epoch {self.table.epoch}: {len(moves)} "
                                "segments moved")
            taken: dict[int, list[int]] = {}
            for mv in moves:
                if mv.old_owner == member and mv.new_owner is not None:
                    taken.setdefault(mv.new_owner, []).append(mv.segment)
            for owner, segments in sorted(taken.items()):
                out.events.append(Event(EventType.TAKEOVER, member=owner, dead=member,
                                        epoch=self.table.epoch,
                                        segments=_event_segments(segments)))
            self._changed(out, moves, "failover")

    # -- autobalance ----------------------------------------------------------------------

    def _autobalance(self, now: float, children: Children, out: Outputs) -> None:
        """Give a joining member its fair share of segments gradually: for each
        segment to move, first make the new member its backup (the owner sends
        it the state: bulk transfer), then, ``PREPARE_S`` later, hand the
        segment over (the old owner becomes its backup)."""
        per_segment = None
        for member in sorted(self.balancing):
            inc = self.members.get(member)
            if inc is None or not inc.alive:
                self.balancing.discard(member)
                continue
            # (a prepared segment it owns already, its owner having died, or
            # whose backup it is no longer, is not on its way any more)
            for s in [s for s, (m, _) in self.prepared.items()
                      if m == member and self.table.backup(s) != member]:
                del self.prepared[s]
            share = fair_share(self.table, len(self.alive()))
            have = len(self.table.segments_of(member))
            if have >= share or self.hot_standby:
                self._finish_join(member, out)
                continue
            moves: list[SegmentMove] = []
            ready = [s for s, (m, t) in self.prepared.items()
                     if m == member and now - t >= PREPARE_S and self.table.backup(s) == member]
            handed: dict[int, tuple[int, float]] = {}
            for s in ready[:share - have]:
                owner = self.table.owner(s)
                handed[s] = self.prepared.pop(s)
                if owner is not None and owner != member:
                    moves.append(SegmentMove(s, owner, member, owner))
            pending = sum(1 for m, _ in self.prepared.values() if m == member)
            want = share - have - len(moves) - pending
            if want > 0:
                if per_segment is None:
                    per_segment = segment_loads(children, self.table.segment_bits)
                # (the segments handed over in this step are on their way too:
                # not donors again before the table has them)
                for s in donor_segments(self.table, member, min(want, JOIN_BATCH), per_segment,
                                        self.alive(), {**self.prepared, **handed}):
                    owner = self.table.owner(s)
                    moves.append(SegmentMove(s, owner, owner, member))
                    self.prepared[s] = (member, now)
            if moves:
                self.table.apply(moves)
                self._changed(out, moves, "autobalance", member)
                out.log(Level.INFO, f"autobalance: member {member} now owns "
                                    f"{len(self.table.segments_of(member))} segments "
                                    f"(epoch {self.table.epoch})")

    def _finish_join(self, member: int, out: Outputs) -> None:
        self.balancing.discard(member)
        for s in [s for s, (m, _) in self.prepared.items() if m == member]:
            del self.prepared[s]
        n = len(self.table.segments_of(member))
        out.log(Level.INFO, f"autobalance: member {member} has its share ({n} segments)")
        out.events.append(Event(EventType.SEGMENTS_MOVED, member=member, reason="balanced",
                                epoch=self.table.epoch))
