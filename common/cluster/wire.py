"""Dispatcher <-> member messages over ZeroMQ: one frame, one message.

Rules of this file:
- Every frame: version (u8) || type (u8) || sequence number (u64) || body.
  The sequence number counts per stream (one sender, one receiver), so the
  receiver sees gaps (``StreamSeq``). Integers are big-endian.
- Datagrams and inner packets travel in batches, many per frame, each
  length-prefixed, to amortise the per-message cost of ZeroMQ.
- Decoded payloads are ``memoryview`` slices of the frame (no copy); a
  receiver that keeps one past the frame's life copies it with ``bytes()``.
- ``decode`` reads bytes from another process: bad bytes raise
  ``MalformedMessage`` and nothing else (no IndexError, struct.error,
  UnicodeDecodeError). ``encode`` raises ``ValueError`` for values that do
  not fit their fields (our own bug).
- Batch cost (timeit, 64 datagrams of 1400 bytes per frame, CPython 3.11 on
  the dev box): encode ~0.8 us, decode ~1.1 us per datagram.
- STATUS, CONTROL_REQ and CONTROL carry JSON bytes; this file does not parse them.
  EVENTS carries events as JSON objects, each checked here (``Event.from_json``).
- What travels between the processes is typed: a connection's role is the
  HELLO's ``Channel``; a member's figures are a HEARTBEAT's ``MemberStats``
  (common/cluster/stats.py, bounded like every other field here).
"""

from __future__ import annotations

import enum
import ipaddress
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from common.buffer import Reader, Writer
from common.cluster.events import Event
from common.cluster.segments import SegmentTable
from common.cluster.stats import MemberStats, pull_member_stats, push_member_stats
from common.errors import MalformedMessage
from common.esp.natt import Bytes
from common.ike.constants import TsType
from common.ike.ts import TrafficSelector

WIRE_VERSION = 3  # 2: HELLO carries timing keys and reattach claims; NOTICE, CHILD_CLAIM;
#                  3: the dispatcher's term in HEARTBEAT, TABLE, NOTICE and a HELLO's claim
MAX_SEQ = (1 << 64) - 1

_HEAD = struct.Struct("!BBQ")
_SYNC_HEAD = struct.Struct("!HHQ")   # Sync: dst, src, stream seq
# local port, peer port, peer IP length, payload length
_DGRAM = struct.Struct("!HHBH")
_COUNT = struct.Struct("!I")
_LEN16 = struct.Struct("!H")
#: the most loads a Heartbeat carries (a u8 count)
MAX_LOADS = 0xFF


class MsgType(enum.IntEnum):
    DATAGRAM_IN = 1
    DATAGRAM_OUT = 2
    INNER_IN = 3
    INNER_OUT = 4
    HEARTBEAT = 5
    TABLE = 6
    CHILD_PUSH = 7
    CHILD_DELETE = 8
    ROUTE_ADD = 9
    ROUTE_DEL = 10
    HELLO = 11
    STATUS_REQ = 12
    STATUS = 13
    SYNC = 14
    CONTROL_REQ = 15
    CONTROL = 16
    EVENTS = 17
    NOTICE = 18
    CHILD_CLAIM = 19


class Channel(enum.IntEnum):
    """A member's connections to the dispatcher, each opened by a HELLO that
    names it and bound to the member id its CURVE key authenticates
    (docs/design.md "Trust model"): the live one (everything but what follows),
    the heartbeat thread's, and the bulk state transfers'."""

    LIVE = 1
    HEARTBEAT = 2
    BULK = 3


#: the cluster modes a Timing names (its u8 on the wire is the index)
MODES = ("load-sharing", "hot-standby")


