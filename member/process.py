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
import ctypes
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from common.cluster.events import Event
from common.cluster.placement import least_loaded, read_loads
from common.cluster.routing import init_segment
from common.cluster.segments import SegmentTable
from common.cluster.spi import segment_of_esp_spi
from common.cluster.stats import MemberStats, Replicas
from common.cluster.wire import (
    MAX_EVENTS,
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
    StreamSeq,
    Sync,
    TableUpdate,
    Timing,
    decode,
    encode,
)
from common.config import MAX_MEMBERS, Config
from common.errors import MalformedMessage, StartupError
from common.esp.iv import MAX_SENDER_ID
from common.esp.natt import NON_ESP_MARKER, Bytes, Kind, classify_4500
from common.ike.context import Outgoing
from member.batch_io import recv_batch, send_batch
from member.rawinside import RawInside
from member.refusals import Refusals
from member.replication import Replicator
from member.timer import CoreTimer
from member.tuns import TunReader
from member.worker import Member, child_refusal
from member.worker import control as member_control
from member.worker import reload as reload_member

log = logging.getLogger("ipsec_cluster.member")

#: the heartbeat thread stays silent once the event loop is stuck this long
WATCHDOG_S = 5.0
#: frames handled per wake-up of the receive loop
DRAIN_BURST = 64
#: where messages from the dispatcher come from, for the refusal log
DISPATCHER = "dispatcher"
#: a timer run that failed is retried no sooner than this
TIMER_RETRY_S = 0.1
#: SA events held for the dispatcher at most (between two flushes)
MAX_EVENTS_QUEUED = 4096
#: exit statuses (docs/operations.md "Members on other hosts"): our HELLO
#: was refused for good (timing keys, like a bad config: do not restart us);
#: a newer incarnation of our member id took our place (do not restart us:
#: it would fight the newer one); we must rejoin as a new incarnation
#: (declared dead, or no dispatcher for ``orphan_after``: restart us)
EXIT_REFUSED = 2
EXIT_REPLACED = 3
EXIT_REJOIN = 75


def heartbeat_refusal(hb: Heartbeat, sender_id: int, term: int = 0) -> str | None:
    """Why a HEARTBEAT from the dispatcher is refused, or None. Ours carry
    member id 0, our incarnation's IV sender id (fixed once given: changing
    it under live SAs would reuse IVs, RFC 6027 §3.7.1), the loads of
    members (``Heartbeat.loads``, read by ``placement.read_loads``) and the
    dispatcher's term, never below ``term``, the highest we saw (a lower one
    is a deposed dispatcher's: its sender ids and liveness are not ours to
    take, docs/failover.md "Two dispatcher hosts")."""
    if hb.member_id != 0:
        return "not_from_dispatcher"
    if hb.term < term:
        return "stale_term"
    if not 1 <= hb.sender_id <= MAX_SENDER_ID:
        return "bad_sender_id"
    if sender_id and hb.sender_id != sender_id:
        return "sender_id_changed"
    return None


def table_refusal(old: SegmentTable | None, new: SegmentTable, segment_bits: int, *,
                  term: int = 0, seen: int = 0, old_term: int = 0) -> str | None:
    """Why a TABLE update is refused, or None: our segment arithmetic needs our
    ``segment_bits``; a table of a dispatcher whose ``term`` is below the
    highest we ``seen`` is a deposed dispatcher's (it moves no segment of
    ours); (term, epoch) never goes back (a replayed old table would hand our
    segments to a dead member; ``old_term``: the term of the table we hold);
    member ids are 1..MAX_MEMBERS."""
    if new.segment_bits != segment_bits:
        return "bad_segment_bits"
    if term < seen:
        return "stale_term"
    if old is not None and (term, new.epoch) < (old_term, old.epoch):
        return "epoch_backwards"
    if any(not 1 <= m <= MAX_MEMBERS for m in new.members):
        return "bad_member"
    return None
#: bytes of a connection's random routing id (per incarnation and channel)
ROUTING_ID_BYTES = 16


def _routing_id() -> bytes:
    """A routing id nobody can guess: ZeroMQ routes the dispatcher's messages
    for us by it, and a connection holding it while we are away would get
    them (the first byte non-zero: zero is ZeroMQ's own)."""
    return b"m" + os.urandom(ROUTING_ID_BYTES - 1)


#: datagrams read from a steered socket per wake-up
UDP_BURST = 256


