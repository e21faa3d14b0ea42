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
  HELLO for a member whose incarnation is alive is refused. What we tell an
  incarnation whose output we do not take is ``standing`` (a ``Notice``:
  reattach, rejoin as new, or stop).
- Sender ids are handed out 1..MAX_SENDER_ID in turn, skipping every id an
  incarnation we hold (alive or dead) has: no two live incarnations ever
  share one, and a new incarnation never gets its predecessor's.
- A dispatcher that starts (``expect_reattach``) may be the successor of
  one that died with members still running: for ``reattach_wait`` (or until
  every member any claimed table names reattached, or ``expect`` new
  ones came and none reattached) it only collects reattach claims (sender id,
  token, the table each holds) and holds new HELLOs back; then it rebuilds
  the table from the claims at an epoch above every claimed one, keeps the
  claimed sender ids, and only then takes new members (docs/failover.md
  "Reattach").
- Timing keys (``Timing``) that differ from ours are refused at join, with a
  notice naming the key and both values.
- Terms fence a deposed dispatcher (docs/failover.md "Two dispatcher hosts"):
  every heartbeat, table and notice we send carries ``term``; a rebuild takes
  a term above ours and above every term a claim reports (members keep the
  highest term they saw and ignore anything of a lower one). A member that
  reports a term above ours outside a rebuild means another dispatcher was
  activated after us: we are deposed (``Outputs.deposed``) and from then on
  take no input and send nothing (the shell stands down).
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
from common.cluster.wire import Channel, Heartbeat, Notice, NoticeKind, TableUpdate, Timing
from common.errors import LocalProtocolError
from common.esp.iv import MAX_SENDER_ID

#: how long the dispatcher waits for ``expect_members`` before it starts with
#: whoever came (member processes take a few seconds to start on a loaded host)
STARTUP_WAIT_S = 20.0
#: the shortest reattach window a dispatcher gives the members of its
#: predecessor (the shell's ``reattach_wait``: ``reattach_wait()``)
REATTACH_WAIT_MIN_S = 2.0
#: the highest table epoch a reattach claim may hold (far above any real
#: one; the epoch must still grow after it without leaving its u64)
MAX_CLAIMED_EPOCH = 1 << 48
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
    message: Heartbeat | TableUpdate | Notice


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
    #: why the input was refused (then nothing else is set, but ``reply``, and
    #: what a rebuild the input ended made)
    refused: str | None = None
    #: what to tell whoever sent this input (on the connection it came on)
    reply: Notice | None = None
    #: this input showed a term above ours: another dispatcher is active
    #: (we are deposed; the shell stands down)
    deposed: bool = False

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


@dataclass(slots=True, frozen=True)
class Claim:
    """A reattach: an incarnation of a previous dispatcher asks to be kept,
    with its sender id, its token and the segment table it holds."""

    sender_id: int
    token: int = field(repr=False)
    table: SegmentTable
    #: the highest dispatcher term the member saw
    term: int = 0


def reattach_wait(heartbeat_interval: float, dead_after: int) -> float:
    """How long a starting dispatcher collects reattach claims: a member
    notices a new dispatcher after ``dead_after`` silent intervals, then asks
    every interval (twice that, and a second for a slow start)."""
    return max(REATTACH_WAIT_MIN_S, 2 * dead_after * heartbeat_interval + 1.0)


def timing_refusal(ours: Timing, theirs: Timing, member_id: int) -> str | None:
    """The one line a member with other timing keys is refused with."""
    diff = theirs.mismatch(ours)
    if diff is None:
        return None
    key, member, dispatcher = diff
    return (f"{key} is {member} at member {member_id} but {dispatcher} at the dispatcher: "
            "every member needs the dispatcher's value")


def _chosen(members: list[int], tables: Mapping[int, SegmentTable]) -> int:
    """The member whose claimed table the rebuild takes: the table most
    claimants hold (one forged claim cannot outvote the others), then the
    newest, then the lowest member id."""
    count: dict[bytes, int] = {}
    for m in members:
        key = tables[m].encode()
        count[key] = count.get(key, 0) + 1
    return min(members, key=lambda m: (-count[tables[m].encode()], -tables[m].epoch, m))


def _event_segments(segments: list[int]) -> tuple[int, ...]:
    return tuple(sorted(segments)) if len(segments) <= MAX_EVENT_SEGMENTS else ()