@dataclass(slots=True, frozen=True)
class Timing:
    """The keys a member and its dispatcher must agree on (a LIVE HELLO
    carries the member's): with another heartbeat interval or ``dead_after``
    one of them declares the other dead at once, with other ``segment_bits``
    every SPI lands in the wrong segment, with another mode the table means
    something else."""

    heartbeat_interval_us: int
    dead_after: int
    segment_bits: int
    mode: str = "load-sharing"

    @classmethod
    def of(cls, heartbeat_interval: float, dead_after: int, segment_bits: int,
           mode: str) -> Timing:
        return cls(round(heartbeat_interval * 1_000_000), dead_after, segment_bits, mode)

    def mismatch(self, other: Timing) -> tuple[str, str, str] | None:
        """The first key that differs: (its config name, ours, ``other``'s)."""
        if self.heartbeat_interval_us != other.heartbeat_interval_us:
            return ("cluster.heartbeat_interval", f"{self.heartbeat_interval_us / 1e6:g}",
                    f"{other.heartbeat_interval_us / 1e6:g}")
        for name in ("dead_after", "segment_bits", "mode"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"cluster.{name}", str(a), str(b)
        return None


class NoticeKind(enum.IntEnum):
    """What the dispatcher tells an incarnation it does not take output from
    (docs/failover.md "Rejoin, fencing and reattach")."""

    #: we hold no incarnation of yours (a restarted or new dispatcher): reattach
    UNKNOWN = 1
    #: your incarnation was declared dead (its SAs were taken over): drop
    #: everything and rejoin as a new incarnation
    DEAD = 2
    #: a newer incarnation of your member id took your place: stop
    REPLACED = 3
    #: your HELLO is refused for good (``text`` says why): stop, fix, start
    REFUSED = 4
    #: this dispatcher is the standby of a two-host pair (it does not hold
    #: the cluster's address): talk to the other one
    STANDBY = 5


# -- messages ------------------------------------------------------------------------


class Datagram(NamedTuple):
    """One UDP payload and the far end. ``local_port`` is the cluster port it
    arrived on (IN) or must leave from (OUT). A NamedTuple, not a frozen
    dataclass: one is built per datagram on the hot path (~0.3 us vs ~1 us)."""

    local_port: int
    peer_ip: bytes
    peer_port: int
    payload: Bytes


@dataclass(slots=True, frozen=True)
class DatagramIn:
    """dispatcher -> member: datagrams from the network."""

    datagrams: Sequence[Datagram]


@dataclass(slots=True, frozen=True)
class DatagramOut:
    """member -> dispatcher: datagrams to send from the cluster address."""

    datagrams: Sequence[Datagram]


@dataclass(slots=True, frozen=True)
class InnerIn:
    """dispatcher -> member: cleartext packets from the protected network."""

    packets: Sequence[Bytes]


@dataclass(slots=True, frozen=True)
class InnerOut:
    """member -> dispatcher: decrypted packets for the protected network."""

    packets: Sequence[Bytes]


@dataclass(slots=True, frozen=True)
class Heartbeat:
    """Both ways: a member's (``member_id`` its own) says it is alive and, on
    its LIVE channel, carries its ``stats``; the dispatcher's (``member_id``
    0) gives the incarnation its sender id and the members' loads."""

    member_id: int
    sender_id: int  # the incarnation (the IV sender id, docs/failover.md)
    pid: int
    epoch_seen: int
    #: the dispatcher's: member id -> child SAs it carries (where a member
    #: places a new child, common/cluster/placement.py); at most MAX_LOADS
    loads: dict[int, int] = field(default_factory=dict)
    #: the dispatcher's answer to a LIVE HELLO: the incarnation's secret, which
    #: its HEARTBEAT and BULK HELLOs must show (0 otherwise)
    token: int = field(default=0, repr=False)
    #: a member's figures (common/cluster/stats.py); None: liveness only
    stats: MemberStats | None = None
    #: the dispatcher's: its term (docs/failover.md "Two dispatcher hosts": a
    #: member ignores a dispatcher whose term is below the highest it saw);
    #: a member's: the highest term it saw
    term: int = 0


@dataclass(slots=True, frozen=True)
class TableUpdate:
    table: SegmentTable
    #: the term of the dispatcher that sends it (a member refuses a table of
    #: a term below the highest it saw: the deposed dispatcher's)
    term: int = 0


@dataclass(slots=True, frozen=True)
class ChildPush:
    """The IKE SA owner hands a child SA to the member owning its segment
    (and to that segment's backup)."""

    child_id: int
    ike_id: int
    name: str
    spi_in: int
    spi_out: int
    transform: str
    esn: bool
    keymat_in: bytes = field(repr=False)
    keymat_out: bytes = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    remote_ip: bytes
    remote_port: int
    #: the IKE SA owner's SPI of the IKE SA: where a new carrier asks for a rekey
    ike_spi: bytes = b""


@dataclass(slots=True, frozen=True)
class ChildDelete:
    child_id: int
    spi_in: int


@dataclass(slots=True, frozen=True)
class RouteAdd:
    child_id: int
    member: int
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]


@dataclass(slots=True, frozen=True)
class RouteDel:
    child_id: int


