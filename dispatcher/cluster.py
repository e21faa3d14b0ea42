"""The dispatcher process: the cluster's single address and its I/O edge.

It owns UDP 500/4500 and the inside (TUN or UDP), classifies every datagram
and routes it with the one routing function (common/cluster/routing.py) to the member
that owns the segment, in batches over ZeroMQ; it sends what members hand back
from the cluster address, so IKE and ESP always share one address (RFC 6027
§3.8). It is the membership authority: HELLO, heartbeats, the segment table
with its epoch, failure detection, decided by the membership machine
(common/cluster/membership.py) that it holds, feeds and carries out.

Rules of this file: the socket callbacks do no protocol work (peek, route,
append to a bounded batch, drop and count when full); batches leave once per
loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from common.cluster.events import MEMBER_EVENTS, Event, EventLog, EventType
from common.cluster.membership import Claim, Level, Membership, Outputs, reattach_wait
from common.cluster.routing import (
    InsideRoutes,
    IPNetwork,
    PortKind,
    RouteKind,
    kernel_routes,
    route_changes,
    route_datagram,
)
from common.cluster.segments import SegmentTable
from common.cluster.spi import segment_of_esp_spi
from common.cluster.stats import (
    ClusterStatus,
    DispatcherStatus,
    MemberStats,
    MemberStatus,
    PoolStatus,
    StatusReport,
)
from common.cluster.wire import (
    Channel,
    ChildClaim,
    ChildDelete,
    ChildPush,
    Control,
    ControlReq,
    Datagram,
    DatagramIn,
    DatagramOut,
    Events,
    Heartbeat,
    Hello,
    InnerIn,
    InnerOut,
    Message,
    Notice,
    NoticeKind,
    RouteAdd,
    RouteDel,
    Status,
    StatusReq,
    Sync,
    TableUpdate,
    Timing,
    decode,
    encode,
)
from common.config import Config
from common.errors import MalformedMessage
from common.ike.ts import TrafficSelector
from dispatcher.control import ControlRelay
from dispatcher.handoff import Handed
from dispatcher.membership import MemberInfo, RouteInfo
from dispatcher.trust import (
    HANDSHAKE_FAILED_EVENTS,
    ZAP_DOMAIN,
    Guard,
    KeyRing,
    authenticator,
    member_of_user_id,
)
from member.inside import Inside, make_inside
from member.refusals import Refusals
from member.reuseport import SteeringGroup, SteeringUnavailable
from member.routes import KernelRoutes, adopted_routes, bind_udp, mark_for_tun
from member.tun import TunDevice, TunError
from member.tuns import MemberTuns

log = logging.getLogger("ipsec_cluster.dispatcher")

#: datagrams read per readiness callback, and the most a batch may hold
READ_BURST = 256
#: member frames handled per wake-up of the members loop
DRAIN_BURST = 64
MAX_BATCH = 256
#: bounded queue per member (frames ZeroMQ may hold before we drop)
MEMBER_HWM = 20_000
UDP_RCVBUF = 8 << 20
#: how long a control request waits for the members' answers
CONTROL_TIMEOUT_S = 3.0
#: what members must not send us: the dispatcher's own messages
_TO_MEMBERS = (DatagramIn, InnerIn, TableUpdate, StatusReq, ControlReq, Notice)


@dataclass(slots=True)
class Conn:
    """One member connection (its ROUTER routing id), bound by its HELLO to
    the member id its CURVE key authenticates and to one channel."""

    member_id: int
    channel: Channel


class Dispatcher:
    def __init__(self, config: Config, endpoint: str, *,
                 curve: tuple[bytes, bytes] | None = None, keys: KeyRing | None = None,
                 expect_members: int | None = None, local_members: tuple[int, ...] = ()
                 ) -> None:
        """``curve`` = our CURVE key pair (z85; made fresh when None: members
        we start learn it from us); ``keys``: each member's public key bound
        to its member id (docs/design.md "Trust model"). Every endpoint, ipc://
        too, is CURVE: no key, no member. ``local_members``: the members the
        supervisor starts on this host; with ``data_path = "kernel"`` each gets
        its own socket in a steered SO_REUSEPORT group per UDP port
        (``member_fds``), docs/routing.md "The data path on one host"."""
        self.config = config
        self.local_members = local_members
        #: UDP port -> its steered group (empty: the relay path)
        self.groups: dict[int, SteeringGroup] = {}
        #: why the kernel path is off ("" when it is on or was never asked for)
        self.steering_off = ""
        #: (epoch, alive members) the attached programs were built for
        self._steered: tuple[int, frozenset[int]] | None = None
        #: (port, member) sockets we read ourselves: their member is not alive
        self._draining: set[tuple[int, int]] = set()
        #: called with a member id the machine declared dead (the supervisor
        #: ends a process that still runs at once: on the kernel path it
        #: holds sockets it could still send from, RFC 6027 §3.7)
        self.on_member_dead: Callable[[int], None] | None = None
        #: pidfds of our host's members' processes (pid -> fd, pid -> member)
        self._pidfds: dict[int, int] = {}
        self._pidfd_member: dict[int, int] = {}
        self.endpoint = endpoint
        self.curve = curve if curve is not None else zmq.curve_keypair()
        self.keys = keys if keys is not None else KeyRing()
        c = config.cluster
        self.expect = expect_members if expect_members is not None else c.expect_members
        #: who is in, alive, owning which segment (the machine; we carry out
        #: what it says). We may be the successor of a dispatcher whose members
        #: still run: from ``start`` on they get ``reattach_wait`` to reattach
        #: before anyone new joins (docs/failover.md "Reattach").
        self.membership = Membership(c.segment_bits, expect=self.expect,
                                     heartbeat_interval=c.heartbeat_interval,
                                     dead_after=c.dead_after,
                                     hot_standby=c.mode == "hot-standby", pid=os.getpid(),
                                     timing=Timing.of(c.heartbeat_interval, c.dead_after,
                                                      c.segment_bits, c.mode))
        self.table = self.membership.table
        #: each member's current incarnation's connection (by member id)
        self.members: dict[int, MemberInfo] = {}
        self.by_identity: dict[bytes, int] = {}
        self.routes = InsideRoutes()
        self.route_info: dict[int, RouteInfo] = {}
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        #: routing id -> (member, channel); the member id of the message being handled
        self.conns: dict[bytes, Conn] = {}
        self._peer: int | None = None
        self.guard = Guard(self.table, frozenset({c.ike_port, c.natt_port}),
                           _configured_remote(config))
        self.udp: dict[int, socket.socket] = {}
        self.inside: Inside | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        #: the cluster's event stream (control API ``events``)
        self.events = EventLog()
        self._status_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._status_pending: dict[int, dict[str, Any]] = {}
        self._stop = asyncio.Event()
        self.started = time.time()
        ctx = zmq.asyncio.Context.instance()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, MEMBER_HWM)
        self.router.setsockopt(zmq.RCVHWM, MEMBER_HWM)
        #: the same socket for plain non-blocking recvs (``_drain_members``)
        self._shadow: zmq.Socket[bytes] | None = zmq.Socket.shadow(self.router.underlying)
        self.auth: Any = None
        self._handshakes: Any = None
        #: each member's second connection, for bulk state transfers
        self.bulk_identity: dict[int, bytes] = {}
        #: set by the supervisor before ``start`` when it starts the members
        #: on this host: then each gets its own TUN device (member/tuns.py)
        self.want_member_tuns = False
        self.member_tuns: MemberTuns | None = None
        self.kernel: KernelRoutes | None = None
        #: what the cluster's table holds (prefix -> device) on the kernel path
        self._kernel_state: dict[IPNetwork, str] = {}
        self._kernel_scheduled = False
        #: a change set failed: the next one replaces every route (idempotent)
        self._kernel_resync = False
        #: under a supervisor (dispatcher/process.py): what it holds for us,
        #: handed over at our start, and its pid (status)
        self.handed: Handed | None = None
        self.supervisor_pid = 0
        #: a restarted dispatcher adopts running members: until they are all
        #: back (or ``adopt_deadline``), the kernel's program, the members'
        #: sockets and TUN devices and the routes stay as they are
        self.adopting = False
        self.adopt_deadline = 0.0
        #: routes found in our table at adoption, kept until it ends
        self._kernel_adopted: dict[IPNetwork, str] = {}
        #: two dispatcher hosts (docs/failover.md "Two dispatcher hosts"): a
        #: standby answers members with a STANDBY notice and runs no
        #: membership until ``activate``; a member reporting a newer term
        #: deposes us (``on_deposed``: the supervisor starts a standby anew)
        self.role = "active"
        self.host = socket.gethostname()
        self.on_deposed: Callable[[], None] | None = None

    # -- network in -----------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """One fact for the event stream (docs/operations.md "Control API")."""
        self.events.add(event, time.time())

    def _readable(self, sock: socket.socket, port: int) -> None:
        kind = PortKind.of_port(port)
        table = self.table
        members = self.members
        family = sock.family
        received = esp = 0
        for _ in range(READ_BURST):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.drops["udp_error"] += 1
                break
            received += 1
            # (inet_pton: ~0.25 us; ipaddress.ip_address(...).packed: ~2-6 us)
            peer_ip = socket.inet_pton(family, addr[0].split("%", 1)[0])
            try:
                route = route_datagram(kind, data, peer_ip, addr[1], table)
            except MalformedMessage:
                self.drops["malformed"] += 1
                continue
            if route.kind is RouteKind.KEEPALIVE:
                self.counters["keepalive"] += 1
                continue
            info = members.get(route.owner) if route.owner is not None else None
            if info is None or not info.incarnation.alive:
                self.drops["no_owner"] += 1
                continue
            if len(info.datagrams) >= MAX_BATCH * 4:
                self.drops["member_queue_full"] += 1
                continue
            if route.kind is RouteKind.ESP:
                esp += 1
            info.datagrams.append(Datagram(port, peer_ip, addr[1], data))
        self.counters["udp_in"] += received
        if esp:
            self.counters["esp_relayed"] += esp
        self._flush()

    def _inner(self, packet: bytes) -> None:
        try:
            member = self.routes.lookup(packet)
        except MalformedMessage:
            self.drops["inner_malformed"] += 1
            return
        if member is None:   # outside every child's selectors (RFC 4301 §5.1)
            self.drops["no_child"] += 1
            return
        info = self.members.get(member)
        if info is None or not info.incarnation.alive:
            self.drops["inner_no_route"] += 1
            return
        if len(info.inner) >= MAX_BATCH * 4:
            self.drops["member_queue_full"] += 1
            return
        info.inner.append(packet)
        self.counters["inner_relayed"] += 1
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for info in self.members.values():
            while info.datagrams:
                batch, info.datagrams = info.datagrams[:MAX_BATCH], info.datagrams[MAX_BATCH:]
                self._send(info, DatagramIn(batch))
            while info.inner:
                chunk, info.inner = info.inner[:MAX_BATCH], info.inner[MAX_BATCH:]
                self._send(info, InnerIn(chunk))

    def _send(self, info: MemberInfo, msg: Message) -> None:
        # A zmq.asyncio socket does not raise on NOBLOCK: the failure (EAGAIN,
        # EHOSTUNREACH from ROUTER_MANDATORY) is in the returned future, which
        # is already done; unread, asyncio logs it as never retrieved.
        fut = asyncio.ensure_future(self.router.send_multipart(
            [info.identity, encode(msg, info.tx.next())], flags=zmq.NOBLOCK))
        fut.add_done_callback(self._sent)

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, zmq.Again):
            self.drops["zmq_full"] += 1
        elif exc is not None:
            self.drops["zmq_unroutable"] += 1

    # -- members in -------------------------------------------------------------------

    async def _members_loop(self) -> None:
        # One awaited recv (a Future and callbacks in zmq.asyncio), then what
        # else is queued with plain non-blocking recvs on a shadow of the same
        # socket, up to DRAIN_BURST: the awaited recv costs several times a
        # plain one. (Draining stops at EAGAIN or at the bound; either way the
        # next awaited recv first checks ZMQ_EVENTS, so no edge is lost.)
        while not self._stop.is_set():
            self._received(await self.router.recv_multipart(copy=False))
            self._drain_members()

    def _received(self, frames: list[zmq.Frame]) -> None:
        """One message from a member, with who sent it: the member id its
        CURVE key authenticated (the ZAP User-Id ZeroMQ puts on each message),
        whatever the message says."""
        try:
            user_id = frames[-1].get("User-Id")
        except zmq.ZMQError:
            user_id = None
        self._peer = member_of_user_id(user_id if isinstance(user_id, str) else None)
        try:
            self._member_frames([f.bytes for f in frames])
        finally:
            self._peer = None

    def _drain_members(self) -> None:
        """Handle up to DRAIN_BURST queued member frames without awaiting."""
        shadow = self._shadow
        if shadow is None:
            return
        for _ in range(DRAIN_BURST):
            try:
                frames = shadow.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._received(frames)

    def _member_frames(self, frames: list[bytes]) -> None:
        """One message from a member: the barrier of the members loop. A bad
        frame is a counted drop; whatever handling it raises is counted by
        reason (``refused`` in status: ``bug.<message>.<exception>``), logged
        at most once per (reason, sender) per interval, and the loop goes on."""
        refusals = self._refusals()
        if len(frames) != 2:
            self.drops["wire_frames"] += 1
            refusals.refuse("wire_frames", frames[0] if frames else b"?",
                            f"{len(frames)} frames", what="bad frame")
            return
        identity, frame = frames
        try:
            seq, msg = decode(frame)
        except MalformedMessage as exc:
            self.drops["wire_malformed"] += 1
            refusals.refuse("wire_malformed", identity, exc, what="bad frame")
            return
        try:
            self._from_member(identity, seq, msg)
        except (ValueError, OSError) as exc:
            self.drops["member_msg_error"] += 1
            refusals.refuse(f"member_msg_{type(msg).__name__.lower()}", identity, exc,
                            what="message refused")
        except Exception as exc:
            # STYLE: shells may catch per message, count and go on
            self.drops["member_msg_bug"] += 1
            refusals.failed(type(msg).__name__.lower(), exc, identity)

    def _refusals(self) -> Refusals:
        """The dispatcher's refusal counter (made on first use: the
        constructor is not this function's to change)."""
        r: Refusals | None = getattr(self, "_refused", None)
        if r is None:
            r = self._refused = Refusals(log, name="dispatcher")
        return r

    def _refuse(self, reason: str, identity: bytes, msg: Message) -> None:
        """A message the sender's role does not allow: counted by reason."""
        self.drops[f"refused_{reason}"] += 1
        log.debug("refused %s from %r (member %s): %s", type(msg).__name__, identity,
                  self._peer, reason)

    def _from_member(self, identity: bytes, seq: int, msg: Message) -> None:
        member_id = self._peer
        if member_id is None:
            self._refuse("unauthenticated", identity, msg)
            return
        if isinstance(msg, Hello):
            self._channel_hello(identity, member_id, msg)
            return
        conn = self.conns.get(identity)
        if conn is None:
            self._refuse("no_hello", identity, msg)
            return
        if conn.member_id != member_id:
            self._refuse("wrong_connection", identity, msg)
            return
        if conn.channel is Channel.HEARTBEAT:
            self._liveness(member_id, identity, msg)
            return
        if conn.channel is Channel.BULK:
            reason = self.guard.sync(msg, member_id) if isinstance(msg, Sync) \
                else "bulk_not_sync"
            if reason is not None:
                self._refuse(reason, identity, msg)
            elif isinstance(msg, Sync):
                self._relay_bulk(msg)
            return
        info = self.members.get(member_id)
        if info is None or info.identity != identity:
            self._refuse("stale_connection", identity, msg)
            return
        lost = info.rx.check(seq)
        if lost > 0:
            info.gaps += lost
        if isinstance(msg, _TO_MEMBERS):
            self._refuse("wrong_direction", identity, msg)
            return
        if not info.alive and not isinstance(msg, Heartbeat):
            # Declared dead: its segments have a new owner, so whatever this
            # incarnation still says (IKE, ESP, routes) would be a second
            # sender for the same SAs (RFC 6027 §3.7). It must rejoin anew.
            self.drops["dead_member"] += 1
            return
        if isinstance(msg, DatagramOut):
            self._datagram_out(msg, member_id, identity)
        elif isinstance(msg, InnerOut):
            inside = self.inside
            if inside is not None:
                # memoryview slices of the frame: the write copies them into
                # the kernel, no bytes() copy first
                write = inside.write
                for p in msg.packets:
                    write(p)
                self.counters["inner_out"] += len(msg.packets)
        elif isinstance(msg, Heartbeat):
            if msg.member_id != member_id or msg.sender_id != info.sender_id:
                self._refuse("heartbeat_not_own", identity, msg)
                return
            info.stats = msg.stats if msg.stats is not None else MemberStats()
            out = self.membership.heartbeat(member_id, msg.sender_id, self._now(), Channel.LIVE,
                                            msg.term)
            if out.reply is not None:
                # (a dead incarnation, or one replaced: it learns what to do)
                self._notify(identity, out.reply)
            self._carry(out)
        else:
            self._control(msg, info, identity)

    def _control(self, msg: Message, info: MemberInfo, identity: bytes) -> None:
        member_id = info.member_id
        if isinstance(msg, RouteAdd):
            self._route_add(msg, member_id, identity)
        elif isinstance(msg, RouteDel):
            r = self.route_info.get(msg.child_id)
            if r is None or r.member != member_id:
                # (a member that no longer carries the child cannot remove the
                # route of the one that took it over)
                self._refuse("route_del_not_own", identity, msg)
                return
            self.routes.remove(msg.child_id)
            del self.route_info[msg.child_id]
            self._kernel_routes_changed()
        elif isinstance(msg, ChildPush | ChildDelete):
            reason = (self.guard.child_push(msg, member_id) if isinstance(msg, ChildPush)
                      else self.guard.child_delete(msg, member_id))
            if reason is not None:
                self._refuse(reason, identity, msg)
                return
            self._relay(msg, member_id)
            pending = self.guard.pending_route(msg.spi_in)
            if pending is not None and isinstance(msg, ChildPush):
                self._route_add(pending, pending.member, identity)
        elif isinstance(msg, Sync):
            if (reason := self.guard.sync(msg, member_id)) is not None:
                self._refuse(reason, identity, msg)
                return
            self._relay_sync(msg, member_id)
        elif isinstance(msg, Status):
            self._status_pending[member_id] = json.loads(msg.json)
            self._status_done()
        elif isinstance(msg, Control):
            # only an answer to a request this member was sent (control.py)
            if (reason := self.control_relay().answer(member_id, msg.req_id, msg.json)) is not None:
                self._refuse(reason, identity, msg)
        elif isinstance(msg, Events):
            self._member_events(msg, member_id, identity)
        elif isinstance(msg, ChildClaim):
            self._child_claim(msg, member_id, identity)

    def _child_claim(self, msg: ChildClaim, member_id: int, identity: bytes) -> None:
        """After a reattach: a child the member carries, which we (a new
        dispatcher) never saw pushed. Taken when the member owns its segment
        and the child conflicts with none we know; its cleartext is routed."""
        if (reason := self.guard.child_claim(msg, member_id)) is not None:
            self._refuse(reason, identity, msg)
            return
        self.counters["children_claimed"] += 1
        self.routes.add(msg.spi_in, msg.local_ts, msg.remote_ts, member_id)
        self.route_info[msg.spi_in] = RouteInfo(member_id, msg.local_ts, msg.remote_ts)
        self._kernel_routes_changed()

    def _member_events(self, msg: Events, member_id: int, identity: bytes) -> None:
        """A member's SA events, published when they are its own: an event
        naming another member, or one only the dispatcher may tell (a member
        dead, segments moved), is refused and counted."""
        for event in msg.events:
            if event.member != member_id:
                self._refuse("event_not_own", identity, msg)
            elif event.type not in MEMBER_EVENTS:
                self._refuse("event_type", identity, msg)
            else:
                self.publish(event)

    def _route_add(self, msg: RouteAdd, member_id: int, identity: bytes) -> None:
        reason = self.guard.route_add(msg, member_id)
        if reason == "route_add_pending":
            # (its CHILD_PUSH follows: the member tells the child's backup
            # after it has installed the child itself)
            return
        if reason is not None:
            self._refuse(reason, identity, msg)
            return
        self.routes.add(msg.child_id, msg.local_ts, msg.remote_ts, msg.member)
        self.route_info[msg.child_id] = RouteInfo(msg.member, msg.local_ts, msg.remote_ts)
        self._kernel_routes_changed()

    def _datagram_out(self, msg: DatagramOut, member_id: int, identity: bytes) -> None:
        sent = 0
        allowed = self.guard.datagram
        for d in msg.datagrams:
            sock = self.udp.get(d.local_port)
            if sock is None:
                self.drops["no_socket"] += 1
                continue
            if (reason := allowed(d, member_id)) is not None:
                self._refuse(reason, identity, msg)
                continue
            ip = d.peer_ip
            try:
                sock.sendto(d.payload, (socket.inet_ntop(
                    socket.AF_INET if len(ip) == 4 else socket.AF_INET6, ip), d.peer_port))
                sent += 1
                if d.local_port != 500 and d.payload[:4] != b"\0\0\0\0":
                    self.counters["esp_relayed"] += 1
            except BlockingIOError:
                self.drops["udp_send_full"] += 1
            except OSError:
                self.drops["udp_send_error"] += 1
        self.counters["udp_out"] += sent

    def _channel_hello(self, identity: bytes, member_id: int, hello: Hello) -> None:
        """HELLO opens a channel of the member its key authenticates, and only
        that one: a LIVE one a new incarnation (never while the current one is
        alive: it must be dead or fenced first), a HEARTBEAT or BULK one for
        the current incarnation (its sender id)."""
        if hello.member_id != member_id:
            self._refuse("hello_wrong_id", identity, hello)
            return
        if self.role != "active" or self.membership.deposed:
            if hello.channel is Channel.LIVE:
                self._notify(identity, Notice(NoticeKind.STANDBY, hello.sender_id,
                                              f"{self.host} is the standby dispatcher",
                                              self.membership.term))
            return
        info = self.members.get(member_id)
        if hello.channel is Channel.LIVE:
            if info is not None and info.alive and info.identity == identity \
                    and info.pid == hello.pid and hello.table is None:
                # the same incarnation asking again: the same answer
                self._carry(self.membership.answer(member_id, self.route_info))
                return
            self._hello(identity, hello)
            return
        if (info is None or not info.alive or hello.sender_id != info.sender_id
                or not hmac.compare_digest(hello.token.to_bytes(8, "big"),
                                           info.token.to_bytes(8, "big"))):
            self._refuse("hello_no_incarnation", identity, hello)
            return
        for old in [i for i, c in self.conns.items()
                    if c.member_id == member_id and c.channel is hello.channel]:
            del self.conns[old]
        self.conns[identity] = Conn(member_id, hello.channel)
        if hello.channel is Channel.BULK:
            self.bulk_identity[member_id] = identity

    def _relay(self, msg: ChildPush | ChildDelete, sender: int) -> None:
        """The IKE SA owner manages children: pass the child to the member
        owning its inbound SPI's segment, and to that segment's backup (which
        keeps it as a replica) — never back to the sender."""
        segment = segment_of_esp_spi(msg.spi_in, self.table.segment_bits)
        targets = {self.table.owner(segment), self.table.backup(segment)} - {None, sender}
        if not targets:
            self.drops["child_push_no_owner"] += 1
        for member in targets:
            info = self.members.get(member) if member is not None else None
            if info is not None and info.alive:
                self._send(info, msg)

    def _liveness(self, member_id: int, identity: bytes, msg: Message) -> None:
        """A heartbeat from a member's heartbeat thread (its own connection)."""
        if not isinstance(msg, Heartbeat) or msg.member_id != member_id:
            self._refuse("heartbeat_channel", identity, msg)
            return
        self._carry(self.membership.heartbeat(member_id, msg.sender_id, self._now(),
                                              term=msg.term))

    def _relay_bulk(self, msg: Sync) -> None:
        info = self.members.get(msg.dst)
        identity = self.bulk_identity.get(msg.dst)
        if info is None or not info.alive or identity is None:
            self.drops["bulk_undeliverable"] += 1
            return
        self.counters["bulk_relayed"] += 1
        try:
            self.router.send_multipart([identity, encode(msg, 0)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops["bulk_zmq"] += 1

    def _relay_sync(self, msg: Sync, sender: int) -> None:
        """The synch channel between members goes through us: one socket per
        member, authenticated and encrypted (CURVE) when it leaves the host."""
        info = self.members.get(msg.dst)
        if msg.src != sender or info is None or not info.alive:
            self.drops["sync_undeliverable"] += 1
            return
        self.counters["sync_relayed"] += 1
        self._send(info, msg)

    # -- membership: the machine's inputs and outputs ----------------------------------

    def _now(self) -> float:
        """The membership machine's clock: the loop's (monotonic)."""
        loop = self.loop
        return loop.time() if loop is not None else time.monotonic()

    def _hello(self, identity: bytes, hello: Hello) -> None:
        """A LIVE HELLO, as the machine decides: a new incarnation (it gets its
        sender id; our answer carries its token, a secret: os.urandom, made
        here) or a reattach (a claim: its sender id, token and table). What
        the machine tells the sender (a refusal for good, a notice) goes
        back on this connection; a new incarnation's connections replace
        its predecessor's."""
        member_id = hello.member_id
        claim = Claim(hello.sender_id, hello.token, hello.table, hello.term) \
            if hello.table is not None else None
        token = int.from_bytes(os.urandom(8), "big") | 1
        before = self.membership.incarnation(member_id)
        out = self.membership.hello(member_id, hello.pid, hello.host, token, self._now(),
                                    self.route_info, timing=hello.timing, claim=claim,
                                    term=hello.term)
        if out.reply is not None:
            self._notify(identity, out.reply)
        if out.refused is not None:
            if out.refused == "hello_rebuilding":
                self.counters["hello_held"] += 1     # (it asks again; not a refusal)
            else:
                self._refuse(out.refused, identity, hello)
            self._carry(out)
            return
        inc = self.membership.incarnation(member_id)
        info = self.members.get(member_id)
        if inc is not None and (inc is not before or info is None
                                or info.incarnation is not inc):
            # a new incarnation (or claim): only its connections are bound
            for old in [i for i, c in self.conns.items() if c.member_id == member_id]:
                del self.conns[old]
            self.bulk_identity.pop(member_id, None)
            self.members[member_id] = MemberInfo(inc, identity)
        elif info is not None and info.identity != identity:
            # (the same incarnation on a new live connection)
            self.conns.pop(info.identity, None)
            info.identity = identity
        self.conns[identity] = Conn(member_id, Channel.LIVE)
        self.by_identity[identity] = member_id
        self._carry(out)
        if inc is not None and member_id in self.local_members:
            self._watch_exit(member_id, inc.pid)

    def _watch_exit(self, member_id: int, pid: int) -> None:
        """A member on our host: its exit fences it here at once (a pidfd of
        its process becomes readable when it ends), without waiting for the
        supervisor's word, one process hop and a scheduling delay later (that
        word still comes: fencing is idempotent)."""
        loop = self.loop
        if loop is None or pid <= 0 or pid in self._pidfds:
            return
        for old_pid in list(self._pidfds):
            if self._pidfd_member.get(old_pid) == member_id:
                self._unwatch_exit(old_pid)
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return   # (the supervisor fences it: its pidfd or its poll)
        self._pidfds[pid] = fd
        self._pidfd_member[pid] = member_id
        loop.add_reader(fd, self._exit_seen, member_id, pid)

    def _unwatch_exit(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        self._pidfd_member.pop(pid, None)
        if fd is None:
            return
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(fd)
        os.close(fd)

    def _exit_seen(self, member_id: int, pid: int) -> None:
        self._unwatch_exit(pid)
        self.counters["exits_seen"] += 1
        self.fence(member_id, pid)

    def _notify(self, identity: bytes, notice: Notice) -> None:
        """Tell the connection ``identity`` why we do not take its output."""
        self.counters[f"notice_{notice.kind.name.lower()}"] += 1
        if self.loop is None:
            self.drops["notice_undeliverable"] += 1
            return
        info = next((i for i in self.members.values() if i.identity == identity), None)
        seq = info.tx.next() if info is not None else 0
        fut = asyncio.ensure_future(self.router.send_multipart(
            [identity, encode(notice, seq)], flags=zmq.NOBLOCK))
        fut.add_done_callback(self._sent)

    def fence(self, member_id: int, pid: int) -> None:
        """The supervisor saw this incarnation's process end: it is dead now,
        not after ``dead_after`` heartbeats, so that its successor's HELLO is
        taken (a HELLO for a live member id is refused)."""
        self._carry(self.membership.exited(member_id, pid))

    async def _monitor(self) -> None:
        """The machine's clock: one tick per heartbeat interval."""
        interval = self.config.cluster.heartbeat_interval
        loop = asyncio.get_running_loop()
        last = loop.time()
        self.membership.start(last)
        while not self._stop.is_set():
            await asyncio.sleep(interval)
            now = loop.time()
            if now - last > 2 * interval:
                # We were stalled ourselves: heartbeats may be waiting unread in
                # the socket. Read them before judging anyone.
                self._drain_members()
                self.counters["monitor_stalls"] += 1
            last = now
            if self.role != "active":
                continue
            try:
                self._carry(self.membership.tick(now, self.route_info))
            except Exception as exc:
                # the barrier: failure detection must outlive one bad tick
                # (counted as bug.tick.<type> in status, logged with a traceback once)
                self._refusals().failed("tick", exc, "monitor")

    def _carry(self, out: Outputs) -> None:
        """Carry out what the membership machine says: steer the kernel to
        the new table first (before any member hears of it), then log, send,
        re-point the cleartext routes when the table changed, publish its
        events."""
        if out.deposed and self.on_deposed is not None:
            self.on_deposed()
        if self.adopting:
            self._check_adopted()
        self._steer()
        for line in out.logs:
            if line.level >= Level.WARNING:
                log.warning("%s", line.text)
            else:
                log.info("%s", line.text)
        died = sum(1 for e in out.events if e.type is EventType.MEMBER_DEAD)
        if died:
            self.counters["members_died"] += died
        for send in out.sends:
            info = self.members.get(send.member)
            if info is not None:
                self._send(info, send.message)
        if out.table_changed:
            self._repoint_routes()
        self._read_dead_tuns()
        for event in out.events:
            self.publish(event)
            if event.type is EventType.MEMBER_DEAD and self.on_member_dead is not None:
                self.on_member_dead(event.member)

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
        self._kernel_routes_changed()

    # -- the kernel path: per-member TUN devices (member/tuns.py) ----------------------

    def _open_member_tuns(self) -> None:
        """Cleartext to the members through the kernel, when the members are
        ours on this host and the inside is a TUN; otherwise (logged once, with
        the reason) everything goes through ``_inner`` as before."""
        inside = self.inside
        c = self.config.cluster
        handed = self.handed
        if handed is not None:
            if handed.tuns is None:
                log.info("cleartext to members through the dispatcher: %s", handed.tuns_off)
                return
            self.member_tuns = handed.tuns
            self.kernel = KernelRoutes(c.inside.route_table)
            self._kernel_state = self._kernel_base()
            if self.adopting:
                self._kernel_adopted = adopted_routes(c.inside.route_table,
                                                      handed.tuns.device_names())
                self._kernel_state.update(self._kernel_adopted)
            log.info("cleartext to members through the kernel: TUN devices %s (held by the "
                     "supervisor)", ", ".join(sorted(handed.tuns.device_names())))
            self._read_dead_tuns()
            return
        if not isinstance(inside, TunDevice):
            why = f"the inside is {c.inside.kind}, not a TUN device"
        elif not self.want_member_tuns:
            why = "the members are not started by this process"
        elif not self.endpoint.startswith("ipc://"):
            why = f"members may join from other hosts ({self.endpoint})"
        else:
            tuns = MemberTuns(inside.name, c.members, inside.mtu)
            try:
                tuns.open()
            except (TunError, OSError, subprocess.SubprocessError) as exc:
                why = f"cannot create the per-member TUN devices: {exc}"
            else:
                self.member_tuns = tuns
                self.kernel = KernelRoutes(inside.table)
                self._kernel_state = self._kernel_base()
                log.info("cleartext to members through the kernel: TUN devices %s",
                         ", ".join(sorted(tuns.device_names())))
                if self.loop is not None:
                    tuns.read_while_dead(self._member_alive, self.loop, self._dead_tun)
                return
        log.info("cleartext to members through the dispatcher: %s", why)

    def _read_dead_tuns(self) -> None:
        if self.member_tuns is not None and self.loop is not None and not self.adopting:
            self.member_tuns.read_while_dead(self._member_alive, self.loop, self._dead_tun)

    def _check_adopted(self) -> None:
        """Adoption ends when every member the supervisor runs is alive here
        again, or at its deadline (those not back are dead: their segments
        go to the rest, their sockets and devices are read by us)."""
        running = self.handed.running if self.handed is not None else {}
        back = all(self._member_alive(m) for m in running)
        if not back and self._now() < self.adopt_deadline:
            return
        self.adopting = False
        missing = sorted(m for m in running if not self._member_alive(m))
        log.info("adoption over: %s", f"members {missing} did not come back"
                 if missing else "every running member is back")
        self._steered = None
        self._kernel_adopted = {}
        self._kernel_routes_changed()

    def member_tun_fd(self, member_id: int) -> int | None:
        """The fd of member ``member_id``'s TUN device (for its spawn), or None."""
        return self.member_tuns.fd(member_id) if self.member_tuns is not None else None

    def _member_alive(self, member_id: int) -> bool:
        info = self.members.get(member_id)
        return info is not None and info.alive

    def _dead_tun(self, packets: list[bytes]) -> None:
        """What a dead member's TUN device holds: relayed to whoever carries
        each packet's child now (the userspace path)."""
        for p in packets:
            self._inner(p)

    def _kernel_base(self) -> dict[IPNetwork, str]:
        inside = self.inside
        if not isinstance(inside, TunDevice):
            return {}
        return dict.fromkeys(inside.routes, inside.name)

    def _kernel_routes_changed(self) -> None:
        """The routed children changed: the table follows once per loop turn
        (a burst of ROUTE_ADDs is one ``ip -batch``)."""
        if self.kernel is None or self._kernel_scheduled or self.loop is None:
            return
        self._kernel_scheduled = True
        self.loop.call_soon(self._apply_kernel_routes)

    def _apply_kernel_routes(self) -> None:
        self._kernel_scheduled = False
        kernel, tuns = self.kernel, self.member_tuns
        if kernel is None or tuns is None:
            return
        children = []
        for child_id in reversed(self.routes.child_ids()):   # oldest first
            r = self.route_info.get(child_id)
            device = tuns.device(r.member) if r is not None else None
            if r is not None and device is not None:
                children.append((r.remote_ts, device))
        new = kernel_routes(self._kernel_base(), children)
        for net, dev in self._kernel_adopted.items():
            new.setdefault(net, dev)   # (kept until the adoption is over)
        replace, delete = route_changes(self._kernel_state, new)
        if self._kernel_resync:
            replace = route_changes({}, new)[0]
        errors = kernel.errors
        self._kernel_resync = not kernel.apply(replace, delete)
        self._kernel_state = new
        self.counters["kernel_route_changes"] = kernel.changes
        if kernel.errors != errors:
            self.drops["kernel_route_error"] = kernel.errors

    def _close_member_tuns(self) -> None:
        """Our per-child routes out of the table (the base routes are the
        inside's to remove), then the devices closed."""
        kernel, tuns = self.kernel, self.member_tuns
        if self.handed is not None:
            # the supervisor's: routes and devices outlive us (a clean stop
            # removes them there, when it closes the devices)
            if tuns is not None:
                tuns.close()
            self.member_tuns = None
            self.kernel = None
            return
        if kernel is not None and tuns is not None:
            ours = tuns.device_names()
            kernel.apply({}, [n for n, dev in self._kernel_state.items() if dev in ours])
            self._kernel_state = {}
        if tuns is not None:
            tuns.close()
        self.member_tuns = None
        self.kernel = None

    # -- the kernel's data path: steered sockets -----------------------------------

    def member_fds(self, member_id: int) -> dict[int, int]:
        """UDP port -> the file descriptor of ``member_id``'s socket in the
        steered group (empty on the relay path): the supervisor hands them to
        every incarnation of the member at spawn (they stay ours: the member's
        death loses nothing queued on them)."""
        out = {}
        for port, group in self.groups.items():
            if member_id in group.members:
                out[port] = group.socket_of(member_id).fileno()
        return out

    def _open_ports(self) -> None:
        """UDP 500 and 4500: steered groups (a socket per local member) when
        asked for and the kernel takes the program, else one socket each;
        under a supervisor, the ones it holds for us."""
        if self.handed is not None:
            self.groups, plain = self.handed.groups, self.handed.plain
            self.steering_off = self.handed.steering_off
        else:
            self.groups, plain, self.steering_off = open_ports(self.config, self.local_members,
                                                               self.table)
        for port in sorted(set(self.groups) | set(plain)):
            sock = self.groups[port].sockets[0] if port in self.groups else plain[port]
            self.udp[port] = sock
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock, port)

    def _steer(self) -> None:
        """Re-attach the programs when the table's epoch or the set of alive
        members changed (segments of a member that is not alive go to our own
        socket), and read the sockets of members that are not alive ourselves:
        what was queued for a dead member reaches the segment's new owner."""
        if not self.groups or self.adopting:
            return
        alive = frozenset(m for m, i in self.members.items() if i.alive)
        key = (self.table.epoch, alive)
        if key == self._steered:
            return
        self._steered = key
        for group in self.groups.values():
            try:
                group.steer(self.table, alive)
            except (SteeringUnavailable, ValueError) as exc:
                # (the old program stays: a dead member's socket is still read below)
                self.drops["steer_failed"] += 1
                self._refusals().refuse("steer_failed", "kernel", exc, what="steering")
        self.counters["steered"] += 1
        loop = self.loop
        if loop is None:
            return
        for port, group in self.groups.items():
            for member in group.members:
                sock = group.socket_of(member)
                if member not in alive and (port, member) not in self._draining:
                    self._draining.add((port, member))
                    loop.add_reader(sock.fileno(), self._readable, sock, port)
                    self._readable(sock, port)
                elif member in alive and (port, member) in self._draining:
                    self._draining.discard((port, member))
                    loop.remove_reader(sock.fileno())

    def _backup_missing(self, member: int) -> bool:
        """True when some segment of ``member`` has no live backup: its SAs go on
        unreplicated (a death would lose them)."""
        return self.membership.backup_missing(member)

    def status(self) -> dict[str, Any]:
        """``status_report()`` as the JSON of ``status --json``."""
        return self.status_report().to_json()

    def status_report(self) -> StatusReport:
        """``ipsec-cluster status``: every member known (a dead one with its
        last heartbeat's figures), the dispatcher's counters and the pools."""
        now = self._now()
        members = tuple(
            MemberStatus.of(m, info.stats, pid=info.pid, host=info.host, alive=info.alive,
                            sender_id=info.sender_id,
                            last_heartbeat_ms=round((now - info.last_seen) * 1000),
                            segments=len(self.table.segments_of(m)),
                            backup_segments=len(self.table.backups_of(m)),
                            gaps=info.gaps, degraded=self._backup_missing(m))
            for m, info in sorted(self.members.items()))
        c = self.config.cluster
        return StatusReport(
            ClusterStatus(str(c.address), c.mode, self.table.epoch,
                          round(time.time() - self.started, 1), self.endpoint),
            DispatcherStatus(os.getpid(), dict(self.counters), dict(self.drops),
                             len(self.routes), dict(self._refusals().counts),
                             self.counters["esp_relayed"],
                             "kernel" if self.groups else "relay", self.steering_off,
                             self.supervisor_pid, self.adopting, self.role, self.host,
                             self.membership.term),
            members, self._pools_status())

    def _pools_status(self) -> tuple[PoolStatus, ...]:
        """Each ``[pools.NAME]`` and how many of its addresses the live members
        have leased (the addresses themselves: ``sas``, per IKE SA)."""
        from common.cluster.pools import Pool

        out = []
        bits = self.config.cluster.segment_bits
        for p in self.config.pools.values():
            pool = Pool(p.name, p.addrs, p.dns, bits)
            by_member = {m: info.stats.pools.get(p.name, 0)
                         for m, info in sorted(self.members.items()) if info.alive}
            out.append(PoolStatus(p.name, str(p.addrs), tuple(str(a) for a in p.dns),
                                  pool.size, pool.per_segment(0), sum(by_member.values()),
                                  by_member))
        return tuple(out)

    async def sas(self, timeout: float = 2.0) -> dict[str, Any]:
        """Every member's SAs (like swanctl --list-sas)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._status_waiters.append(fut)
        self._status_pending = {}
        for info in self.members.values():
            if info.alive:
                self._send(info, StatusReq())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        return {"members": [self._status_pending.get(m, {"member": m, "error": "no answer"})
                            for m, i in sorted(self.members.items()) if i.alive]}

    def reconfigure(self, config: Config) -> None:
        """``reload``: the connections changed; no member may announce a
        child wider than the new ones allow (the role check follows)."""
        self.config = config
        self.guard.allowed_remote = _configured_remote(config)

    def control_relay(self) -> ControlRelay:
        """The control requests in flight (made on first use, as _refusals)."""
        r: ControlRelay | None = getattr(self, "_control_relay", None)
        if r is None:
            r = self._control_relay = ControlRelay()
        return r

    async def control(self, req: dict[str, Any], *, one: bool = False,
                      timeout: float = CONTROL_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every alive member's answer to a control request (``one``: the
        lowest alive member only); a member that does not answer in time
        is listed with an error."""
        alive = sorted(m for m, i in self.members.items() if i.alive)
        if one:
            alive = alive[:1]
        if not alive:
            return [{"ok": False, "error": "no member is alive"}]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        relay = self.control_relay()
        req_id = relay.open(set(alive), done)
        data = json.dumps(req).encode()
        for m in alive:
            self._send(self.members[m], ControlReq(req_id, data))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done, timeout)
        answers = relay.close(req_id)
        return [answers.get(m, {"member": m, "ok": False, "error": f"member {m}: no answer"})
                for m in alive]

    def _status_done(self) -> None:
        alive = {m for m, i in self.members.items() if i.alive}
        if alive <= set(self._status_pending):
            for fut in self._status_waiters:
                if not fut.done():
                    fut.set_result({})
            self._status_waiters.clear()

    # -- life ---------------------------------------------------------------------------

    def _start_auth(self) -> None:
        public, secret = self.curve
        self.auth = authenticator(self.keys, self.drops, zmq.asyncio.Context.instance())
        self.auth.start()
        self.router.curve_server = True
        self.router.curve_publickey = public
        self.router.curve_secretkey = secret
        # The ZAP request carries the socket's zap_domain (the authenticator
        # admits this domain only).
        self.router.zap_domain = ZAP_DOMAIN.encode()
        self._handshakes = self.router.get_monitor_socket(HANDSHAKE_FAILED_EVENTS)

    async def _watch_handshakes(self) -> None:
        """Connections that fail the CURVE handshake (no key, a wrong server
        key, a refused key) never deliver a message: count them."""
        from zmq.utils.monitor import parse_monitor_message

        sock = self._handshakes
        if sock is None:
            return
        while not self._stop.is_set():
            event = parse_monitor_message(await sock.recv_multipart())
            self.drops["member_handshake_failed"] += 1
            log.debug("member handshake failed: %s", event)

    def activate(self) -> None:
        """The standby becomes the active dispatcher (it holds the cluster's
        address now): the members of the previous active reattach within
        ``reattach_wait``, and the rebuild takes a term above every one they
        report."""
        if self.role == "active":
            return
        self.role = "active"
        c = self.config.cluster
        wait = reattach_wait(c.heartbeat_interval, c.dead_after)
        self.membership.expect_reattach(wait, self._now())
        self.counters["activated"] += 1
        log.warning("%s: active: collecting the members' reattach claims for %.1f s",
                    self.host, wait)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        c = self.config.cluster
        if self.role == "active":
            self.membership.expect_reattach(reattach_wait(c.heartbeat_interval, c.dead_after),
                                            self._now())
        # The ports first: a second cluster with the same config fails here,
        # before its bind replaces the first one's members socket.
        self._open_ports()
        self._start_auth()
        self.router.bind(self.endpoint)
        address = str(c.inside_address) if c.inside_address is not None else None
        routes = [n for conn in self.config.connections.values()
                  for ch in conn.children.values() for n in ch.remote_nets]
        if self.handed is not None and self.handed.inside is not None:
            self.inside = self.handed.inside
        else:
            self.inside = make_inside(c.inside, address=address, routes=routes)
        await self.inside.start(self._inner)
        self._open_member_tuns()
        log.info("dispatcher on %s ports %s, members at %s, %s", c.address, sorted(self.udp),
                 self.endpoint,
                 f"kernel data path (UDP steered by SPI to members {list(self.local_members)})"
                 if self.groups else "relay data path")
        self.publish(Event(EventType.READY, peer=str(c.address)))

    async def run(self) -> None:
        await self.start()
        tasks = [asyncio.ensure_future(self._members_loop()),
                 asyncio.ensure_future(self._monitor()),
                 asyncio.ensure_future(self._watch_handshakes())]
        try:
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.loop is not None:
            for sock in self.udp.values():
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(sock.fileno())
                sock.close()
            for port, member in self._draining:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(self.groups[port].socket_of(member).fileno())
        for pid in list(self._pidfds):
            self._unwatch_exit(pid)
        for group in self.groups.values():
            group.close()
        self._close_member_tuns()
        if self.inside is not None:
            self.inside.close()
        self._shadow = None
        if self._handshakes is not None:
            self.router.disable_monitor()
            self._handshakes.close(linger=0)
            self._handshakes = None
        self.router.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


def open_ports(config: Config, local_members: tuple[int, ...], table: SegmentTable
               ) -> tuple[dict[int, SteeringGroup], dict[int, socket.socket], str]:
    """The cluster's UDP ports: steered groups (slot 0 ours, a socket per
    local member, every segment to slot 0 until members join) when the
    members are local and ``data_path`` is "kernel" and the kernel takes the
    program, else one plain socket per port; and why the kernel path is off
    ("" when on). A port in use is a StartupError naming its holder."""
    c = config.cluster
    ports = sorted({c.ike_port, c.natt_port})
    mark = mark_for_tun(c.inside.kind, c.inside.route_mark)
    groups: dict[int, SteeringGroup] = {}
    off = ""
    if local_members and c.data_path == "kernel":
        try:
            groups = _open_groups(config, ports, local_members, mark, table)
        except SteeringUnavailable as exc:
            off = str(exc)
            log.warning("%s: ESP goes through the dispatcher (the relay path)", exc)
    elif local_members:
        off = "data_path = \"relay\""
    plain: dict[int, socket.socket] = {}
    try:
        for port in ports:
            if port not in groups:
                # No SO_REUSEADDR: a socket of another user (or a second
                # cluster) bound beside ours would take our datagrams; the
                # bind fails instead, with one line naming the holder. With
                # a TUN inside the socket carries SO_MARK so our own IKE/ESP
                # bypass the tunnel's table.
                plain[port] = bind_udp(str(c.address), port, mark=mark, bufsize=UDP_RCVBUF)
    except BaseException:
        for sock in plain.values():
            sock.close()
        for group in groups.values():
            group.close()
        raise
    return groups, plain, off


def _open_groups(config: Config, ports: list[int], members: tuple[int, ...], mark: int | None,
                 table: SegmentTable) -> dict[int, SteeringGroup]:
    """One steered group per port, all or none. A plain bind first: a
    port in use (a second cluster, another program) fails with the same
    line as on the relay path, before any SO_REUSEPORT socket could join
    someone else's group. ``SteeringUnavailable`` when the kernel refuses."""
    address = str(config.cluster.address)
    for port in ports:
        bind_udp(address, port, mark=mark).close()
    groups: dict[int, SteeringGroup] = {}
    try:
        for port in ports:
            try:
                group = SteeringGroup.open(address, port, members,
                                           natt=PortKind.of_port(port) is PortKind.NATT,
                                           mark=mark, bufsize=UDP_RCVBUF)
            except OSError as exc:
                raise SteeringUnavailable(
                    exc.errno, f"cannot open the steered sockets of UDP port {port}: "
                               f"{exc.strerror}") from exc
            groups[port] = group
            group.steer(table, alive=())   # until members join: all ours
    except BaseException:
        for group in groups.values():
            group.close()
        raise
    return groups


def _configured_remote(config: Config) -> tuple[TrafficSelector, ...] | None:
    """Every configured child's remote selectors: no negotiated child is wider
    (RFC 7296 §2.9 narrowing), so no member may announce a wider one."""
    out: list[TrafficSelector] = []
    for conn in config.connections.values():
        for child in conn.children.values():
            if not child.remote_ts:
                return None
            out.extend(child.remote_ts)
    return tuple(out) if out else None
