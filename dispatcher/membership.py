"""Membership: who is in the cluster and which member owns which segment.

The dispatcher is the membership authority (docs/failover.md):
HELLO gives a member (incarnation) its IV sender id and the segment table;
heartbeats keep it alive; a member that misses ``dead_after`` of them is dead
and its segments go to their backups (epoch bumped); every segment gets a
live backup again as soon as one exists; a member that comes (back) gets its
share gradually: first the state (as a backup, bulk transfer), then the
segments (autobalance). Mixed into ``Dispatcher`` (dispatcher/cluster.py),
whose state these methods share.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.cluster.segments import SegmentMove
from common.cluster.spi import segment_of_esp_spi
from common.cluster.stats import MemberStats
from common.cluster.wire import Datagram, Heartbeat, Hello, StreamSeq, TableUpdate
from common.ike.ts import TrafficSelector

if TYPE_CHECKING:
    from common.cluster.routing import InsideRoutes
    from common.cluster.segments import SegmentTable
    from common.cluster.wire import Message
    from common.config import Config

log = logging.getLogger("ipsec_cluster.dispatcher")

#: autobalance: one step every so often; a segment moves this long after its
#: future owner became its backup (time for the bulk transfer); segments per step
AUTOBALANCE_STEP_S = 0.25
PREPARE_S = 1.0
JOIN_BATCH = 32
#: how long the dispatcher waits for ``expect_members`` before it starts with
#: whoever came (member processes take a few seconds to start on a loaded host)
STARTUP_WAIT_S = 20.0


@dataclass(slots=True)
class MemberInfo:
    member_id: int
    identity: bytes
    sender_id: int
    pid: int = 0
    host: str = ""
    last_seen: float = 0.0
    alive: bool = True
    #: heartbeats after it was declared dead were logged (once per incarnation)
    back_logged: bool = False
    #: its last heartbeat's figures
    stats: MemberStats = field(default_factory=MemberStats)
    tx: StreamSeq = field(default_factory=StreamSeq)
    rx: StreamSeq = field(default_factory=StreamSeq)
    gaps: int = 0
    #: the incarnation's secret (its HEARTBEAT and BULK channels show it)
    token: int = field(default=0, repr=False)
    datagrams: list[Datagram] = field(default_factory=list)
    inner: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class RouteInfo:
    member: int
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]


class Membership:
    """HELLO, heartbeats, failure detection, the segment table, autobalance."""

    # The dispatcher's state these methods share (set in Dispatcher.__init__).
    config: Config
    table: SegmentTable
    members: dict[int, MemberInfo]
    by_identity: dict[bytes, int]
    next_sender_id: int
    expect: int
    route_info: dict[int, RouteInfo]
    routes: InsideRoutes
    balancing: set[int]
    prepared: dict[int, tuple[int, float]]
    counters: Counter[str]
    _last_balance: float
    _stop: asyncio.Event

    def _send(self, info: MemberInfo, msg: Message) -> None:
        raise NotImplementedError

    def _drain_members(self) -> None:
        raise NotImplementedError

    def _hello(self, identity: bytes, hello: Hello) -> None:
        sender_id = self.next_sender_id
        self.next_sender_id = (self.next_sender_id % 0xFFFF) + 1
        old = self.members.get(hello.member_id)
        info = MemberInfo(hello.member_id, identity, sender_id, hello.pid, hello.host,
                          time.monotonic())
        # (os.urandom: the dispatcher is a shell; the token is a secret)
        info.token = int.from_bytes(os.urandom(8), "big") | 1
        self.members[hello.member_id] = info
        self.by_identity[identity] = hello.member_id
        log.info("member %d joined (pid %d on %s), sender id %d%s", hello.member_id, hello.pid,
                 hello.host, sender_id, " (restarted)" if old else "")
        # Its incarnation's IV sender id first, then the table.
        self._send(info, Heartbeat(0, sender_id, os.getpid(), self.table.epoch, self._loads(),
                                   info.token))
        alive = sorted(m for m, i in self.members.items() if i.alive)
        if not self.table.members and len(alive) >= self.expect:
            self._assign(alive)
        else:
            self._send(info, TableUpdate(self.table))
            if self.table.members and hello.member_id not in self.table.members:
                # A new or returning member: it gets state first (as a backup),
                # then segments, a batch at a time (autobalance).
                self.balancing.add(hello.member_id)

    def _assign(self, members: list[int]) -> None:
        if self.config.cluster.mode == "hot-standby":
            self.table.hot_standby(members[0], members[1:])
        else:
            self.table.assign(members)
            self._spread_backups()
        log.info("segment table epoch %d: %s", self.table.epoch,
                 {m: len(self.table.segments_of(m)) for m in members})
        self._broadcast_table()

    def _spread_backups(self) -> None:
        """Each member's segments are backed up by all the others in turn, so
        when it dies its load is split among the survivors, not dumped on one."""
        members = sorted(self.table.members)
        moves = []
        for m in members:
            others = [o for o in members if o != m]
            if len(others) < 2:
                continue
            for i, s in enumerate(self.table.segments_of(m)):
                want = others[i % len(others)]
                if self.table.backup(s) != want:
                    moves.append(SegmentMove(s, m, m, want))
        if moves:
            self.table.apply(moves)

    def _heal_backups(self) -> None:
        """Every segment gets a live backup again where a live member can be one
        (after deaths, and when a member comes back): otherwise its SAs would
        go on unreplicated for good."""
        live = [m for m in self.table.members
                if (i := self.members.get(m)) is not None and i.alive]
        if len(live) < 2:
            return
        duty = {m: len(self.table.backups_of(m)) for m in live}
        moves = []
        for s in range(self.table.segments):
            owner, backup = self.table.owner(s), self.table.backup(s)
            if owner is None or (backup in duty and backup != owner):
                continue
            candidates = [m for m in live if m != owner]
            if not candidates:
                continue
            pick = min(candidates, key=lambda m: (duty[m], m))
            duty[pick] += 1
            moves.append(SegmentMove(s, owner, owner, pick))
        if moves:
            self.table.apply(moves)
            self._broadcast_table()
            log.info("segment table epoch %d: %d segments got a live backup again",
                     self.table.epoch, len(moves))

    def _broadcast_table(self) -> None:
        for info in self.members.values():
            if info.alive:
                self._send(info, TableUpdate(self.table))

    def _loads(self) -> dict[str, int]:
        loads: Counter[int] = Counter(r.member for r in self.route_info.values())
        return {f"load.{m}": loads.get(m, 0) for m in self.members}

    # -- membership ---------------------------------------------------------------------

    async def _monitor(self) -> None:
        c = self.config.cluster
        interval = c.heartbeat_interval
        started = last = time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - last > 2 * interval:
                # We were stalled ourselves: heartbeats may be waiting unread in
                # the socket. Read them before judging anyone.
                self._drain_members()
                self.counters["monitor_stalls"] += 1
            last = now
            loads = self._loads()
            for info in list(self.members.values()):
                if not info.alive:
                    continue
                if now - info.last_seen > interval * c.dead_after:
                    self._dead(info)
                    continue
                self._send(info, Heartbeat(0, info.sender_id, os.getpid(), self.table.epoch,
                                           loads))
            if not self.table.members and self.members and now - started > STARTUP_WAIT_S:
                # Not everyone came: start with whoever is here.
                self._assign(sorted(m for m, i in self.members.items() if i.alive))
            if now - self._last_balance >= AUTOBALANCE_STEP_S and self.table.members:
                self._last_balance = now
                self._heal_backups()
                if self.balancing:
                    self._autobalance(now)

    def fence(self, member_id: int, pid: int) -> None:
        """The supervisor saw this incarnation's process end: it is dead now,
        not after ``dead_after`` heartbeats, so that its successor's HELLO is
        taken (a HELLO for a live member id is refused)."""
        info = self.members.get(member_id)
        if info is not None and info.alive and info.pid == pid:
            log.warning("member %d (pid %d) exited: fenced", member_id, pid)
            self._dead(info)

    def _dead(self, info: MemberInfo) -> None:
        info.alive = False
        log.warning("member %d declared dead (no heartbeat for %d intervals)", info.member_id,
                    self.config.cluster.dead_after)
        self.counters["members_died"] += 1
        if info.member_id in self.table.members:
            moves = self.table.fail_over(info.member_id)
            log.info("segment table epoch %d: %d segments moved", self.table.epoch, len(moves))
            self._broadcast_table()
        self._repoint_routes()

    def _repoint_routes(self) -> None:
        """Cleartext traffic follows the segment table at once: a child's
        packets go to whoever owns its inbound SPI's segment now (the member
        that takes over announces the route again when it has installed it)."""
        bits = self.table.segment_bits
        for child_id, r in list(self.route_info.items()):
            owner = self.table.owner(segment_of_esp_spi(child_id, bits))
            if owner is not None and owner != r.member:
                r.member = owner
                self.routes.add(child_id, r.local_ts, r.remote_ts, owner)

    def _autobalance(self, now: float) -> None:
        """Give a joining member its fair share of segments gradually: for each
        segment to move, first make the new member its backup (the owner sends
        it the state: bulk transfer), then, ``PREPARE_S`` later, hand the
        segment over (the old owner becomes its backup)."""
        for member in sorted(self.balancing):
            info = self.members.get(member)
            if info is None or not info.alive:
                self.balancing.discard(member)
                continue
            live = [m for m, i in self.members.items() if i.alive]
            share = self.table.segments // max(1, len(live))
            have = len(self.table.segments_of(member))
            if have >= share or self.config.cluster.mode == "hot-standby":
                self._finish_join(member)
                continue
            moves: list[SegmentMove] = []
            ready = [s for s, (m, t) in self.prepared.items()
                     if m == member and now - t >= PREPARE_S and self.table.backup(s) == member]
            for s in ready[:share - have]:
                owner = self.table.owner(s)
                del self.prepared[s]
                if owner is not None and owner != member:
                    moves.append(SegmentMove(s, owner, member, owner))
            pending = sum(1 for m, _ in self.prepared.values() if m == member)
            want = share - have - len(moves) - pending
            if want > 0:
                for s in self._donor_segments(member, min(want, JOIN_BATCH)):
                    owner = self.table.owner(s)
                    moves.append(SegmentMove(s, owner, owner, member))
                    self.prepared[s] = (member, now)
            if moves:
                self.table.apply(moves)
                self._broadcast_table()
                self._repoint_routes()
                log.info("autobalance: member %d now owns %d segments (epoch %d)", member,
                         len(self.table.segments_of(member)), self.table.epoch)

    def _donor_segments(self, member: int, n: int) -> list[int]:
        """Segments to give ``member``: first segments carrying child SAs, from
        the members carrying the most, until it carries its fair share of
        children (so traffic, not only segment counts, comes back to a
        rejoining member); then empty segments from the members owning most."""
        t = self.table
        bits = t.segment_bits
        children: Counter[int] = Counter(segment_of_esp_spi(c, bits) for c in self.route_info)
        owned = {m: t.segments_of(m) for m in t.members}
        load = {m: sum(children[s] for s in segs) for m, segs in owned.items()}
        counts = {m: len(segs) for m, segs in owned.items()}
        live = [m for m in t.members if (i := self.members.get(m)) is not None and i.alive]
        fair_children = sum(load.values()) // max(1, len(live))
        taken = set(self.prepared)
        for s, (m, _since) in self.prepared.items():   # already on their way
            if m == member:
                owner = t.owner(s)
                if owner in load:
                    load[owner] -= children[s]
                load[member] = load.get(member, 0) + children[s]
        out: list[int] = []
        while len(out) < n and load.get(member, 0) < fair_children:
            donor = max((m for m in owned if m != member), key=lambda m: load[m], default=None)
            if donor is None:
                break
            segs = [s for s in owned[donor] if s not in taken and children[s]]
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
            donor = max((m for m in counts if m != member), key=lambda m: counts[m],
                        default=None)
            if donor is None or counts[donor] <= counts.get(member, 0) + 1:
                break
            segs = [s for s in owned[donor] if s not in taken and not children[s]]
            if not segs:
                break
            out.append(segs[-1])
            taken.add(segs[-1])
            counts[donor] -= 1
            counts[member] = counts.get(member, 0) + 1
        return out

    def _finish_join(self, member: int) -> None:
        self.balancing.discard(member)
        for s in [s for s, (m, _) in self.prepared.items() if m == member]:
            del self.prepared[s]
        log.info("autobalance: member %d has its share (%d segments)", member,
                 len(self.table.segments_of(member)))

    # -- status -------------------------------------------------------------------------

    def _backup_missing(self, member: int) -> bool:
        """True when some segment of ``member`` has no live backup: its SAs go on
        unreplicated (a death would lose them)."""
        for s in self.table.segments_of(member):
            b = self.table.backup(s)
            info = self.members.get(b) if b is not None else None
            if info is None or not info.alive:
                return True
        return False