@dataclass(slots=True, frozen=True)
class Hello:
    """member -> dispatcher: opens one of the member's channels. The LIVE
    HELLO asks for a new incarnation (answered with its sender id); HEARTBEAT
    and BULK ones name the incarnation they belong to (``sender_id``)."""

    member_id: int
    pid: int
    host: str
    channel: Channel = Channel.LIVE
    sender_id: int = 0
    token: int = field(default=0, repr=False)
    #: a LIVE HELLO's: the member's timing keys (refused at join if they differ)
    timing: Timing | None = None
    #: a LIVE HELLO with ``sender_id`` and ``token`` set and this table is a
    #: reattach: the incarnation of a previous dispatcher asks to be kept,
    #: with the segment table it holds (docs/failover.md "Reattach")
    table: SegmentTable | None = None
    #: a LIVE HELLO's: the highest dispatcher term the member saw (a new
    #: active dispatcher takes a term above every one its members report)
    term: int = 0


@dataclass(slots=True, frozen=True)
class Notice:
    """dispatcher -> member: why it does not take this incarnation's output,
    and what the incarnation must do (``NoticeKind``)."""

    kind: NoticeKind
    sender_id: int
    text: str = ""
    #: the sending dispatcher's term (DEAD and REPLACED of a lower term than
    #: the member saw are ignored: a deposed dispatcher cannot end members)
    term: int = 0


@dataclass(slots=True, frozen=True)
class ChildClaim:
    """member -> dispatcher, after a reattach: a child SA this member carries,
    so that a dispatcher that never saw its CHILD_PUSH routes its cleartext
    and lets its ESP out (dispatcher/trust.py ``Guard.child_claim``)."""

    spi_in: int
    spi_out: int
    ike_spi: bytes
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]


@dataclass(slots=True, frozen=True)
class StatusReq:
    pass


@dataclass(slots=True, frozen=True)
class Status:
    json: bytes


@dataclass(slots=True, frozen=True)
class ControlReq:
    """dispatcher -> member: one control API request (docs/operations.md
    "Control API"), JSON bytes, numbered ``req_id`` by the dispatcher."""

    req_id: int
    json: bytes


@dataclass(slots=True, frozen=True)
class Control:
    """member -> dispatcher: the answer to the ControlReq ``req_id`` (JSON
    bytes); the dispatcher takes it only from a member it asked."""

    req_id: int
    json: bytes


#: the longest text a NOTICE carries (UTF-8 bytes)
MAX_NOTICE_TEXT = 512
#: the most events one EVENTS message carries, and the longest one (JSON bytes)
MAX_EVENTS = 64
MAX_EVENT_BYTES = 16384


@dataclass(slots=True, frozen=True)
class Events:
    """member -> dispatcher: facts for the event stream (common/cluster/events.py),
    e.g. an SA up or down on this member; the dispatcher publishes those
    that name the member whose key sent them."""

    events: tuple[Event, ...]


@dataclass(slots=True, frozen=True)
class Sync:
    """member -> dispatcher -> member: one synch channel message (common/cluster/sync.py)
    from ``src`` to ``dst``, numbered ``seq`` in the (src, dst) stream."""

    dst: int
    src: int
    seq: int
    payload: bytes = field(repr=False)


Message = (DatagramIn | DatagramOut | InnerIn | InnerOut | Heartbeat | TableUpdate
           | ChildPush | ChildDelete | RouteAdd | RouteDel | Hello | StatusReq | Status | Sync
           | ControlReq | Control | Events | Notice | ChildClaim)


class StreamSeq:
    """Sequence numbers of one stream: ``next()`` on the sending side,
    ``check(seq)`` on the receiving side (how many frames went missing)."""

    __slots__ = ("_expected", "_next")

    def __init__(self) -> None:
        self._next = 0
        self._expected: int | None = None

    def next(self) -> int:
        seq = self._next
        self._next = (seq + 1) & MAX_SEQ
        return seq

    def check(self, seq: int) -> int:
        """Frames lost before ``seq`` (0 when in order; the first frame seen
        sets the start). A frame older than expected returns -1 and does not
        move the stream."""
        expected = self._expected
        if expected is not None and seq < expected:
            return -1
        self._expected = (seq + 1) & MAX_SEQ
        return 0 if expected is None else seq - expected


# -- batches ---------------------------------------------------------------------------


