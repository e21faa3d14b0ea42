"""A member process: one ``Member`` behind the dispatcher, over ZeroMQ.

The member is a DEALER connected to the dispatcher's ROUTER (ipc:// on one
host, tcp:// with CURVE across hosts). Everything it hears comes in batches
(DATAGRAM_IN, INNER_IN) or as control messages (TABLE, CHILD_PUSH, ...);
everything it says goes back the same way. Like the gateway shell, it feeds
the core, flushes what the core wants sent, and re-arms one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import zmq
import zmq.asyncio

from common.config import Config
from common.errors import MalformedMessage
from common.ike.sa import Outgoing
from common.natt import NON_ESP_MARKER, Kind, classify_4500
from common.routing import init_segment
from common.segments import SegmentTable
from common.spi import segment_of_esp_spi
from common.wire import (
    Channel,
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
    StreamSeq,
    Sync,
    TableUpdate,
    decode,
    encode,
)
from member.rawinside import RawInside
from member.replication import Replicator
from member.timer import CoreTimer
from member.worker import Member

log = logging.getLogger("ipsec_cluster.member")

VERSION = "0.1.0"
#: the heartbeat thread stays silent once the event loop is stuck this long
WATCHDOG_S = 5.0
#: frames handled per wake-up of the receive loop
DRAIN_BURST = 64
#: bytes of a connection's random routing id (per incarnation and channel)
ROUTING_ID_BYTES = 16


def _routing_id() -> bytes:
    """A routing id nobody can guess: ZeroMQ routes the dispatcher's messages
    for us by it, and a connection holding it while we are away would get
    them (the first byte non-zero: zero is ZeroMQ's own)."""
    return b"m" + os.urandom(ROUTING_ID_BYTES - 1)


def _ip(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


#: packed peer IP -> its text (str(ipaddress...) costs ~2-4 us per datagram)
_IP_TEXT: dict[bytes, str] = {}
_IP_TEXT_MAX = 4096


def _ip_cached(packed: bytes) -> str:
    text = _IP_TEXT.get(packed)
    if text is None:
        if len(_IP_TEXT) >= _IP_TEXT_MAX:
            _IP_TEXT.clear()
        text = _IP_TEXT[packed] = _ip(packed)
    return text


class MemberProcess:
    def __init__(self, config: Config, member_id: int, endpoint: str, *,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        """``curve`` = (our public key, our secret key, the dispatcher's public key)."""
        self.config = config
        self.member_id = member_id
        self.endpoint = endpoint
        self.curve = curve
        self.table: SegmentTable | None = None
        self.loads: dict[int, int] = {}
        self.member: Member | None = None
        self.sender_id = 0
        #: our incarnation's secret (from the dispatcher), for our other channels
        self.token = 0
        self.seq = StreamSeq()
        self.rx_seq = StreamSeq()
        self.gaps = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer = CoreTimer(self._fire)
        self._placed = 0
        self._stop = asyncio.Event()
        self.replicator: Replicator | None = None
        self.raw_inside = RawInside.open_if_possible(config.cluster.inside.kind) \
            if not endpoint.startswith("tcp://") else None
        self.progress = 0.0
        self._hb_stop = threading.Event()
        #: a test hook (env IPSEC_CLUSTER_SYNC_DROP): lose this share of sync messages
        self.sync_drop_rate = float(os.environ.get("IPSEC_CLUSTER_SYNC_DROP", "0") or 0)
        ctx = zmq.asyncio.Context.instance()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, _routing_id())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve
        # The bulk channel: state transfers to a joining member (and resyncs)
        # travel on their own connection, so they never queue ahead of live
        # traffic and live sync messages.
        self.bulk = ctx.socket(zmq.DEALER)
        self.bulk.setsockopt(zmq.IDENTITY, _routing_id())
        self.bulk.setsockopt(zmq.LINGER, 0)
        self.bulk.setsockopt(zmq.SNDHWM, 1_000_000)
        self.bulk.setsockopt(zmq.RCVHWM, 1_000_000)
        if curve is not None:
            self.bulk.curve_publickey, self.bulk.curve_secretkey, self.bulk.curve_serverkey = curve
        self.bulk_seq = StreamSeq()

    # -- sending ------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        # A zmq.asyncio socket does not raise on NOBLOCK: EAGAIN (no dispatcher
        # connected, or its queue full) is in the returned, already done future.
        fut = asyncio.ensure_future(self.sock.send(encode(msg, self.seq.next()),
                                                   flags=zmq.NOBLOCK))
        fut.add_done_callback(self._sent)

    def send_bulk(self, msg: Message) -> None:
        fut = asyncio.ensure_future(self.bulk.send(encode(msg, self.bulk_seq.next()),
                                                   flags=zmq.NOBLOCK))
        fut.add_done_callback(self._sent)

    async def _bulk_loop(self) -> None:
        while not self._stop.is_set():
            frame = await self.bulk.recv(copy=True)
            try:
                _seq, msg = decode(frame)
            except MalformedMessage as exc:
                log.warning("member %d: bad bulk frame: %s", self.member_id, exc)
                continue
            if isinstance(msg, Sync) and self.replicator is not None and self.loop is not None:
                self.replicator.on_sync(msg, self.loop.time(), channel="bulk")
                self.flush()

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None and self.member is not None:
            self.member.drops["zmq_full" if isinstance(exc, zmq.Again) else "zmq_error"] += 1

    def flush(self) -> None:
        m = self.member
        rep = self.replicator
        if m is None or rep is None or self.loop is None:
            return
        now = self.loop.time()
        for notice in m.notices:
            if isinstance(notice, RouteAdd):
                route = m.by_spi.get(notice.child_id)
                if route is not None:
                    rep.child_installed(notice.child_id, route, route.ike_spi)
            elif isinstance(notice, RouteDel):
                rep.child_removed(notice.child_id)
            self.send(notice)
        m.notices.clear()
        # RFC 6027 §3.6: what an IKE SA change produced leaves only once the
        # backup has the new state.
        self.emit(rep.outgoing(m.ike_out(), m.touched, now))
        m.touched.clear()
        self._arm()

    def emit(self, outs: list[Outgoing]) -> None:
        out = []
        for o in outs:
            data = o.data if o.local_port == 500 else NON_ESP_MARKER + o.data
            out.append(Datagram(o.local_port, ipaddress.ip_address(o.remote[0]).packed,
                                o.remote[1], data))
        if out:
            self.send(DatagramOut(out))

    # -- placement ------------------------------------------------------------------

    def owner_of_esp(self, spi: int) -> int:
        table = self.table
        if table is None:
            return self.member_id
        owner = table.owner(segment_of_esp_spi(spi, table.segment_bits))
        return self.member_id if owner is None else owner

    def esp_segment(self) -> int:
        """Least loaded member (children it carries, as the dispatcher last told
        us, plus what we placed since), then one of its segments."""
        table = self.table
        if table is None or not table.members:
            return self.member.spis.segments[0] if self.member else 0
        members = [m for m in table.members if table.segments_of(m)]
        target = min(members, key=lambda m: (self.loads.get(m, 0), m != self.member_id))
        self.loads[target] = self.loads.get(target, 0) + 1
        segs = table.segments_of(target)
        self._placed += 1
        return segs[self._placed % len(segs)]

    # -- receiving ------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        if isinstance(msg, DatagramIn):
            self._datagrams(msg)
        elif isinstance(msg, InnerIn):
            self._inner(msg)
        elif isinstance(msg, TableUpdate):
            self._table(msg.table)
        elif isinstance(msg, Heartbeat):
            self._dispatcher_heartbeat(msg)
        elif isinstance(msg, ChildPush):
            self._child_push(msg)
        elif isinstance(msg, Sync):
            if self.replicator is not None and self.loop is not None:
                self.replicator.on_sync(msg, self.loop.time())
        elif isinstance(msg, ChildDelete):
            if self.member is not None:
                self.member.remove_pushed(msg.spi_in)
            if self.replicator is not None:
                self.replicator.child_replicas.pop(msg.spi_in, None)
        elif isinstance(msg, StatusReq):
            self.send(Status(json.dumps(self.status()).encode()))
        self.flush()

    def _child_push(self, push: ChildPush) -> None:
        m, rep, table = self.member, self.replicator, self.table
        if m is None or rep is None or table is None:
            return
        segment = segment_of_esp_spi(push.spi_in, table.segment_bits)
        if table.owner(segment) == self.member_id:
            if push.spi_in not in m.by_spi:
                m.install_pushed(push)
        else:
            rep.push_replica(push)

    def _dispatcher_heartbeat(self, hb: Heartbeat) -> None:
        if self.member is None:
            # The dispatcher's answer to HELLO: our incarnation's sender id.
            # (the token first: the heartbeat thread starts on the sender id)
            self.token = hb.token
            self.sender_id = hb.sender_id
            self.member = Member(self.config, member_id=self.member_id,
                                 sender_id=hb.sender_id, segments=[0],
                                 owner_of_esp=self.owner_of_esp, esp_segment=self.esp_segment)
            c = self.config.cluster
            self.replicator = Replicator(
                self.member_id, self.member, self.send, self.emit,
                send_bulk=self.send_bulk, seq_sync_packets=c.seq_sync_packets,
                seq_sync_interval=c.seq_sync_interval,
                replay_policy=c.replay_after_failover, drop_rate=self.sync_drop_rate)
            log.info("member %d: sender id %d", self.member_id, hb.sender_id)
            # the bulk channel is this incarnation's (DESIGN.md "Trust model")
            self.send_bulk(self._hello(Channel.BULK))
        self.loads = {int(k[5:]): v for k, v in hb.counters.items() if k.startswith("load.")}

    def _table(self, table: SegmentTable) -> None:
        old, self.table = self.table, table
        if self.member is not None and self.replicator is not None and self.loop is not None:
            mine = table.segments_of(self.member_id)
            self.member.spis.set_segments(mine)
            log.info("member %d: table epoch %d, %d segments", self.member_id, table.epoch,
                     len(mine))
            self.replicator.on_table(old, table, self.loop.time())

    def _datagrams(self, msg: DatagramIn) -> None:
        m = self.member
        if m is None or self.loop is None:
            return
        now = self.loop.time()
        inner: list[bytes] = []
        n_bytes = 0
        handle_esp = m.handle_esp
        for d in msg.datagrams:
            remote = (_ip_cached(d.peer_ip), d.peer_port)
            payload = bytes(d.payload)
            if d.local_port == 500:
                self._ike(payload, d, remote, now)
                continue
            try:
                kind, spi = classify_4500(payload)
            except MalformedMessage:
                m.drops["udp_malformed"] += 1
                continue
            if kind is Kind.ESP:
                packet = handle_esp(payload, spi, remote, now)
                if packet is not None:
                    n_bytes += len(packet)
                    inner.append(packet)
            elif kind is Kind.IKE:
                self._ike(payload[4:], d, remote, now)
        if inner:
            m.counters["esp_in"] += len(inner)
            m.counters["esp_in_bytes"] += n_bytes
            raw = self.raw_inside
            if raw is not None:
                # Straight into the kernel: the dispatcher handles the packet once.
                back = [p for p in inner if not raw.write(p)]
                if back:
                    self.send(InnerOut(back))
            else:
                self.send(InnerOut(inner))
            if self.replicator is not None:
                self.replicator.esp_tick(now, len(inner))

    def _ike(self, data: bytes, d: Datagram, remote: tuple[str, int], now: float) -> None:
        m = self.member
        if m is None:
            return
        table = self.table
        if table is not None and len(data) >= 28 and data[8:16] == bytes(8):
            # IKE_SA_INIT: our responder SPI goes into the segment the dispatcher
            # hashed it to (the same function, common/routing.py).
            m.spis.next_ike_segment = init_segment(d.peer_ip, d.peer_port, data[:8],
                                                   table.segment_bits)
        m.handle_ike(data, remote, d.local_port, now)
        m.spis.next_ike_segment = None

    def _inner(self, msg: InnerIn) -> None:
        m = self.member
        if m is None:
            return
        out = []
        natt = self.config.cluster.natt_port
        n_bytes = 0
        handle_inner = m.handle_inner
        for p in msg.packets:
            res = handle_inner(bytes(p))
            if res is not None:
                esp, remote = res
                n_bytes += len(p)
                host = remote[0]
                out.append(Datagram(natt, socket.inet_pton(
                    socket.AF_INET6 if ":" in host else socket.AF_INET, host), remote[1], esp))
        if out:
            m.counters["esp_out"] += len(out)
            m.counters["esp_out_bytes"] += n_bytes
            self.send(DatagramOut(out))
            if self.replicator is not None and self.loop is not None:
                self.replicator.esp_tick(self.loop.time(), len(out))

    # -- timers ---------------------------------------------------------------------

    def _arm(self) -> None:
        if self.loop is not None and self.member is not None:
            self._timer.arm(self.loop, self.member.get_timer())

    def _fire(self) -> None:
        if self.member is not None and self.loop is not None:
            self.member.handle_timer(self.loop.time())
            self.flush()

    # -- status -----------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        m = self.member
        if m is None:
            return {}
        c: dict[str, int] = {f"c.{k}": v for k, v in m.counters.items()}
        c.update({f"drop.{k}": v for k, v in m.drops.items()})
        c.update({f"drop.ike_{k}": v for k, v in m.engine.drops.items()})
        c["ike_sas"] = len(m.engine.established())
        c["child_sas"] = len(m.by_spi)
        c["sync_gaps"] = self.gaps
        if self.raw_inside is not None:
            c["c.inner_raw"] = self.raw_inside.sent
            c["drop.inner_raw"] = self.raw_inside.drops
        if self.replicator is not None:
            c.update({f"sync.{k}": v for k, v in self.replicator.counters.items()})
            c["ike_replicas"] = len(self.replicator.ike_replicas)
            c["child_replicas"] = len(self.replicator.child_replicas)
            c["held"] = len(self.replicator.held)
        return c

    def status(self) -> dict[str, Any]:
        m = self.member
        if m is None:
            return {"member": self.member_id, "ike_sas": [], "child_sas": []}
        return {"member": self.member_id, "pid": os.getpid(), **m.snapshot()}

    # -- life ---------------------------------------------------------------------------

    def _heartbeat_thread(self) -> None:
        """Liveness on its own thread and connection: a busy event loop (a
        burst of handshakes, a bulk transfer) must not look like a dead member.
        A watchdog keeps it honest: no heartbeat once the loop has made no
        progress for WATCHDOG_S, so a hung member is still declared dead."""
        ctx: Any = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, _routing_id())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100)
        if self.curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.curve
        sock.connect(self.endpoint)
        interval = self.config.cluster.heartbeat_interval
        seq = StreamSeq()
        opened = 0
        try:
            while not self._hb_stop.wait(interval):
                if time.monotonic() - self.progress > WATCHDOG_S or not self.sender_id:
                    continue
                epoch = self.table.epoch if self.table else 0
                if opened != self.sender_id:
                    # this channel belongs to the incarnation (its sender id)
                    opened = self.sender_id
                    with contextlib.suppress(zmq.ZMQError):
                        sock.send(encode(self._hello(Channel.HEARTBEAT), seq.next()),
                                  zmq.NOBLOCK)
                with contextlib.suppress(zmq.ZMQError):
                    sock.send(encode(Heartbeat(self.member_id, self.sender_id, os.getpid(),
                                               epoch, {}), seq.next()), zmq.NOBLOCK)
        finally:
            sock.close(linger=0)

    def _hello(self, channel: Channel) -> Hello:
        if channel is Channel.LIVE:
            return Hello(self.member_id, os.getpid(), socket.gethostname(), VERSION, channel)
        return Hello(self.member_id, os.getpid(), socket.gethostname(), VERSION, channel,
                     self.sender_id, self.token)

    async def heartbeats(self) -> None:
        interval = self.config.cluster.heartbeat_interval
        while not self._stop.is_set():
            self.progress = time.monotonic()
            epoch = self.table.epoch if self.table else 0
            if not self.sender_id:
                # Not a member yet: the dispatcher refuses a HELLO while the
                # previous incarnation of our id is alive; ask again.
                self.send(self._hello(Channel.LIVE))
                await asyncio.sleep(interval)
                continue
            self.send(Heartbeat(self.member_id, self.sender_id, os.getpid(), epoch,
                                self.counters()))
            rep, loop = self.replicator, self.loop
            if rep is not None and loop is not None:
                now = loop.time()
                self.emit(rep.release_expired(now))
                rep.esp_tick(now, 0)
            await asyncio.sleep(interval)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock.connect(self.endpoint)
        self.bulk.connect(self.endpoint)
        hb = asyncio.ensure_future(self.heartbeats())
        bulk = asyncio.ensure_future(self._bulk_loop())
        self.progress = time.monotonic()
        thread = threading.Thread(target=self._heartbeat_thread, name="heartbeat", daemon=True)
        thread.start()
        try:
            # One awaited recv, then what else is queued with plain
            # non-blocking recvs on a shadow socket (as the dispatcher's
            # members loop does): the awaited recv costs several times more.
            shadow: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
            while not self._stop.is_set():
                self._frame(await self.sock.recv(copy=True))
                for _ in range(DRAIN_BURST):
                    try:
                        frame = shadow.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._frame(frame)
        finally:
            self._hb_stop.set()
            hb.cancel()
            bulk.cancel()
            self.sock.close(linger=0)
            self.bulk.close(linger=0)

    def _frame(self, frame: bytes) -> None:
        try:
            seq, msg = decode(frame)
        except MalformedMessage as exc:
            if self.member is not None:
                self.member.drops["wire_malformed"] += 1
            log.warning("member %d: bad frame from dispatcher: %s", self.member_id, exc)
            return
        lost = self.rx_seq.check(seq)
        if lost > 0:
            self.gaps += lost
        self.handle(msg)

    def stop(self) -> None:
        self._stop.set()