class Membership:
    """HELLO, heartbeats, failure detection, the segment table, autobalance."""

    def __init__(self, segment_bits: int, *, expect: int, heartbeat_interval: float,
                 dead_after: int, hot_standby: bool = False, pid: int = 0,
                 timing: Timing | None = None, reattach_wait: float = 0.0,
                 term: int = 0) -> None:
        """``pid``: the dispatcher's, in the heartbeats it sends; ``timing``:
        ours (None: not checked); ``reattach_wait``: the window in which the
        members of a previous dispatcher may reattach (0: none, a new cluster);
        ``term``: the highest dispatcher term we know of (a rebuild takes one
        above it)."""
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
        self.timing = timing
        self.reattach_wait = reattach_wait
        #: collecting reattach claims (the table and sender ids are not ours yet)
        self.rebuilding = reattach_wait > 0
        #: the claims so far (member -> its incarnation, not alive yet) and the
        #: table each holds
        self.claims: dict[int, Incarnation] = {}
        self.claimed: dict[int, SegmentTable] = {}
        #: members whose new incarnation waits for the rebuild
        self.waiting: set[int] = set()
        #: our term (every message we send carries it); a rebuild raises it
        #: above every term claimed
        self.term = term
        #: a member reported a term above ours: another dispatcher is active
        self.deposed = False

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

    def incarnation(self, member: int) -> Incarnation | None:
        """The incarnation we hold for ``member`` (a claim while rebuilding)."""
        if self.rebuilding and member in self.claims:
            return self.claims[member]
        return self.members.get(member)

    def standing(self, member_id: int, sender_id: int) -> Notice | None:
        """What to tell incarnation ``sender_id`` of ``member_id`` when it
        writes to us and we do not take its output, or None (it is our live
        one, or its claim waits for the rebuild): UNKNOWN (we hold none of
        yours: reattach), DEAD (yours was declared dead: rejoin as new) or
        REPLACED (a newer one of your id came: stop)."""
        inc = self.incarnation(member_id)
        if inc is None:
            return Notice(NoticeKind.UNKNOWN, sender_id, "no incarnation of this member here",
                          self.term)
        if inc.sender_id == sender_id:
            if inc.alive or self.rebuilding:
                return None
            return Notice(NoticeKind.DEAD, sender_id,
                          f"member {member_id} sender id {sender_id} was declared dead",
                          self.term)
        return Notice(NoticeKind.REPLACED, sender_id,
                      f"member {member_id} has a newer incarnation (pid {inc.pid} on "
                      f"{inc.host or '?'}, sender id {inc.sender_id})", self.term)

    # -- inputs -------------------------------------------------------------------------

    def newer_term(self, term: int, out: Outputs) -> bool:
        """A member reported ``term``: above ours outside a rebuild, another
        dispatcher was activated after us: we are deposed from now on (True).
        While rebuilding, ours rises to it (the rebuild takes one above)."""
        if term <= self.term:
            return self.deposed
        if self.rebuilding:
            self.term = term
            return False
        if not self.deposed:
            self.deposed = True
            out.deposed = True
            out.log(Level.WARNING, f"a member reports dispatcher term {term}, above ours "
                                   f"({self.term}): another dispatcher is active; standing "
                                   "down (no table, sender id or notice from us any more)")
        return True

    def expect_reattach(self, wait: float, now: float) -> None:
        """From ``now`` on, for ``wait``: the window in which the members of
        a previous dispatcher reattach (before any member came)."""
        if self.members or self.table.members or wait <= 0:
            return
        self.reattach_wait = wait
        self.rebuilding = True
        self._started = now

    def start(self, now: float) -> None:
        """The monitor starts: the startup wait for ``expect`` counts from now."""
        if self._started is None:
            self._started = now

    def hello(self, member_id: int, pid: int, host: str, token: int, now: float,
              children: Children = _NO_CHILDREN, *, timing: Timing | None = None,
              claim: Claim | None = None, term: int = 0) -> Outputs:
        """A LIVE HELLO: a new incarnation of ``member_id`` (refused while
        its current one is alive: it must be dead or fenced first). It gets
        its sender id and token first, then the table; it is the last one
        ``expect`` waited for (the table is assigned), or it joins the
        autobalance. With ``claim``, a reattach (``reattach``). Timing keys
        other than ours are refused (the reply names the key). ``term``: the
        highest the member saw (above ours: we are deposed, ``newer_term``)."""
        if claim is not None:
            term = max(term, claim.term)
        fenced = Outputs()
        if self.newer_term(term, fenced):
            fenced.refused = "deposed"
            return fenced
        if timing is not None and self.timing is not None:
            why = timing_refusal(self.timing, timing, member_id)
            if why is not None:
                return Outputs(refused="hello_timing",
                               reply=Notice(NoticeKind.REFUSED, 0, why, self.term))
        if claim is not None:
            return self.reattach(member_id, pid, host, claim, now, children)
        out = Outputs()
        if self.rebuilding:
            self.start(now)
            self.waiting.add(member_id)
            if not self._rebuild_due(now):
                return Outputs(refused="hello_rebuilding")
            self._rebuild(now, out)
        old = self.members.get(member_id)
        if old is not None and old.alive:
            out.refused = "hello_member_alive"
            return out
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
            out.sends.append(Send(member_id, TableUpdate(self.table.copy(), self.term)))
            if self.table.members and member_id not in self.table.members:
                # A new or returning member: it gets state first (as a backup),
                # then segments, a batch at a time (autobalance).
                self.balancing.add(member_id)
        return out

    def reattach(self, member_id: int, pid: int, host: str, claim: Claim, now: float,
                 children: Children = _NO_CHILDREN) -> Outputs:
        """A reattach HELLO. While rebuilding: the claim is kept (of two for
        one member id, the one holding the newer table; the other is told it
        was replaced) until the rebuild. After it: our live incarnation with
        that sender id and token gets the same answer as a repeated HELLO;
        any other is told it is dead (rejoin as new) or replaced (stop)."""
        fenced = Outputs()
        if self.newer_term(claim.term, fenced):
            fenced.refused = "deposed"
            return fenced
        if not 1 <= claim.sender_id <= MAX_SENDER_ID or claim.token == 0 \
                or claim.table.segment_bits != self.table.segment_bits \
                or claim.table.epoch > MAX_CLAIMED_EPOCH:
            return Outputs(refused="reattach_bad_claim",
                           reply=Notice(NoticeKind.DEAD, claim.sender_id,
                                        "a reattach claim we cannot keep", self.term))
        if not self.rebuilding:
            inc = self.members.get(member_id)
            if inc is not None and inc.alive and inc.sender_id == claim.sender_id \
                    and inc.token == claim.token:
                inc.last_seen = now
                return self.answer(member_id, children)
            notice = self.standing(member_id, claim.sender_id)
            if inc is None or not inc.alive:
                # (its sender id is in use until it hears this: not handed out)
                self.members[member_id] = Incarnation(member_id, claim.sender_id, pid, host, now,
                                                      alive=False, token=claim.token)
            if notice is None or notice.kind is NoticeKind.UNKNOWN:
                notice = Notice(NoticeKind.DEAD, claim.sender_id,
                                f"member {member_id} did not reattach in time: its segments "
                                "have new owners", self.term)
            return Outputs(refused="reattach_late", reply=notice)
        self.start(now)
        out = Outputs()
        prev = self.claims.get(member_id)
        if prev is not None and (prev.sender_id, prev.token) != (claim.sender_id, claim.token):
            if self.claimed[member_id].epoch >= claim.table.epoch:
                return Outputs(refused="reattach_replaced", reply=Notice(
                    NoticeKind.REPLACED, claim.sender_id,
                    f"member {member_id} reattached with a newer table (pid {prev.pid})",
                    self.term))
            out.log(Level.WARNING, f"member {member_id}: the claim of pid {pid} (epoch "
                                   f"{claim.table.epoch}) replaces that of pid {prev.pid}")
        if prev is None or prev.pid != pid:
            out.log(Level.INFO, f"member {member_id} (pid {pid} on {host}) reattaches: sender "
                                f"id {claim.sender_id}, table epoch {claim.table.epoch}")
        self.claims[member_id] = Incarnation(member_id, claim.sender_id, pid, host, now,
                                             alive=False, token=claim.token)
        self.claimed[member_id] = claim.table
        if self._rebuild_due(now):
            self._rebuild(now, out)
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
        out.sends.append(Send(member_id, TableUpdate(self.table.copy(), self.term)))
        return out

    def heartbeat(self, member_id: int, sender_id: int, now: float,
                  via: Channel = Channel.HEARTBEAT, term: int = 0) -> Outputs:
        """A heartbeat of incarnation ``sender_id`` of ``member_id``, on its
        heartbeat connection or its live one. Only the current incarnation's
        count; a dead one stays dead (its live connection's heartbeat is
        logged once: its output is ignored from now on). Any other heartbeat
        on a live connection gets ``standing``'s notice as ``reply`` (the
        member learns it must reattach, rejoin or stop). ``term``: the highest
        the member saw (above ours: we are deposed)."""
        out = Outputs()
        if self.newer_term(term, out):
            return out
        inc = self.incarnation(member_id)
        if inc is None or inc.sender_id != sender_id or self.rebuilding:
            if via is Channel.LIVE:
                out.reply = self.standing(member_id, sender_id)
            return out
        if inc.alive:
            inc.last_seen = now
        elif via is Channel.LIVE:
            inc.last_seen = now
            out.reply = self.standing(member_id, sender_id)
            if not inc.back_logged:
                inc.back_logged = True
                out.log(Level.WARNING, f"member {member_id} (pid {inc.pid}) is back after "
                                       "being declared dead; its output is ignored, and it is "
                                       "told to rejoin as a new incarnation")
        return out

    def exited(self, member_id: int, pid: int) -> Outputs:
        """The supervisor saw this incarnation's process end: it is dead now,
        not after ``dead_after`` heartbeats, so that its successor's HELLO is
        taken. Another pid (an older incarnation) changes nothing."""
        out = Outputs()
        inc = self.members.get(member_id)
        if self.deposed:
            return out
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
        if self.deposed:
            return out
        self.start(now)
        if self.rebuilding:
            if not self._rebuild_due(now):
                return out
            self._rebuild(now, out)
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
                                                               self.table.epoch, loads=loads,
                                                               term=self.term)))
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
                         loads=self._loads(children), term=self.term)

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
        update = TableUpdate(self.table.copy(), self.term)
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
        out.log(Level.WARNING, f"member {member} declared dead ({reason})")
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

    # -- reattach: the rebuild ---------------------------------------------------------------

    def _rebuild_due(self, now: float) -> bool:
        """The window ends early when every member any claimed table names
        reattached, or when ``expect`` new ones came and none
        reattached (a cold start); else it runs out."""
        started = self._started if self._started is not None else now
        if now - started >= self.reattach_wait:
            return True
        named = {m for t in self.claimed.values() for m in t.members}
        if named:
            return named <= self.claims.keys()
        return len(self.claims.keys() | self.waiting) >= self.expect

    def _rebuild(self, now: float, out: Outputs) -> None:
        """The window is over: keep the claims that do not conflict (a sender
        id claimed twice goes to the claim with the newer table, then the
        lower member id; the other is dead: told so, it rejoins as new), take
        the claimed table most claimants hold (then the newest) at an epoch
        above every claimed one, fail
        over the members it names that did not reattach, and hand the table
        out. No claim: a new cluster (the table stays empty)."""
        self.rebuilding = False
        # (every claim raised ours to its term: the new one is above them all)
        self.term += 1
        out.log(Level.INFO, f"dispatcher term {self.term}")
        claims, tables = self.claims, self.claimed
        self.claims, self.claimed = {}, {}
        if not claims:
            out.log(Level.INFO, "no member reattached: a new cluster")
            return
        by_sender: dict[int, list[int]] = {}
        for m, inc in claims.items():
            by_sender.setdefault(inc.sender_id, []).append(m)
        kept: list[int] = []
        for sender_id, ids in sorted(by_sender.items()):
            ids.sort(key=lambda m: (-tables[m].epoch, m))
            kept.append(ids[0])
            for loser in ids[1:]:
                out.log(Level.WARNING, f"member {loser} claimed sender id {sender_id} of "
                                       f"member {ids[0]}: dead, it rejoins as new")
        kept.sort()
        top = max(t.epoch for t in tables.values())
        newest = _chosen(kept, tables)
        for m, inc in claims.items():
            inc.alive = m in kept
            inc.last_seen = now
            self.members[m] = inc
        before = self.table.copy()
        self.table.restore(tables[newest], max(top, self.table.epoch))
        moves: list[SegmentMove] = []
        for m in list(self.table.members):
            if m not in kept:
                moves.extend(self.table.fail_over(m))
                out.events.append(Event(EventType.MEMBER_DEAD, member=m,
                                        reason="did not reattach"))
        if not self.table.members:
            # (no member of the newest table came back: whatever it held is lost)
            if self.hot_standby:
                self.table.hot_standby(kept[0], kept[1:])
            else:
                self.table.assign(kept)
        if self.table.epoch <= top:
            self.table.advance()
        for m in kept:
            if m not in self.table.members:
                self.balancing.add(m)
        self.next_sender_id = max(i.sender_id for i in claims.values()) % MAX_SENDER_ID + 1
        out.log(Level.INFO, f"segment table rebuilt from {len(kept)} reattached members "
                            f"(claimed epochs up to {top}): epoch {self.table.epoch}, "
                            f"{len(moves)} segments of members that did not reattach moved")
        for m in kept:
            inc = claims[m]
            out.events.append(Event(EventType.MEMBER_JOINED, member=m, sender_id=inc.sender_id))
            out.sends.append(Send(m, Heartbeat(0, inc.sender_id, self.pid, self.table.epoch,
                                               token=inc.token, term=self.term)))
        self._changed(out, before.diff(self.table), "rebuild")

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