def _encode_datagrams(head: bytes, datagrams: Sequence[Datagram]) -> bytes:
    size = len(head) + _COUNT.size + sum(
        _DGRAM.size + len(d.peer_ip) + len(d.payload) for d in datagrams)
    buf = bytearray(size)
    buf[:len(head)] = head
    pos = len(head)
    _COUNT.pack_into(buf, pos, len(datagrams))
    pos += _COUNT.size
    for d in datagrams:
        n_ip, n = len(d.peer_ip), len(d.payload)
        if n_ip not in (4, 16):
            raise ValueError(f"peer IP must be 4 or 16 bytes, got {n_ip}")
        try:
            _DGRAM.pack_into(buf, pos, d.local_port, d.peer_port, n_ip, n)
        except struct.error as e:
            raise ValueError(f"datagram does not fit the wire format: {e}") from None
        pos += _DGRAM.size
        buf[pos:pos + n_ip] = d.peer_ip
        pos += n_ip
        buf[pos:pos + n] = d.payload
        pos += n
    return bytes(buf)


def _decode_datagrams(view: memoryview, pos: int) -> list[Datagram]:
    end = len(view)
    if pos + _COUNT.size > end:
        raise MalformedMessage("datagram batch: no count")
    (count,) = _COUNT.unpack_from(view, pos)
    pos += _COUNT.size
    if count * _DGRAM.size > end - pos:
        raise MalformedMessage(f"datagram batch: {count} datagrams cannot fit")
    out: list[Datagram] = []
    append = out.append
    for _ in range(count):
        if pos + _DGRAM.size > end:
            raise MalformedMessage("datagram batch: truncated header")
        local_port, peer_port, n_ip, n = _DGRAM.unpack_from(view, pos)
        pos += _DGRAM.size
        if n_ip != 4 and n_ip != 16:
            raise MalformedMessage(f"datagram batch: peer IP of {n_ip} bytes")
        stop = pos + n_ip + n
        if stop > end:
            raise MalformedMessage("datagram batch: truncated datagram")
        append(Datagram(local_port, bytes(view[pos:pos + n_ip]), peer_port,
                        view[pos + n_ip:stop]))
        pos = stop
    if pos != end:
        raise MalformedMessage(f"datagram batch: {end - pos} bytes after the last datagram")
    return out


def _encode_packets(head: bytes, packets: Sequence[Bytes]) -> bytes:
    size = len(head) + _COUNT.size + sum(_LEN16.size + len(p) for p in packets)
    buf = bytearray(size)
    buf[:len(head)] = head
    pos = len(head)
    _COUNT.pack_into(buf, pos, len(packets))
    pos += _COUNT.size
    for p in packets:
        n = len(p)
        if n > 0xFFFF:
            raise ValueError(f"packet of {n} bytes does not fit a u16 length")
        _LEN16.pack_into(buf, pos, n)
        pos += _LEN16.size
        buf[pos:pos + n] = p
        pos += n
    return bytes(buf)


def _decode_packets(view: memoryview, pos: int) -> list[memoryview]:
    end = len(view)
    if pos + _COUNT.size > end:
        raise MalformedMessage("packet batch: no count")
    (count,) = _COUNT.unpack_from(view, pos)
    pos += _COUNT.size
    if count * _LEN16.size > end - pos:
        raise MalformedMessage(f"packet batch: {count} packets cannot fit")
    out: list[memoryview] = []
    for _ in range(count):
        if pos + _LEN16.size > end:
            raise MalformedMessage("packet batch: truncated length")
        (n,) = _LEN16.unpack_from(view, pos)
        pos += _LEN16.size
        if pos + n > end:
            raise MalformedMessage("packet batch: truncated packet")
        out.append(view[pos:pos + n])
        pos += n
    if pos != end:
        raise MalformedMessage(f"packet batch: {end - pos} bytes after the last packet")
    return out


# -- parts --------------------------------------------------------------------------------


def push_str(w: Writer, s: str) -> None:
    b = s.encode()
    if len(b) > 0xFF:
        raise ValueError(f"string of {len(b)} bytes does not fit a u8 length")
    w.push_uint8(len(b))
    w.push_bytes(b)


def pull_str(r: Reader) -> str:
    raw = r.pull_bytes(r.pull_uint8())
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise MalformedMessage(f"string is not UTF-8: {e}") from None


def push_blob(w: Writer, b: bytes) -> None:
    if len(b) > 0xFFFF:
        raise ValueError(f"blob of {len(b)} bytes does not fit a u16 length")
    w.push_uint16(len(b))
    w.push_bytes(b)


