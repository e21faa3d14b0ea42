"""The dispatcher process: the cluster's single address and its I/O edge.

It owns UDP 500/4500 and the inside (TUN or UDP), classifies every datagram
and routes it with the one routing function (common/routing.py) to the member
that owns the segment, in batches over ZeroMQ; it sends what members hand back
from the cluster address, so IKE and ESP always share one address (RFC 6027
§3.8). It is the membership authority: HELLO, heartbeats, the segment table
with its epoch, failure detection.

Rules of this file: the socket callbacks do no protocol work (peek, route,
append to a bounded batch, drop and count when full); batches leave once per
loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import time
from collections import Counter
from typing import Any

import zmq
import zmq.asyncio

from common.config import Config
from common.errors import MalformedMessage
from common.routing import InsideRoutes, PortKind, RouteKind, route_datagram
from common.segments import SegmentTable
from common.spi import segment_of_esp_spi
from common.wire import (
    ChildDelete,
    ChildPush,
    Datagram,
    DatagramIn,
    DatagramOut,
    Heartbeat,
    Hello,
    InnerIn,
    InnerOut,
    Message,
    RouteAdd,
    RouteDel,
    Status,
    StatusReq,
    Sync,
    decode,
    encode,
)
from dispatcher.inside import Inside, make_inside
from dispatcher.membership import MemberInfo, Membership, RouteInfo
from dispatcher.routes import bind_udp, mark_for_tun
from member.refusals import Refusals

log = logging.getLogger("ipsec_cluster.dispatcher")

#: the HELLO version that opens a member's bulk channel (member/process.py)
BULK = "bulk"

#: datagrams read per readiness callback, and the most a batch may hold
READ_BURST = 256
#: member frames handled per wake-up of the members loop
DRAIN_BURST = 64
MAX_BATCH = 256
#: bounded queue per member (frames ZeroMQ may hold before we drop)
MEMBER_HWM = 20_000
UDP_RCVBUF = 8 << 20
#: ZAP domain of the members endpoint (the authenticator's certificates are
#: configured for this same domain)
ZAP_DOMAIN = "ipsec-cluster"


class Dispatcher(Membership):
    def __init__(self, config: Config, endpoint: str, *,
                 curve: tuple[bytes, bytes, str] | None = None,
                 expect_members: int | None = None) -> None:
        """``curve`` = (our public key, our secret key, directory of allowed
        member public keys) for tcp:// endpoints."""
        self.config = config
        self.endpoint = endpoint
        self.curve = curve
        c = config.cluster
        self.table = SegmentTable(c.segment_bits)
        self.expect = expect_members if expect_members is not None else c.expect_members
        self.members: dict[int, MemberInfo] = {}
        self.by_identity: dict[bytes, int] = {}
        self.next_sender_id = 1
        self.routes = InsideRoutes()
        self.route_info: dict[int, RouteInfo] = {}
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.udp: dict[int, socket.socket] = {}
        self.inside: Inside | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
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
        #: members getting their share of segments, and segments whose future
        #: owner is already their backup (segment -> (member, since))
        self.balancing: set[int] = set()
        #: each member's second connection, for bulk state transfers
        self.bulk_identity: dict[int, bytes] = {}
        self.by_bulk_identity: dict[bytes, int] = {}
        self.prepared: dict[int, tuple[int, float]] = {}
        self._last_balance = 0.0

    # -- network in -----------------------------------------------------------------

    def _readable(self, port: int) -> None:
        sock = self.udp[port]
        kind = PortKind.of_port(port)
        table = self.table
        members = self.members
        family = sock.family
        received = 0
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
            if info is None or not info.alive:
                self.drops["no_owner"] += 1
                continue
            if len(info.datagrams) >= MAX_BATCH * 4:
                self.drops["member_queue_full"] += 1
                continue
            info.datagrams.append(Datagram(port, peer_ip, addr[1], data))
        self.counters["udp_in"] += received
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
        if info is None or not info.alive:
            self.drops["inner_no_route"] += 1
            return
        if len(info.inner) >= MAX_BATCH * 4:
            self.drops["member_queue_full"] += 1
            return
        info.inner.append(packet)
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
            self._member_frames(await self.router.recv_multipart(copy=True))
            self._drain_members()

    def _drain_members(self) -> None:
        """Handle up to DRAIN_BURST queued member frames without awaiting."""
        shadow = self._shadow
        if shadow is None:
            return
        for _ in range(DRAIN_BURST):
            try:
                frames = shadow.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._member_frames(frames)

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

    def _from_member(self, identity: bytes, seq: int, msg: Message) -> None:
        if isinstance(msg, Hello):
            if msg.version == BULK:
                self.bulk_identity[msg.member_id] = identity
                self.by_bulk_identity[identity] = msg.member_id
            else:
                self._hello(identity, msg)
            return
        if identity.endswith(b"-hb"):
            self._liveness(identity, msg)
            return
        bulk_member = self.by_bulk_identity.get(identity)
        if bulk_member is not None:
            if isinstance(msg, Sync) and msg.src == bulk_member:
                self._relay_bulk(msg)
            else:
                self.drops["bulk_not_sync"] += 1
            return
        member_id = self.by_identity.get(identity)
        info = self.members.get(member_id) if member_id is not None else None
        if info is None:
            self.drops["unknown_member"] += 1
            return
        lost = info.rx.check(seq)
        if lost > 0:
            info.gaps += lost
        if not info.alive and not isinstance(msg, Heartbeat):
            # Declared dead: its segments have a new owner, so whatever this
            # incarnation still says (IKE, ESP, routes) would be a second
            # sender for the same SAs (RFC 6027 §3.7). It must rejoin anew.
            self.drops["dead_member"] += 1
            return
        if isinstance(msg, DatagramOut):
            sent = 0
            for d in msg.datagrams:
                sock = self.udp.get(d.local_port)
                if sock is None:
                    self.drops["no_socket"] += 1
                    continue
                ip = d.peer_ip
                try:
                    sock.sendto(d.payload, (socket.inet_ntop(
                        socket.AF_INET if len(ip) == 4 else socket.AF_INET6, ip), d.peer_port))
                    sent += 1
                except BlockingIOError:
                    self.drops["udp_send_full"] += 1
                except OSError:
                    self.drops["udp_send_error"] += 1
            self.counters["udp_out"] += sent
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
            info.last_seen = time.monotonic()
            info.counters = dict(msg.counters)
            if not info.alive and not info.back_logged:
                info.back_logged = True
                log.warning("member %d (pid %d) is back after being declared dead; its "
                            "output is ignored until it rejoins", info.member_id, info.pid)
        elif isinstance(msg, RouteAdd):
            self.routes.add(msg.child_id, msg.local_ts, msg.remote_ts, msg.member)
            self.route_info[msg.child_id] = RouteInfo(msg.member, msg.local_ts, msg.remote_ts)
        elif isinstance(msg, RouteDel):
            r = self.route_info.get(msg.child_id)
            if r is not None and r.member == info.member_id:
                # (a member that no longer carries the child cannot remove the
                # route of the one that took it over)
                self.routes.remove(msg.child_id)
                del self.route_info[msg.child_id]
        elif isinstance(msg, ChildPush | ChildDelete):
            self._relay(msg, info.member_id)
        elif isinstance(msg, Sync):
            self._relay_sync(msg, info.member_id)
        elif isinstance(msg, Status):
            self._status_pending[info.member_id] = json.loads(msg.json)
            self._status_done()

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

    def _liveness(self, identity: bytes, msg: Message) -> None:
        """A heartbeat from a member's heartbeat thread (its own connection)."""
        if not isinstance(msg, Heartbeat) or identity != f"member-{msg.member_id}-hb".encode():
            self.drops["heartbeat_bad"] += 1
            return
        info = self.members.get(msg.member_id)
        if info is not None and info.alive and info.sender_id == msg.sender_id:
            info.last_seen = time.monotonic()

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

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        members = []
        for m, info in sorted(self.members.items()):
            members.append({
                "id": m, "pid": info.pid, "host": info.host, "alive": info.alive,
                "sender_id": info.sender_id,
                "last_heartbeat_ms": round((now - info.last_seen) * 1000),
                "segments": len(self.table.segments_of(m)),
                "backup_segments": len(self.table.backups_of(m)),
                "ike_sas": info.counters.get("ike_sas", 0),
                "half_open_ike_sas": info.counters.get("half_open", 0),
                "child_sas": info.counters.get("child_sas", 0),
                "packets_in": info.counters.get("c.esp_in", 0),
                "bytes_in": info.counters.get("c.esp_in_bytes", 0),
                "packets_out": info.counters.get("c.esp_out", 0),
                "bytes_out": info.counters.get("c.esp_out_bytes", 0),
                "drops": {k[5:]: v for k, v in info.counters.items() if k.startswith("drop.")},
                # refused input and failed messages, by reason (member/refusals.py)
                "refused": {k[8:]: v for k, v in info.counters.items()
                            if k.startswith("refused.")},
                "sync_gaps": info.gaps + info.counters.get("sync_gaps", 0),
                # RFC 6027 §3.6: whether this member's SAs are safe from its death
                "replication": {
                    "ike_replicas": info.counters.get("ike_replicas", 0),
                    "child_replicas": info.counters.get("child_replicas", 0),
                    "unreplicated_changes": info.counters.get("sync.ike_unreplicated", 0),
                    "ack_timeouts": info.counters.get("sync.ack_timeouts", 0),
                    "held": info.counters.get("held", 0),
                    "sync_out": info.counters.get("sync.sync_out", 0),
                    "sync_in": info.counters.get("sync.sync_in", 0),
                    "takeovers": info.counters.get("sync.takeovers", 0),
                    "degraded": self._backup_missing(m),
                },
                # every synch-channel counter of the member (member/replication.py):
                # sync_gaps, bulk_sent, sync_dropped_on_purpose, rekeys_after_failover, ...
                "sync": {k[5:]: v for k, v in info.counters.items() if k.startswith("sync.")},
            })
        return {"cluster": {"address": str(self.config.cluster.address),
                            "mode": self.config.cluster.mode, "epoch": self.table.epoch,
                            "uptime_s": round(time.time() - self.started, 1),
                            "endpoint": self.endpoint},
                "dispatcher": {"pid": os.getpid(), "counters": dict(self.counters),
                               "drops": dict(self.drops), "inside_routes": len(self.routes),
                               "refused": dict(self._refusals().counts)},
                "members": members, "pools": self._pools_status()}

    def _pools_status(self) -> list[dict[str, Any]]:
        """Each ``[pools.NAME]`` and how many of its addresses the live members
        have leased (the addresses themselves: ``sas``, per IKE SA)."""
        from common.pools import Pool

        out = []
        bits = self.config.cluster.segment_bits
        for p in self.config.pools.values():
            pool = Pool(p.name, p.addrs, p.dns, bits)
            by_member = {m: info.counters.get(f"pool.{p.name}", 0)
                         for m, info in sorted(self.members.items()) if info.alive}
            out.append({"name": p.name, "addrs": str(p.addrs), "dns": [str(a) for a in p.dns],
                        "size": pool.size, "per_segment": pool.per_segment(0),
                        "leased": sum(by_member.values()), "by_member": by_member})
        return out

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

    def _status_done(self) -> None:
        alive = {m for m, i in self.members.items() if i.alive}
        if alive <= set(self._status_pending):
            for fut in self._status_waiters:
                if not fut.done():
                    fut.set_result({})
            self._status_waiters.clear()

    # -- life ---------------------------------------------------------------------------

    def _open_udp(self, port: int) -> None:
        # No SO_REUSEADDR: a socket of another user (or a second cluster) bound
        # beside ours would take our datagrams; the bind fails instead, with
        # one line naming the holder (StartupError). With a TUN inside the
        # socket carries SO_MARK so our own IKE/ESP bypass the tunnel's table.
        c = self.config.cluster
        sock = bind_udp(str(c.address), port, mark=mark_for_tun(c.inside.kind, c.inside.route_mark),
                        bufsize=UDP_RCVBUF)
        self.udp[port] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, port)

    def _start_auth(self) -> None:
        if self.curve is None:
            return
        public, secret, allowed_dir = self.curve
        self.auth = _authenticator(allowed_dir, self.drops)
        self.auth.start()
        # The ZAP request carries the socket's zap_domain; certificates
        # configured for another domain ("*" included) match nothing.
        self.auth.configure_curve(domain=ZAP_DOMAIN, location=allowed_dir)
        self.router.curve_server = True
        self.router.curve_publickey = public
        self.router.curve_secretkey = secret
        self.router.zap_domain = ZAP_DOMAIN.encode()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        c = self.config.cluster
        # The ports first: a second cluster with the same config fails here,
        # before its bind replaces the first one's members socket.
        for port in sorted({c.ike_port, c.natt_port}):
            self._open_udp(port)
        self._start_auth()
        self.router.bind(self.endpoint)
        address = str(c.inside_address) if c.inside_address is not None else None
        routes = [n for conn in self.config.connections.values()
                  for ch in conn.children.values() for n in ch.remote_nets]
        self.inside = make_inside(c.inside, address=address, routes=routes)
        await self.inside.start(self._inner)
        log.info("dispatcher on %s ports %s, members at %s", c.address, sorted(self.udp),
                 self.endpoint)

    async def run(self) -> None:
        await self.start()
        tasks = [asyncio.ensure_future(self._members_loop()),
                 asyncio.ensure_future(self._monitor())]
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
        if self.inside is not None:
            self.inside.close()
        self._shadow = None
        self.router.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


def _authenticator(allowed_dir: str, drops: Counter[str]) -> Any:
    """pyzmq's ZAP authenticator, but a refused member is a counted drop
    (``member_refused``) and a WARNING (pyzmq logs it at DEBUG only): the
    first refusal of each key, since a refused member reconnects every
    100 ms."""
    from zmq.auth.asyncio import AsyncioAuthenticator
    from zmq.utils import z85

    zap_log = logging.getLogger("ipsec_cluster.zap")
    refused: set[bytes] = set()

    class Authenticator(AsyncioAuthenticator):

        async def _authenticate_curve(self, domain: str,
                                      client_key: bytes) -> tuple[bool, bytes]:
            result = super()._authenticate_curve(domain, client_key)
            allowed, reason = await result if inspect.isawaitable(result) else result
            if not allowed:
                drops["member_refused"] += 1
                key = z85.encode(client_key)
                level = logging.DEBUG if key in refused else logging.WARNING
                refused.add(key)
                zap_log.log(level, "refused a member: CURVE key %s is not in %s (%s)",
                            key.decode(), allowed_dir, reason.decode(errors="replace"))
            return bool(allowed), reason

    auth = Authenticator(zmq.asyncio.Context.instance())
    auth.log = zap_log
    return auth