def _recv_burst(sock: socket.socket, port: int) -> tuple[list[Datagram], int]:
    """Up to UDP_BURST datagrams queued on ``sock`` (the cluster's ``port``),
    one ``recvmmsg`` (member/batch_io.py), and how many were too long."""
    items, truncated = recv_batch(sock.fileno(), UDP_BURST)
    return [Datagram(port, ip, peer_port, data) for data, ip, peer_port in items], truncated


#: peer IP text -> packed (inet_pton per ESP packet out: ~0.3 us)
_IP_PACKED: dict[str, bytes] = {}


def _packed_ip(host: str) -> bytes:
    packed = _IP_PACKED.get(host)
    if packed is None:
        if len(_IP_PACKED) >= _IP_TEXT_MAX:
            _IP_PACKED.clear()
        packed = _IP_PACKED[host] = socket.inet_pton(
            socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    return packed


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


#: set by the supervisor that started us (dispatcher/supervisor.py): its pid
SUPERVISOR_PID_ENV = "IPSEC_CLUSTER_SUPERVISOR_PID"
#: prctl(2) option: the signal we get when our parent dies
PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """A member started by a supervisor ends when the supervisor does (also
    on kill -9): PR_SET_PDEATHSIG, then a check that the parent did not die
    before the prctl (we would be orphaned already). Unset environment
    variable: a member started by hand, or one meant to outlive its
    supervisor (IPSEC_CLUSTER_KEEP_MEMBERS=1 on the supervisor)."""
    parent = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not parent.isdigit():
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != int(parent):
        os._exit(1)


class MemberProcess:
    def __init__(self, config: Config, member_id: int, endpoint: str, *,
                 curve: tuple[bytes, bytes, bytes] | None = None,
                 udp: dict[int, socket.socket] | None = None,
                 tun_fd: int | None = None,
                 standby: tuple[str, bytes | None] | None = None) -> None:
        """``curve`` = (our public key, our secret key, the dispatcher's public
        key); ``udp``: port -> our socket of the cluster's steered group on
        that port (the kernel data path: we receive our own IKE and ESP on it
        and send from the cluster's address with it; empty: the relay);
        ``tun_fd``: our own TUN device (member/tuns.py), read once we joined;
        ``standby``: the other dispatcher of a two-host pair (its endpoint
        and public key): we talk to one at a time and try the other when ours
        is silent for ``dead_after`` intervals (docs/failover.md "Two
        dispatcher hosts")."""
        self.config = config
        #: the dispatchers we know (endpoint, its public key), and which one
        #: we talk to now
        self.endpoints: list[tuple[str, bytes | None]] = [
            (endpoint, curve[2] if curve is not None else None)]
        if standby is not None:
            self.endpoints.append(standby)
        self.current = 0
        #: when we last turned to another dispatcher, and when one last told
        #: us it is the standby (loop time)
        self.switched = 0.0
        self.standby_heard = 0.0
        #: the highest dispatcher term we saw: anything of a lower term (a
        #: deposed dispatcher's heartbeat, table or notice) is refused
        self.term = 0
        #: the term of the table we hold
        self.table_term = 0
        self.udp = udp if udp is not None else {}
        #: the file ``reload`` re-reads (set by ``run_member``)
        self.config_path: str | None = None
        self.member_id = member_id
        self.endpoint = endpoint
        self.curve = curve
        self.table: SegmentTable | None = None
        self.loads: dict[int, int] = {}
        self.member: Member | None = None
        self.sender_id = 0
        #: our incarnation's secret (from the dispatcher), for our other channels
        self.token = 0
        #: when we last heard a dispatcher heartbeat (loop time; a reattach
        #: follows ``dead_after`` silent intervals, a clean stop ``orphan_after``)
        self.heard = 0.0
        #: bumped when we (re)attached: the heartbeat thread opens its channel anew
        self.attached = 0
        #: when our last reattach HELLO left (loop time; 0: not reattaching)
        self.reattaching = 0.0
        #: the pid in the dispatcher's heartbeats (another one: a new dispatcher)
        self.dispatcher_pid = 0
        self.seq = StreamSeq()
        self.rx_seq = StreamSeq()
        self.gaps = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer = CoreTimer(self._fire)
        self._placed = 0
        self._stop = asyncio.Event()
        self.replicator: Replicator | None = None
        #: SA events not yet sent to the dispatcher
        self.events_out: list[Event] = []
        inside = config.cluster.inside
        self.raw_inside = RawInside.open_if_possible(inside.kind, inside.route_mark) \
            if not endpoint.startswith("tcp://") else None
        #: the cleartext of our children, routed to us by the kernel
        self.tun = TunReader(tun_fd, self._tun_packets, name=f"member {member_id}'s TUN") \
            if tun_fd is not None else None
        self.progress = 0.0
        self._hb_stop = threading.Event()
        self.refusals = Refusals(log, name=f"member {member_id}")
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

    # -- two dispatchers -----------------------------------------------------------

    def _switch(self, why: str) -> None:
        """Turn to the other dispatcher (both our sockets; the heartbeat
        thread follows): a DEALER talks to one dispatcher at a time."""
        if len(self.endpoints) < 2 or self.loop is None:
            return
        old, _ = self.endpoints[self.current]
        self.current = (self.current + 1) % len(self.endpoints)
        new, key = self.endpoints[self.current]
        for sock in (self.sock, self.bulk):
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(old)
            if key is not None:
                sock.curve_serverkey = key
            sock.connect(new)
        self.endpoint = new
        self.switched = self.loop.time()
        self.rx_seq = StreamSeq()
        self.attached += 1
        if self.reattaching:
            # (the next reattach HELLO goes to the new one at once)
            self.reattaching = self.switched - self.config.cluster.heartbeat_interval
        log.warning("member %d: %s: turning to the dispatcher at %s", self.member_id, why, new)

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
                self._bulk_frame(frame)
            except Exception as exc:   # the barrier: count, log (rate-limited), go on
                self.refusals.failed("bulk", exc, DISPATCHER)

    def _bulk_frame(self, frame: bytes) -> None:
        try:
            _seq, msg = decode(frame)
        except MalformedMessage as exc:
            self.refusals.refuse("wire_malformed", DISPATCHER, exc)
            return
        if not isinstance(msg, Sync):
            self.refusals.refuse("bulk_not_sync", DISPATCHER, type(msg).__name__)
            return
        if self.replicator is not None and self.loop is not None:
            self.replicator.on_sync(msg, self.loop.time(), channel=Channel.BULK)
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
        self._send_events()
        self._arm()

    def _event(self, event: Event) -> None:
        """An SA event for the dispatcher's event stream (sent by ``flush``;
        the oldest go first when the dispatcher cannot take them)."""
        if len(self.events_out) >= MAX_EVENTS_QUEUED:
            del self.events_out[0]
            if self.member is not None:
                self.member.drops["events_queue_full"] += 1
        self.events_out.append(event)

    def _send_events(self) -> None:
        while self.events_out:
            batch = self.events_out[:MAX_EVENTS]
            del self.events_out[:MAX_EVENTS]
            self.send(Events(tuple(batch)))

    def emit(self, outs: list[Outgoing]) -> None:
        out = []
        for o in outs:
            data = o.data if o.local_port == 500 else NON_ESP_MARKER + o.data
            sock = self.udp.get(o.local_port)
            if sock is not None:
                self._sendto(sock, data, o.remote)
                continue
            out.append(Datagram(o.local_port, ipaddress.ip_address(o.remote[0]).packed,
                                o.remote[1], data))
        if out:
            self.send(DatagramOut(out))

    def send_esp(self, datagrams: list[Datagram]) -> None:
        """ESP to peers: from our own socket of the cluster's NAT-T port on
        the kernel data path, else through the dispatcher."""
        sock = self.udp.get(self.config.cluster.natt_port)
        if sock is None:
            self.send(DatagramOut(datagrams))
            return
        try:
            sent = send_batch(sock.fileno(), [(d.payload, d.peer_ip, d.peer_port)
                                              for d in datagrams])
        except (OSError, ValueError):
            sent = 0
            self._drop("udp_send_error", len(datagrams))
            return
        if sent < len(datagrams):
            self._drop("udp_send_full", len(datagrams) - sent)

    def _sendto(self, sock: socket.socket, data: bytes | bytearray | memoryview,
                remote: tuple[str, int]) -> None:
        try:
            sock.sendto(data, remote)
        except BlockingIOError:
            self._drop("udp_send_full")
        except OSError:
            self._drop("udp_send_error")

    def _drop(self, reason: str, n: int = 1) -> None:
        if self.member is not None:
            self.member.drops[reason] += n

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
        target = least_loaded(table, self.loads, self.member_id) if table is not None else None
        if table is None or target is None:
            return self.member.spis.segments[0] if self.member else 0
        self.loads[target] = self.loads.get(target, 0) + 1
        segs = table.segments_of(target)
        self._placed += 1
        return segs[self._placed % len(segs)]

    # -- receiving ------------------------------------------------------------------
    #
    # Every entry from the event loop (_frame, _bulk_frame, _fire, heartbeats)
    # is a barrier: what the dispatcher relays comes from the network and from
    # other processes, so one message may be refused (counted by reason) or
    # may fail in a way nobody foresaw (counted as bug.<where>.<type>); the
    # member goes on with the next one either way.

    def handle(self, msg: Message) -> None:
        if isinstance(msg, DatagramIn):
            self._datagrams(msg)
        elif isinstance(msg, InnerIn):
            self._inner(msg)
        elif isinstance(msg, TableUpdate):
            self._table(msg.table, msg.term)
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
        elif isinstance(msg, ControlReq):
            self.send(Control(msg.req_id, json.dumps(self._control(msg)).encode()))
        elif isinstance(msg, Notice):
            self._notice(msg)
            return
        else:
            # DATAGRAM_OUT, INNER_OUT, ROUTE_*, HELLO, STATUS: member -> dispatcher only
            self.refusals.refuse("wire_wrong_direction", DISPATCHER, type(msg).__name__)
            return
        self.flush()

    def _control(self, msg: ControlReq) -> dict[str, Any]:
        """A control API request relayed by the dispatcher (dispatcher/control.py)."""
        try:
            req = json.loads(bytes(msg.json))
        except (ValueError, UnicodeDecodeError):
            req = None
        if not isinstance(req, dict):
            return {"ok": False, "error": "control request is not a JSON object"}
        if self.member is None or self.loop is None:
            return {"ok": False, "error": f"member {self.member_id} has not joined yet"}
        now = self.loop.time()
        if req.get("cmd") == "reload":
            # the same file the dispatcher checked, re-read here (ours may
            # hold other key paths on another host)
            from member.config_file import read_config

            try:
                new = read_config(self.config_path or "")
            except StartupError as exc:
                return {"ok": False, "error": str(exc)}
            result = reload_member(self.member, new, now)
            self.config = new
            return {"ok": True, **result}
        return member_control(self.member, req, now)

    def _child_push(self, push: ChildPush) -> None:
        """RFC 6027 §3.4: a child SA from the IKE SA owner, for us to carry
        (we own its segment) or to back up. Every field is checked first: an
        unknown transform or a key of the wrong length would fail later, in
        the middle of the data path or of a takeover."""
        m, rep, table = self.member, self.replicator, self.table
        if m is None or rep is None or table is None:
            self.refusals.refuse("push_before_table", DISPATCHER, f"{push.spi_in:#010x}")
            return
        reason = child_refusal(push.transform, push.keymat_in, push.keymat_out, push.spi_in,
                               push.spi_out, push.local_ts, push.remote_ts, push.remote_ip,
                               push.remote_port, push.ike_spi)
        if reason is not None:
            self.refusals.refuse(f"push_{reason}", DISPATCHER, f"child {push.spi_in:#010x}")
            return
        segment = segment_of_esp_spi(push.spi_in, table.segment_bits)
        if table.owner(segment) == self.member_id:
            if push.spi_in not in m.by_spi:
                m.install_pushed(push)
        elif table.backup(segment) == self.member_id:
            rep.push_replica(push)
        else:
            self.refusals.refuse("push_not_ours", DISPATCHER,
                                 f"child {push.spi_in:#010x} in segment {segment}")

    def _dispatcher_heartbeat(self, hb: Heartbeat) -> None:
        reason = heartbeat_refusal(hb, self.sender_id, self.term)
        if reason is not None:
            self.refusals.refuse(f"heartbeat_{reason}", DISPATCHER,
                                 f"sender id {hb.sender_id}, term {hb.term}")
            return
        prev_term = self.term
        if hb.term > self.term:
            if self.term:
                log.warning("member %d: dispatcher term %d (was %d)", self.member_id, hb.term,
                            self.term)
            self.term = hb.term
        if self.loop is not None:
            self.heard = self.loop.time()
        new_dispatcher = hb.pid != self.dispatcher_pid or hb.term != prev_term
        self.dispatcher_pid = hb.pid
        if self.member is not None and hb.token and hb.token == self.token:
            self._reattached(hb, new_dispatcher)
        if self.member is None:
            # The dispatcher's answer to HELLO: our incarnation's sender id.
            # (the token first: the heartbeat thread starts on the sender id)
            self.token = hb.token
            self.sender_id = hb.sender_id
            self.member = Member(self.config, member_id=self.member_id,
                                 sender_id=hb.sender_id, segments=[0],
                                 owner_of_esp=self.owner_of_esp, esp_segment=self.esp_segment,
                                 publish=self._event)
            c = self.config.cluster
            self.replicator = Replicator(
                self.member_id, self.member, self.send, self.emit,
                send_bulk=self.send_bulk, seq_sync_packets=c.seq_sync_packets,
                seq_sync_interval=c.seq_sync_interval,
                replay_policy=c.replay_after_failover, drop_rate=self.sync_drop_rate,
                refusals=self.refusals)
            log.info("member %d: sender id %d", self.member_id, hb.sender_id)
            if self.tun is not None and self.loop is not None:
                # (until now the dispatcher read it: our id had no live incarnation)
                self.tun.start(self.loop)
            # the bulk channel is this incarnation's (docs/design.md "Trust model")
            self.send_bulk(self._hello(Channel.BULK))
        self.loads, bad = read_loads(hb.loads, MAX_MEMBERS)
        if bad:
            self.refusals.refuse("heartbeat_bad_load", DISPATCHER, f"{bad} load counters")

    def _reattached(self, hb: Heartbeat, new_dispatcher: bool) -> None:
        """The dispatcher answered our reattach HELLO (or a repeated one):
        our heartbeat and bulk channels open anew, and, for a new dispatcher,
        every child we carry is claimed again (it never saw them pushed: it
        routes their cleartext and lets their ESP out from now on)."""
        if self.reattaching:
            log.warning("member %d: reattached to the dispatcher (pid %d) with sender id %d",
                        self.member_id, hb.pid, self.sender_id)
        self.reattaching = 0.0
        self.attached += 1
        self.send_bulk(self._hello(Channel.BULK))
        m = self.member
        if m is None or not new_dispatcher:
            return
        self.rx_seq = StreamSeq()       # (its stream starts anew)
        for spi_in, route in list(m.by_spi.items()):
            if len(route.ike_spi) == 8:
                self.send(ChildClaim(spi_in, route.outbound.spi, route.ike_spi, route.local_ts,
                                     route.remote_ts))

    def _reattach(self, why: str) -> None:
        """Ask the dispatcher to keep this incarnation (a reattach HELLO: our
        sender id, token and table), at most once per heartbeat interval."""
        loop = self.loop
        if loop is None or not self.sender_id:
            return
        now = loop.time()
        if now - self.reattaching < self.config.cluster.heartbeat_interval:
            return
        if not self.reattaching:
            log.warning("member %d: %s: reattaching (sender id %d, table epoch %d)",
                        self.member_id, why, self.sender_id,
                        self.table.epoch if self.table else 0)
        self.reattaching = now
        self.send(self._hello(Channel.LIVE, reattach=True))

    def _notice(self, notice: Notice) -> None:
        """The dispatcher does not take our output: reattach, or end this
        incarnation (nothing more is sent: our SAs were taken over by others
        or are about to be, RFC 6027 §3.7) with the status that tells our
        supervisor whether to start us again."""
        if notice.kind is NoticeKind.REFUSED:
            self._exit(EXIT_REFUSED, f"member {self.member_id}: refused by the dispatcher: "
                                     f"{notice.text}")
        if notice.kind is NoticeKind.STANDBY:
            # (we stay twice as long as with a silent one: the standby is
            # alive, and about to be activated when ours died)
            self.refusals.refuse("notice_standby", DISPATCHER, notice.text)
            if self.loop is not None:
                self.standby_heard = self.loop.time()
            return
        if notice.term < self.term:
            # a deposed dispatcher cannot end us
            self.refusals.refuse("notice_stale_term", DISPATCHER,
                                 f"{notice.kind.name} of term {notice.term} < {self.term}")
            return
        if notice.sender_id != self.sender_id or not self.sender_id:
            self.refusals.refuse("notice_not_ours", DISPATCHER, f"sender id {notice.sender_id}")
            return
        if notice.kind is NoticeKind.UNKNOWN:
            self._reattach("the dispatcher does not know us")
        elif notice.kind is NoticeKind.DEAD:
            self._exit(EXIT_REJOIN, f"member {self.member_id}: declared dead by the dispatcher "
                                    f"({notice.text}): our SAs were taken over; ending this "
                                    "incarnation to rejoin as a new one")
        elif notice.kind is NoticeKind.REPLACED:
            self._exit(EXIT_REPLACED, f"member {self.member_id}: replaced: {notice.text}; "
                                      "stopping (not to be restarted)")

    def _exit(self, status: int, line: str) -> None:
        """End the process at once: nothing queued is sent, nothing runs on."""
        log.error("%s (exit status %d)", line, status)
        for handler in logging.getLogger().handlers + log.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(status)

    def _table(self, table: SegmentTable, term: int = 0) -> None:
        reason = table_refusal(self.table, table, self.config.cluster.segment_bits, term=term,
                               seen=self.term, old_term=self.table_term)
        if reason is not None:
            self.refusals.refuse(f"table_{reason}", DISPATCHER,
                                 f"epoch {table.epoch}, term {term}")
            return
        self.term = max(self.term, term)
        self.table_term = term
        old, self.table = self.table, table
        if self.member is not None and self.replicator is not None and self.loop is not None:
            mine = table.segments_of(self.member_id)
            self.member.spis.set_segments(mine)
            if old is None or old.epoch != table.epoch:
                # (the same table again, e.g. answers while we reattach: said once)
                log.info("member %d: table epoch %d, %d segments", self.member_id,
                         table.epoch, len(mine))
            self.replicator.on_table(old, table, self.loop.time())

    def _udp_readable(self, sock: socket.socket, port: int) -> None:
        """Our steered socket is readable: a burst of our own IKE and ESP
        (the barrier: whatever fails is counted, the loop goes on)."""
        self.progress = time.monotonic()
        try:
            burst, truncated = _recv_burst(sock, port)
        except OSError:
            self._drop("udp_error")
            return
        if truncated:
            self._drop("udp_truncated", truncated)
        if not burst:
            return
        try:
            self._datagram_list(burst)
            self.flush()
        except Exception as exc:
            self.refusals.failed("udp", exc, "udp")

    def _datagrams(self, msg: DatagramIn) -> None:
        self._datagram_list(msg.datagrams)

    def _datagram_list(self, datagrams: Sequence[Datagram]) -> None:
        m = self.member
        if m is None or self.loop is None:
            return
        now = self.loop.time()
        esp: list[tuple[bytes, int, tuple[str, int]]] = []
        for d in datagrams:
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
                esp.append((payload, spi, remote))
            elif kind is Kind.IKE:
                self._ike(payload[4:], d, remote, now)
        if not esp:
            return
        try:   # the barrier, per burst: one compiled call per SA
            inner = m.handle_esp_batch(esp, now)
        except Exception as exc:
            self.refusals.failed("esp", exc, esp[0][2][0])
            return
        n_bytes = sum(len(p) for p in inner)
        if inner:
            m.counters["esp_in"] += len(inner)
            m.counters["esp_in_bytes"] += n_bytes
            raw = self.raw_inside
            if raw is not None:
                # Straight into the kernel: the dispatcher handles the packet once.
                back = raw.write_batch(inner)
                if back:
                    self.send(InnerOut(back))
            else:
                self.send(InnerOut(inner))
            if self.replicator is not None:
                self.replicator.esp_tick(now, len(inner))

    def _ike(self, data: bytes, d: Datagram, remote: tuple[str, int], now: float) -> None:
        """One IKE datagram into the engine; whatever it raises stays here
        (the barrier: the other datagrams of the batch go on)."""
        m = self.member
        if m is None:
            return
        table = self.table
        try:
            if table is not None and len(data) >= 28 and data[8:16] == bytes(8):
                # IKE_SA_INIT: our responder SPI goes into the segment the dispatcher
                # hashed it to (the same function, common/cluster/routing.py).
                m.spis.next_ike_segment = init_segment(d.peer_ip, d.peer_port, data[:8],
                                                       table.segment_bits)
            m.handle_ike(data, remote, d.local_port, now)
        except Exception as exc:
            self.refusals.failed("ike", exc, remote[0])
        finally:
            m.spis.next_ike_segment = None

    def _inner(self, msg: InnerIn) -> None:
        """Cleartext the dispatcher relayed (its userspace path)."""
        self._inner_packets(msg.packets)

    def _tun_packets(self, packets: list[bytes]) -> None:
        """Cleartext from our own TUN device (the kernel's path): the barrier
        of that reader, as ``_frame`` is of the live loop."""
        try:
            self._inner_packets(packets)
            self.flush()
        except Exception as exc:
            self.refusals.failed("tun", exc, "inside")

    def _inner_packets(self, packets: Sequence[Bytes]) -> None:
        """Encrypt cleartext packets for the children whose selectors hold
        them (a packet no child of ours holds: the ``no_child`` drop), and
        send the ESP."""
        m = self.member
        if m is None:
            return
        natt = self.config.cluster.natt_port
        try:   # the barrier, per burst: one compiled call per child SA
            sealed = m.handle_inner_batch([bytes(p) for p in packets])
        except Exception as exc:
            self.refusals.failed("inner", exc, "inside")
            return
        n_bytes = m.sealed_bytes
        out = [Datagram(natt, _packed_ip(remote[0]), remote[1], esp) for esp, remote in sealed]
        if out:
            m.counters["esp_out"] += len(out)
            m.counters["esp_out_bytes"] += n_bytes
            self.send_esp(out)
            if self.replicator is not None and self.loop is not None:
                self.replicator.esp_tick(self.loop.time(), len(out))

    # -- timers ---------------------------------------------------------------------

    def _arm(self) -> None:
        if self.loop is not None and self.member is not None:
            self._timer.arm(self.loop, self.member.get_timer())

    def _fire(self) -> None:
        try:
            if self.member is not None and self.loop is not None:
                self.member.handle_timer(self.loop.time())
                self.flush()
        except Exception as exc:   # the barrier: the timer must stay armed
            self.refusals.failed("timer", exc, "timer")
            self._rearm_after_failure()

    def _rearm_after_failure(self) -> None:
        """After a failed timer run: again, but not before TIMER_RETRY_S (a
        deadline that fails every time must not spin the loop)."""
        m, loop = self.member, self.loop
        if m is None or loop is None:
            return
        try:
            when = m.get_timer()
        except Exception as exc:
            self.refusals.failed("timer", exc, "timer")
            when = None
        soonest = loop.time() + TIMER_RETRY_S
        self._timer.arm(loop, soonest if when is None else max(when, soonest))

    # -- status -----------------------------------------------------------------------

    def stats(self) -> MemberStats:
        """What our heartbeat tells the dispatcher (common/cluster/stats.py):
        the member's figures, ours (refusals, receive gaps, the raw inside's)
        and the replicator's, bounded to what the wire takes."""
        m = self.member
        if m is None:
            return MemberStats()
        s = m.stats()
        counters, drops = dict(s.counters), dict(s.drops)
        if self.raw_inside is not None:
            counters["inner_raw"] = self.raw_inside.sent
            drops["inner_raw"] = self.raw_inside.drops
        if self.tun is not None:
            counters["inner_tun"] = self.tun.rx_packets
            if self.tun.rx_errors:
                drops["inner_tun_error"] = self.tun.rx_errors
        rep = self.replicator
        return dataclasses.replace(
            s, sync_gaps=self.gaps, counters=counters, drops=drops,
            refused=dict(self.refusals.counts),
            sync=dict(rep.counters) if rep is not None else {},
            replicas=Replicas(len(rep.ike_replicas), len(rep.child_replicas), len(rep.held))
            if rep is not None else Replicas()).bounded()

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
        current = self.current
        endpoint, _ = self.endpoints[current]
        sock.connect(endpoint)
        interval = self.config.cluster.heartbeat_interval
        seq = StreamSeq()
        opened: tuple[int, int] = (0, 0)
        try:
            while not self._hb_stop.wait(interval):
                if current != self.current:
                    # (the live channel turned to the other dispatcher: we follow)
                    with contextlib.suppress(zmq.ZMQError):
                        sock.disconnect(endpoint)
                    current = self.current
                    endpoint, key = self.endpoints[current]
                    if key is not None:
                        sock.curve_serverkey = key
                    sock.connect(endpoint)
                if time.monotonic() - self.progress > WATCHDOG_S or not self.sender_id:
                    continue
                epoch = self.table.epoch if self.table else 0
                if opened != (self.sender_id, self.attached):
                    # this channel belongs to the incarnation (its sender id),
                    # opened anew on each (re)attach
                    opened = (self.sender_id, self.attached)
                    with contextlib.suppress(zmq.ZMQError):
                        sock.send(encode(self._hello(Channel.HEARTBEAT), seq.next()),
                                  zmq.NOBLOCK)
                with contextlib.suppress(zmq.ZMQError):
                    # (liveness only: the figures travel on the live channel)
                    sock.send(encode(Heartbeat(self.member_id, self.sender_id, os.getpid(),
                                               epoch, term=self.term), seq.next()),
                              zmq.NOBLOCK)
        finally:
            sock.close(linger=0)

    def _hello(self, channel: Channel, *, reattach: bool = False) -> Hello:
        """A LIVE HELLO carries our timing keys (refused at join if they are
        not the dispatcher's); a reattach one our sender id, token and table."""
        if channel is Channel.LIVE:
            c = self.config.cluster
            timing = Timing.of(c.heartbeat_interval, c.dead_after, c.segment_bits, c.mode)
            if reattach:
                # (no table yet: an empty one, epoch 0, claims nothing)
                table = self.table if self.table is not None else SegmentTable(c.segment_bits)
                return Hello(self.member_id, os.getpid(), socket.gethostname(), channel,
                             self.sender_id, self.token, timing, table, self.term)
            return Hello(self.member_id, os.getpid(), socket.gethostname(), channel,
                         timing=timing, term=self.term)
        return Hello(self.member_id, os.getpid(), socket.gethostname(), channel,
                     self.sender_id, self.token)

    async def heartbeats(self) -> None:
        interval = self.config.cluster.heartbeat_interval
        while not self._stop.is_set():
            self.progress = time.monotonic()
            try:
                self._heartbeat_tick()
            except Exception as exc:   # the barrier: the task must outlive one bad tick
                self.refusals.failed("heartbeat", exc, "timer")
            await asyncio.sleep(interval)

    def _heartbeat_tick(self) -> None:
        if not self.sender_id:
            # Not a member yet: the dispatcher refuses a HELLO while the
            # previous incarnation of our id is alive; ask again (two
            # dispatchers: the other one when this one stays silent).
            c = self.config.cluster
            if self.loop is not None and self.loop.time() - max(self.heard, self.switched) \
                    > c.dead_after * c.heartbeat_interval:
                self._switch("no answer to our HELLO")
            self.send(self._hello(Channel.LIVE))
            return
        loop = self.loop
        if loop is not None:
            c = self.config.cluster
            if not self.heard:
                self.heard = loop.time()
            silent = loop.time() - self.heard
            if c.orphan_after and silent > c.orphan_after:
                self._exit(EXIT_REJOIN, f"member {self.member_id}: no dispatcher for "
                                        f"{silent:.1f} s (cluster.orphan_after = "
                                        f"{c.orphan_after:g}): stopping, to join anew")
            limit = c.dead_after * c.heartbeat_interval
            if silent > limit:
                # (a standby that answers is given twice as long as a silent
                # one: VRRP takes a few advert intervals to activate it)
                patience = limit * (2 if self.standby_heard > self.switched else 1)
                if loop.time() - max(self.heard, self.switched) > patience:
                    # two dispatchers: ours is silent (so is the other, if we
                    # tried it last): the other one
                    self._switch(f"no dispatcher heartbeat for {silent:.2f} s")
                # the dispatcher died, restarted or lost us: ask to be kept
                self._reattach(f"no dispatcher heartbeat for {silent:.2f} s")
        epoch = self.table.epoch if self.table else 0
        self.send(Heartbeat(self.member_id, self.sender_id, os.getpid(), epoch,
                            stats=self.stats(), term=self.term))
        rep, loop = self.replicator, self.loop
        if rep is not None and loop is not None:
            now = loop.time()
            self.emit(rep.release_expired(now))
            rep.esp_tick(now, 0)

    async def run(self) -> None:
        die_with_supervisor()
        self.loop = asyncio.get_running_loop()
        for port, sock in self.udp.items():
            self.loop.add_reader(sock.fileno(), self._udp_readable, sock, port)
        try:
            self.sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            raise StartupError(f"--connect {self.endpoint}: {zmq.strerror(exc.errno or 0)} "
                               "(expected the dispatcher's ipc://PATH or tcp://HOST:PORT)"
                               ) from None
        self.bulk.connect(self.endpoint)
        self.heard = self.loop.time()
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
                # An awaited recv with a frame ready returns without yielding:
                # under a flood the heartbeat task and the timers would starve
                # (the watchdog then stops heartbeats: declared dead).
                await asyncio.sleep(0)
        finally:
            if self.tun is not None:
                self.tun.stop()
            self._hb_stop.set()
            hb.cancel()
            bulk.cancel()
            self.sock.close(linger=0)
            self.bulk.close(linger=0)

    def _frame(self, frame: bytes) -> None:
        """One frame from the dispatcher: the barrier of the live loop."""
        try:
            seq, msg = decode(frame)
        except MalformedMessage as exc:
            self.refusals.refuse("wire_malformed", DISPATCHER, exc)
            return
        lost = self.rx_seq.check(seq)
        if lost > 0:
            self.gaps += lost
        try:
            self.handle(msg)
        except Exception as exc:
            self.refusals.failed(type(msg).__name__.lower(), exc, DISPATCHER)

    def stop(self) -> None:
        self._stop.set()