def pull_blob(r: Reader) -> bytes:
    return r.pull_bytes(r.pull_uint16())


def push_ip(w: Writer, ip: bytes) -> None:
    if len(ip) not in (4, 16):
        raise ValueError(f"IP address must be 4 or 16 bytes, got {len(ip)}")
    w.push_uint8(len(ip))
    w.push_bytes(ip)


def pull_ip(r: Reader) -> bytes:
    n = r.pull_uint8()
    if n not in (4, 16):
        raise MalformedMessage(f"IP address of {n} bytes")
    return r.pull_bytes(n)


def push_selectors(w: Writer, tss: Sequence[TrafficSelector]) -> None:
    """u8 count, then per selector: u8 IP version, u8 protocol, u16 start
    port, u16 end port, start address, end address (4 or 16 bytes each)."""
    if len(tss) > 0xFF:
        raise ValueError(f"{len(tss)} selectors do not fit a u8 count")
    w.push_uint8(len(tss))
    for ts in tss:
        n = 4 if ts.version == 4 else 16
        w.push_uint8(ts.version)
        w.push_uint8(ts.ip_protocol)
        w.push_uint16(ts.start_port)
        w.push_uint16(ts.end_port)
        w.push_bytes(ts.start_int.to_bytes(n, "big"))
        w.push_bytes(ts.end_int.to_bytes(n, "big"))


def pull_selectors(r: Reader) -> tuple[TrafficSelector, ...]:
    out = []
    for _ in range(r.pull_uint8()):
        version = r.pull_uint8()
        if version not in (4, 6):
            raise MalformedMessage(f"selector of IP version {version}")
        protocol, start_port, end_port = r.pull_uint8(), r.pull_uint16(), r.pull_uint16()
        n = 4 if version == 4 else 16
        start = ipaddress.ip_address(r.pull_bytes(n))
        end = ipaddress.ip_address(r.pull_bytes(n))
        if int(start) > int(end):
            # (RFC 7296 §3.13.1: an empty range; no child SA is ever
            # negotiated with one, so none is ever pushed or replicated)
            raise MalformedMessage(f"selector range {start}-{end} is empty")
        ts_type = TsType.TS_IPV4_ADDR_RANGE if version == 4 else TsType.TS_IPV6_ADDR_RANGE
        out.append(TrafficSelector(ts_type, protocol, start_port, end_port, start, end))
    return tuple(out)


# -- whole messages --------------------------------------------------------------------------


def _body_heartbeat(w: Writer, m: Heartbeat) -> None:
    w.push_uint16(m.member_id)
    w.push_uint16(m.sender_id)
    w.push_uint32(m.pid)
    w.push_uint64(m.epoch_seen)
    push_loads(w, m.loads)
    w.push_uint64(m.token)
    w.push_uint64(m.term)
    if m.stats is None:
        w.push_uint8(0)
    else:
        w.push_uint8(1)
        push_member_stats(w, m.stats)


def _pull_heartbeat(r: Reader) -> Heartbeat:
    member_id, sender_id, pid = r.pull_uint16(), r.pull_uint16(), r.pull_uint32()
    epoch, loads, token = r.pull_uint64(), pull_loads(r), r.pull_uint64()
    term = r.pull_uint64()
    has_stats = r.pull_uint8()
    if has_stats > 1:
        raise MalformedMessage(f"heartbeat stats flag {has_stats}")
    stats = pull_member_stats(r) if has_stats else None
    return Heartbeat(member_id, sender_id, pid, epoch, loads, token, stats, term)


def push_loads(w: Writer, loads: dict[int, int]) -> None:
    """u8 count, then per member: u16 member id (1..65535), u32 child SAs."""
    if len(loads) > MAX_LOADS:
        raise ValueError(f"{len(loads)} loads do not fit a u8 count")
    w.push_uint8(len(loads))
    for member, n in loads.items():
        if not 1 <= member <= 0xFFFF:
            raise ValueError(f"load of member id {member}, not in 1..65535")
        w.push_uint16(member)
        w.push_uint32(n)


def pull_loads(r: Reader) -> dict[int, int]:
    loads: dict[int, int] = {}
    for _ in range(r.pull_uint8()):
        member, n = r.pull_uint16(), r.pull_uint32()
        if member == 0:
            raise MalformedMessage("load of member id 0")
        if member in loads:
            raise MalformedMessage(f"two loads of member {member}")
        loads[member] = n
    return loads


def _body_child_push(w: Writer, m: ChildPush) -> None:
    w.push_uint64(m.child_id)
    w.push_uint64(m.ike_id)
    push_str(w, m.name)
    w.push_uint32(m.spi_in)
    w.push_uint32(m.spi_out)
    push_str(w, m.transform)
    w.push_uint8(1 if m.esn else 0)
    push_blob(w, m.keymat_in)
    push_blob(w, m.keymat_out)
    push_selectors(w, m.local_ts)
    push_selectors(w, m.remote_ts)
    push_ip(w, m.remote_ip)
    w.push_uint16(m.remote_port)
    push_blob(w, m.ike_spi)


def _pull_child_push(r: Reader) -> ChildPush:
    child_id, ike_id, name = r.pull_uint64(), r.pull_uint64(), pull_str(r)
    spi_in, spi_out, transform = r.pull_uint32(), r.pull_uint32(), pull_str(r)
    esn = r.pull_uint8()
    if esn > 1:
        raise MalformedMessage(f"ESN flag {esn}")
    keymat_in, keymat_out = pull_blob(r), pull_blob(r)
    local_ts, remote_ts = pull_selectors(r), pull_selectors(r)
    remote_ip, remote_port, ike_spi = pull_ip(r), r.pull_uint16(), pull_blob(r)
    if len(ike_spi) not in (0, 8):
        raise MalformedMessage(f"IKE SPI of {len(ike_spi)} bytes")   # RFC 7296 §3.1
    return ChildPush(child_id, ike_id, name, spi_in, spi_out, transform, bool(esn),
                     keymat_in, keymat_out, local_ts, remote_ts, remote_ip, remote_port,
                     ike_spi)


def _body_route_add(w: Writer, m: RouteAdd) -> None:
    w.push_uint64(m.child_id)
    w.push_uint16(m.member)
    push_selectors(w, m.local_ts)
    push_selectors(w, m.remote_ts)


def _pull_route_add(r: Reader) -> RouteAdd:
    return RouteAdd(r.pull_uint64(), r.pull_uint16(), pull_selectors(r), pull_selectors(r))


def _body_hello(w: Writer, m: Hello) -> None:
    w.push_uint16(m.member_id)
    w.push_uint32(m.pid)
    push_str(w, m.host)
    w.push_uint8(m.channel)
    w.push_uint16(m.sender_id)
    w.push_uint64(m.token)
    w.push_uint64(m.term)
    if m.timing is None:
        w.push_uint8(0)
    else:
        t = m.timing
        w.push_uint8(1)
        w.push_uint32(t.heartbeat_interval_us)
        w.push_uint16(t.dead_after)
        w.push_uint8(t.segment_bits)
        w.push_uint8(MODES.index(t.mode))
    if m.table is None:
        w.push_uint8(0)
    else:
        w.push_uint8(1)
        data = m.table.encode()
        w.push_uint32(len(data))
        w.push_bytes(data)


def _flag(r: Reader, what: str) -> bool:
    flag = r.pull_uint8()
    if flag > 1:
        raise MalformedMessage(f"HELLO {what} flag {flag}")
    return flag == 1


def _pull_hello(r: Reader) -> Hello:
    member_id, pid, host = r.pull_uint16(), r.pull_uint32(), pull_str(r)
    channel = r.pull_uint8()
    try:
        kind = Channel(channel)
    except ValueError:
        raise MalformedMessage(f"HELLO for unknown channel {channel}") from None
    sender_id, token, term = r.pull_uint16(), r.pull_uint64(), r.pull_uint64()
    timing = table = None
    if _flag(r, "timing"):
        interval, dead_after, bits, mode = (r.pull_uint32(), r.pull_uint16(), r.pull_uint8(),
                                            r.pull_uint8())
        if mode >= len(MODES):
            raise MalformedMessage(f"HELLO timing mode {mode}")
        timing = Timing(interval, dead_after, bits, MODES[mode])
    if _flag(r, "table"):
        table = SegmentTable.decode(r.pull_view(r.pull_uint32()))
    return Hello(member_id, pid, host, kind, sender_id, token, timing, table, term)


def _body_notice(w: Writer, m: Notice) -> None:
    w.push_uint8(m.kind)
    w.push_uint16(m.sender_id)
    w.push_uint64(m.term)
    push_blob(w, m.text.encode()[:MAX_NOTICE_TEXT])


def _pull_notice(r: Reader) -> Notice:
    kind = r.pull_uint8()
    try:
        what = NoticeKind(kind)
    except ValueError:
        raise MalformedMessage(f"NOTICE of unknown kind {kind}") from None
    sender_id, term, raw = r.pull_uint16(), r.pull_uint64(), pull_blob(r)
    if len(raw) > MAX_NOTICE_TEXT:
        raise MalformedMessage(f"NOTICE text of {len(raw)} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MalformedMessage("NOTICE text is not UTF-8") from None
    return Notice(what, sender_id, text, term)


def _body_child_claim(w: Writer, m: ChildClaim) -> None:
    w.push_uint32(m.spi_in)
    w.push_uint32(m.spi_out)
    push_blob(w, m.ike_spi)
    push_selectors(w, m.local_ts)
    push_selectors(w, m.remote_ts)


def _pull_child_claim(r: Reader) -> ChildClaim:
    spi_in, spi_out, ike_spi = r.pull_uint32(), r.pull_uint32(), pull_blob(r)
    if len(ike_spi) != 8:
        raise MalformedMessage(f"IKE SPI of {len(ike_spi)} bytes")   # RFC 7296 §3.1
    return ChildClaim(spi_in, spi_out, ike_spi, pull_selectors(r), pull_selectors(r))


def _body_child_delete(w: Writer, m: ChildDelete) -> None:
    w.push_uint64(m.child_id)
    w.push_uint32(m.spi_in)


def _pull_child_delete(r: Reader) -> ChildDelete:
    return ChildDelete(r.pull_uint64(), r.pull_uint32())


def _body_events(w: Writer, m: Events) -> None:
    """u8 count, then per event u16 length and its JSON object (UTF-8)."""
    if len(m.events) > MAX_EVENTS:
        raise ValueError(f"{len(m.events)} events in one message (at most {MAX_EVENTS})")
    w.push_uint8(len(m.events))
    for e in m.events:
        data = json.dumps(e.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) > MAX_EVENT_BYTES:
            raise ValueError(f"event of {len(data)} bytes (at most {MAX_EVENT_BYTES})")
        push_blob(w, data)


def _pull_events(r: Reader) -> Events:
    count = r.pull_uint8()
    if count > MAX_EVENTS:
        raise MalformedMessage(f"EVENTS with {count} events (at most {MAX_EVENTS})")
    out = []
    for _ in range(count):
        data = pull_blob(r)
        if len(data) > MAX_EVENT_BYTES:
            raise MalformedMessage(f"event of {len(data)} bytes (at most {MAX_EVENT_BYTES})")
        try:
            obj = json.loads(data.decode())
        except (ValueError, RecursionError):   # (UnicodeDecodeError is a ValueError)
            raise MalformedMessage("event is not UTF-8 JSON") from None
        out.append(Event.from_json(obj))
    return Events(tuple(out))


def _pull_table(r: Reader) -> TableUpdate:
    term = r.pull_uint64()
    return TableUpdate(SegmentTable.decode(r.pull_view(r.remaining)), term)


_PULL: dict[MsgType, Callable[[Reader], Message]] = {
    MsgType.HEARTBEAT: _pull_heartbeat,
    MsgType.TABLE: _pull_table,
    MsgType.CHILD_PUSH: _pull_child_push,
    MsgType.CHILD_DELETE: _pull_child_delete,
    MsgType.ROUTE_ADD: _pull_route_add,
    MsgType.ROUTE_DEL: lambda r: RouteDel(r.pull_uint64()),
    MsgType.HELLO: _pull_hello,
    MsgType.STATUS_REQ: lambda r: StatusReq(),
    MsgType.STATUS: lambda r: Status(r.pull_bytes(r.remaining)),
    MsgType.CONTROL_REQ: lambda r: ControlReq(r.pull_uint64(), r.pull_bytes(r.remaining)),
    MsgType.CONTROL: lambda r: Control(r.pull_uint64(), r.pull_bytes(r.remaining)),
    MsgType.EVENTS: _pull_events,
    MsgType.NOTICE: _pull_notice,
    MsgType.CHILD_CLAIM: _pull_child_claim,
    MsgType.SYNC: lambda r: Sync(r.pull_uint16(), r.pull_uint16(), r.pull_uint64(),
                                 r.pull_bytes(r.remaining)),
}


def _head(msg_type: MsgType, seq: int) -> bytes:
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number out of u64: {seq}")
    return _HEAD.pack(WIRE_VERSION, msg_type, seq)


def encode(msg: Message, seq: int) -> bytes:
    """One ZeroMQ frame for ``msg``, numbered ``seq`` in its stream."""
    if isinstance(msg, DatagramIn | DatagramOut):
        kind = MsgType.DATAGRAM_IN if isinstance(msg, DatagramIn) else MsgType.DATAGRAM_OUT
        return _encode_datagrams(_head(kind, seq), msg.datagrams)
    if isinstance(msg, InnerIn | InnerOut):
        kind = MsgType.INNER_IN if isinstance(msg, InnerIn) else MsgType.INNER_OUT
        return _encode_packets(_head(kind, seq), msg.packets)
    if isinstance(msg, Sync):
        # (one join, no Writer: a bulk transfer sends 100,000 of these)
        try:
            return b"".join((_head(MsgType.SYNC, seq), _SYNC_HEAD.pack(msg.dst, msg.src, msg.seq),
                             msg.payload))
        except struct.error as e:
            raise ValueError(f"Sync does not fit the wire format: {e}") from None
    w = Writer()
    try:
        if isinstance(msg, Heartbeat):
            kind = MsgType.HEARTBEAT
            _body_heartbeat(w, msg)
        elif isinstance(msg, TableUpdate):
            kind = MsgType.TABLE
            w.push_uint64(msg.term)
            w.push_bytes(msg.table.encode())
        elif isinstance(msg, ChildPush):
            kind = MsgType.CHILD_PUSH
            _body_child_push(w, msg)
        elif isinstance(msg, ChildDelete):
            kind = MsgType.CHILD_DELETE
            _body_child_delete(w, msg)
        elif isinstance(msg, RouteAdd):
            kind = MsgType.ROUTE_ADD
            _body_route_add(w, msg)
        elif isinstance(msg, RouteDel):
            kind = MsgType.ROUTE_DEL
            w.push_uint64(msg.child_id)
        elif isinstance(msg, Hello):
            kind = MsgType.HELLO
            _body_hello(w, msg)
        elif isinstance(msg, StatusReq):
            kind = MsgType.STATUS_REQ
        elif isinstance(msg, Status):
            kind = MsgType.STATUS
            w.push_bytes(msg.json)
        elif isinstance(msg, ControlReq | Control):
            kind = MsgType.CONTROL_REQ if isinstance(msg, ControlReq) else MsgType.CONTROL
            w.push_uint64(msg.req_id)
            w.push_bytes(msg.json)
        elif isinstance(msg, Events):
            kind = MsgType.EVENTS
            _body_events(w, msg)
        elif isinstance(msg, Notice):
            kind = MsgType.NOTICE
            _body_notice(w, msg)
        elif isinstance(msg, ChildClaim):
            kind = MsgType.CHILD_CLAIM
            _body_child_claim(w, msg)
        else:
            raise TypeError(f"not a wire message: {msg!r}")
    except struct.error as e:
        raise ValueError(f"{type(msg).__name__} does not fit the wire format: {e}") from None
    return _head(kind, seq) + w.data


def decode(data: Bytes) -> tuple[int, Message]:
    """``(seq, message)`` of one frame; ``MalformedMessage`` on bad bytes."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise MalformedMessage(f"frame of {len(view)} bytes is shorter than its head")
    version, kind, seq = _HEAD.unpack_from(view, 0)
    if version != WIRE_VERSION:
        raise MalformedMessage(f"wire version {version}, we speak {WIRE_VERSION}")
    pos = _HEAD.size
    if kind == MsgType.DATAGRAM_IN:
        return seq, DatagramIn(_decode_datagrams(view, pos))
    if kind == MsgType.DATAGRAM_OUT:
        return seq, DatagramOut(_decode_datagrams(view, pos))
    if kind == MsgType.INNER_IN:
        return seq, InnerIn(_decode_packets(view, pos))
    if kind == MsgType.INNER_OUT:
        return seq, InnerOut(_decode_packets(view, pos))
    try:
        pull = _PULL[MsgType(kind)]
    except ValueError:
        raise MalformedMessage(f"unknown message type {kind}") from None
    r = Reader(view, pos)
    msg = pull(r)
    if not r.eof():
        raise MalformedMessage(f"{r.remaining} bytes after a {MsgType(kind).name} message")
    return seq, msg
