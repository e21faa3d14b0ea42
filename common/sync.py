"""The synch channel's messages (RFC 6027 §3.2-3.7): what a backup member
needs to continue an IKE SA or an ESP SA after its owner died.

Rules of this file:
- Every message is versioned and typed: version u8 || kind u8 || body; the
  envelope (common/wire.py SYNC) carries source, destination and a sequence
  number per (source, destination) stream, so a receiver sees gaps.
- Whole-state messages, not deltas: ``IkeSaState`` is the IKE SA after the
  change (message IDs both ways, the last response for retransmits, the keys,
  the children), so a lost or reordered message is repaired by the next one
  and a gap by a resync of the affected SAs.
- ``decode_sync`` reads bytes from another process: bad bytes raise
  ``MalformedMessage`` only.
- What is NOT synced: half-open IKE SAs (replication starts with IKE_AUTH, so an
  IKE_SA_INIT flood cannot become a sync storm, RFC 6027 §4) and exchanges we
  initiated that are still waiting for their answer (their DH secrets stay with
  the owner; the new owner abandons them and keeps the message IDs right).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from common.buffer import Reader, Writer
from common.errors import MalformedMessage
from common.ike.ts import TrafficSelector

SYNC_VERSION = 1
_U32 = struct.Struct("!I")


class SyncKind(enum.IntEnum):
    IKE_SA = 1          # owner -> backup: the IKE SA after a change
    IKE_SA_GONE = 2     # owner -> backup: deleted / rekeyed away
    CHILD = 3           # carrier -> backup: a child SA's keys and selectors
    CHILD_GONE = 4
    ESP_COUNTERS = 5    # carrier -> backup: outbound sequence numbers, replay windows
    ACK = 6             # backup -> owner: "I have your message with this stream seq"
    RESYNC = 7          # backup -> owner: "I missed messages; send me everything"
    REKEY_CHILD = 8     # new carrier -> IKE SA owner: rekey this child (replay policy)
    BULK_DONE = 9       # owner -> backup: the bulk transfer is complete


@dataclass(slots=True, frozen=True)
class ChildRecord:
    """What the IKE SA owner keeps of each child (to rekey and delete it)."""

    name: str
    spi_in: int
    spi_out: int
    transform: str
    esn: bool
    dh: int
    state: int
    rekey_in: float  # seconds until the rekey timer fires, -1 = none
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]


@dataclass(slots=True, frozen=True)
class IkeSaState:
    spi_i: bytes
    spi_r: bytes
    initiator: bool
    state: int
    policy: str
    remote_ip: bytes
    remote_port: int
    local_port: int
    encr: int
    key_bits: int
    prf: int
    integ: int
    dh: int
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)
    peer_id_type: int
    peer_id: bytes
    peer_mid_sync: bool
    send_next: int
    recv_next: int
    response_id: int  # -1 = no cached response
    response: bytes = field(repr=False)
    request_digest: bytes
    rekey_in: float
    children: tuple[ChildRecord, ...]
    #: the owner went on without a live backup for a while: IDs may be stale
    stale: bool = False


@dataclass(slots=True, frozen=True)
class IkeSaGone:
    spi_i: bytes
    spi_r: bytes


@dataclass(slots=True, frozen=True)
class ChildState:
    """The ESP side of a child SA, for the backup of its carrier."""

    spi_in: int
    spi_out: int
    name: str
    transform: str
    esn: bool
    keymat_in: bytes = field(repr=False)
    keymat_out: bytes = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    remote_ip: bytes
    remote_port: int
    ike_spi: bytes  # the IKE SA owner's SPI: where to ask for a rekey
    out_seq: int
    replay_size: int
    replay_highest: int
    replay_bitmap: int


@dataclass(slots=True, frozen=True)
class ChildGone:
    spi_in: int


@dataclass(slots=True, frozen=True)
class EspCounter:
    spi_in: int
    out_seq: int
    replay_highest: int
    replay_bitmap: int


@dataclass(slots=True, frozen=True)
class EspCounters:
    counters: tuple[EspCounter, ...]


@dataclass(slots=True, frozen=True)
class Ack:
    seq: int


@dataclass(slots=True, frozen=True)
class Resync:
    pass


@dataclass(slots=True, frozen=True)
class RekeyChild:
    ike_spi: bytes
    spi_in: int


@dataclass(slots=True, frozen=True)
class BulkDone:
    count: int


SyncMessage = (IkeSaState | IkeSaGone | ChildState | ChildGone | EspCounters | Ack | Resync
               | RekeyChild | BulkDone)


# -- parts -------------------------------------------------------------------------


def _push_blob(w: Writer, b: bytes) -> None:
    w.push_uint32(len(b))
    w.push_bytes(b)


def _pull_blob(r: Reader, limit: int = 1 << 20) -> bytes:
    n = r.pull_uint32()
    if n > limit:
        raise MalformedMessage(f"sync blob of {n} bytes is over the {limit}-byte limit")
    return r.pull_bytes(n)


def _push_str(w: Writer, s: str) -> None:
    _push_blob(w, s.encode())


def _pull_str(r: Reader) -> str:
    try:
        return _pull_blob(r, 4096).decode()
    except UnicodeDecodeError as e:
        raise MalformedMessage(f"sync string is not UTF-8: {e}") from None


def _push_int(w: Writer, v: int, width: int = 64) -> None:
    """Unsigned int of up to ``width`` bits, as a length-prefixed big-endian
    blob of as few bytes as it needs (a replay bitmap of a 64K-bit window is
    not sent as 8 KB of zeros; the reader takes any length up to ``width``)."""
    if v < 0 or v.bit_length() > width:
        raise ValueError(f"{v} does not fit {width} bits")
    _push_blob(w, v.to_bytes((v.bit_length() + 7) // 8, "big"))


def _pull_int(r: Reader, width: int = 64) -> int:
    raw = _pull_blob(r, (width + 7) // 8)
    return int.from_bytes(raw, "big")


def _push_float(w: Writer, v: float) -> None:
    w.push_bytes(struct.pack("!d", v))


def _pull_float(r: Reader) -> float:
    (v,) = struct.unpack("!d", r.pull_bytes(8))
    return float(v)


#: Selectors repeat across SAs (one policy, thousands of peers): their
#: encoding and decoding (ipaddress objects) are memoised, both ways, in
#: bounded caches. TrafficSelector is frozen, so sharing one tuple is safe.
_TS_CACHE_MAX = 4096
_ts_encoded: dict[tuple[TrafficSelector, ...], bytes] = {}
_ts_decoded: dict[bytes, tuple[TrafficSelector, ...]] = {}


def _push_ts(w: Writer, tss: tuple[TrafficSelector, ...]) -> None:
    raw = _ts_encoded.get(tss)
    if raw is None:
        from common.wire import push_selectors

        sub = Writer()
        push_selectors(sub, tss)
        raw = sub.data
        if len(_ts_encoded) >= _TS_CACHE_MAX:
            _ts_encoded.clear()
        _ts_encoded[tss] = raw
    w.push_bytes(raw)


def _pull_ts(r: Reader) -> tuple[TrafficSelector, ...]:
    # The same layout as common/wire.py push_selectors: u8 count, then per
    # selector u8 version, 5 bytes, two addresses of 4 (v4) or 16 bytes.
    count = r.pull_uint8()
    parts = [bytes((count,))]
    for _ in range(count):
        version = r.pull_uint8()
        parts.append(bytes((version,)))
        parts.append(r.pull_bytes(5 + (32 if version == 6 else 8)))
    raw = b"".join(parts)
    tss = _ts_decoded.get(raw)
    if tss is None:
        from common.wire import pull_selectors

        sub = Reader(raw)
        tss = pull_selectors(sub)   # validates (MalformedMessage on a bad version)
        if not sub.eof():
            raise MalformedMessage("traffic selectors longer than their count says")
        if len(_ts_decoded) >= _TS_CACHE_MAX:
            _ts_decoded.clear()
        _ts_decoded[raw] = tss
    return tss


def _pull_bool(r: Reader) -> bool:
    v = r.pull_uint8()
    if v > 1:
        raise MalformedMessage(f"boolean byte {v}")
    return v == 1


# -- messages ------------------------------------------------------------------------


def _push_child_record(w: Writer, c: ChildRecord) -> None:
    _push_str(w, c.name)
    w.push_uint32(c.spi_in)
    w.push_uint32(c.spi_out)
    _push_str(w, c.transform)
    w.push_uint8(int(c.esn))
    w.push_uint16(c.dh)
    w.push_uint8(c.state)
    _push_float(w, c.rekey_in)
    _push_ts(w, c.local_ts)
    _push_ts(w, c.remote_ts)


def _pull_child_record(r: Reader) -> ChildRecord:
    return ChildRecord(_pull_str(r), r.pull_uint32(), r.pull_uint32(), _pull_str(r),
                       _pull_bool(r), r.pull_uint16(), r.pull_uint8(), _pull_float(r),
                       _pull_ts(r), _pull_ts(r))


def _push_ike(w: Writer, m: IkeSaState) -> None:
    if len(m.spi_i) != 8 or len(m.spi_r) != 8:
        raise ValueError("IKE SPIs are 8 bytes")
    w.push_bytes(m.spi_i)
    w.push_bytes(m.spi_r)
    w.push_uint8(int(m.initiator))
    w.push_uint8(m.state)
    _push_str(w, m.policy)
    _push_blob(w, m.remote_ip)
    w.push_uint16(m.remote_port)
    w.push_uint16(m.local_port)
    for v in (m.encr, m.key_bits, m.prf, m.integ, m.dh):
        w.push_uint16(v)
    for key in (m.sk_d, m.sk_ai, m.sk_ar, m.sk_ei, m.sk_er, m.sk_pi, m.sk_pr):
        _push_blob(w, key)
    w.push_uint8(m.peer_id_type)
    _push_blob(w, m.peer_id)
    w.push_uint8(int(m.peer_mid_sync))
    w.push_uint32(m.send_next)
    w.push_uint32(m.recv_next)
    w.push_uint32(m.response_id & 0xFFFFFFFF if m.response_id >= 0 else 0xFFFFFFFF)
    _push_blob(w, m.response)
    _push_blob(w, m.request_digest)
    _push_float(w, m.rekey_in)
    w.push_uint16(len(m.children))
    for c in m.children:
        _push_child_record(w, c)
    w.push_uint8(int(m.stale))


def _pull_ike(r: Reader) -> IkeSaState:
    spi_i, spi_r = r.pull_bytes(8), r.pull_bytes(8)
    initiator, state, policy = _pull_bool(r), r.pull_uint8(), _pull_str(r)
    remote_ip = _pull_blob(r, 16)
    if len(remote_ip) not in (4, 16):
        raise MalformedMessage(f"remote address of {len(remote_ip)} bytes")
    remote_port, local_port = r.pull_uint16(), r.pull_uint16()
    encr, key_bits, prf, integ, dh = (r.pull_uint16() for _ in range(5))
    sk_d, sk_ai, sk_ar, sk_ei, sk_er, sk_pi, sk_pr = (_pull_blob(r, 512) for _ in range(7))
    peer_id_type, peer_id = r.pull_uint8(), _pull_blob(r, 1024)
    peer_mid_sync = _pull_bool(r)
    send_next, recv_next, response_id = r.pull_uint32(), r.pull_uint32(), r.pull_uint32()
    response = _pull_blob(r, 65536)
    digest = _pull_blob(r, 64)
    rekey_in = _pull_float(r)
    children = tuple(_pull_child_record(r) for _ in range(r.pull_uint16()))
    stale = _pull_bool(r)
    return IkeSaState(spi_i, spi_r, initiator, state, policy, remote_ip, remote_port,
                      local_port, encr, key_bits, prf, integ, dh, sk_d, sk_ai, sk_ar, sk_ei,
                      sk_er, sk_pi, sk_pr, peer_id_type, peer_id,
                      peer_mid_sync, send_next, recv_next,
                      -1 if response_id == 0xFFFFFFFF else response_id, response, digest,
                      rekey_in, children, stale)


def _push_child(w: Writer, m: ChildState) -> None:
    w.push_uint32(m.spi_in)
    w.push_uint32(m.spi_out)
    _push_str(w, m.name)
    _push_str(w, m.transform)
    w.push_uint8(int(m.esn))
    _push_blob(w, m.keymat_in)
    _push_blob(w, m.keymat_out)
    _push_ts(w, m.local_ts)
    _push_ts(w, m.remote_ts)
    _push_blob(w, m.remote_ip)
    w.push_uint16(m.remote_port)
    _push_blob(w, m.ike_spi)
    w.push_uint64(m.out_seq)
    w.push_uint32(m.replay_size)
    w.push_uint64(m.replay_highest)
    _push_int(w, m.replay_bitmap, 65536)


def _pull_child(r: Reader) -> ChildState:
    spi_in, spi_out, name, transform = r.pull_uint32(), r.pull_uint32(), _pull_str(r), \
        _pull_str(r)
    esn = _pull_bool(r)
    keymat_in, keymat_out = _pull_blob(r, 256), _pull_blob(r, 256)
    local_ts, remote_ts = _pull_ts(r), _pull_ts(r)
    remote_ip = _pull_blob(r, 16)
    if len(remote_ip) not in (4, 16):
        raise MalformedMessage(f"remote address of {len(remote_ip)} bytes")
    remote_port = r.pull_uint16()
    ike_spi = _pull_blob(r, 8)
    out_seq, size, highest = r.pull_uint64(), r.pull_uint32(), r.pull_uint64()
    bitmap = _pull_int(r, 65536)
    return ChildState(spi_in, spi_out, name, transform, esn, keymat_in, keymat_out, local_ts,
                      remote_ts, remote_ip, remote_port, ike_spi, out_seq, size, highest, bitmap)


def encode_sync(msg: SyncMessage) -> bytes:
    w = Writer()
    w.push_uint8(SYNC_VERSION)
    try:
        if isinstance(msg, IkeSaState):
            w.push_uint8(SyncKind.IKE_SA)
            _push_ike(w, msg)
        elif isinstance(msg, IkeSaGone):
            w.push_uint8(SyncKind.IKE_SA_GONE)
            w.push_bytes(msg.spi_i + msg.spi_r)
        elif isinstance(msg, ChildState):
            w.push_uint8(SyncKind.CHILD)
            _push_child(w, msg)
        elif isinstance(msg, ChildGone):
            w.push_uint8(SyncKind.CHILD_GONE)
            w.push_uint32(msg.spi_in)
        elif isinstance(msg, EspCounters):
            w.push_uint8(SyncKind.ESP_COUNTERS)
            w.push_uint32(len(msg.counters))
            for c in msg.counters:
                w.push_uint32(c.spi_in)
                w.push_uint64(c.out_seq)
                w.push_uint64(c.replay_highest)
                _push_int(w, c.replay_bitmap, 65536)
        elif isinstance(msg, Ack):
            w.push_uint8(SyncKind.ACK)
            w.push_uint64(msg.seq)
        elif isinstance(msg, Resync):
            w.push_uint8(SyncKind.RESYNC)
        elif isinstance(msg, RekeyChild):
            w.push_uint8(SyncKind.REKEY_CHILD)
            _push_blob(w, msg.ike_spi)
            w.push_uint32(msg.spi_in)
        elif isinstance(msg, BulkDone):
            w.push_uint8(SyncKind.BULK_DONE)
            w.push_uint32(msg.count)
        else:
            raise TypeError(f"not a sync message: {type(msg).__name__}")
    except struct.error as e:
        raise ValueError(f"{type(msg).__name__} does not fit the sync format: {e}") from None
    return w.data


def decode_sync(data: bytes | bytearray | memoryview) -> SyncMessage:
    r = Reader(data)
    version = r.pull_uint8()
    if version != SYNC_VERSION:
        raise MalformedMessage(f"sync version {version}, we speak {SYNC_VERSION}")
    kind = r.pull_uint8()
    msg: SyncMessage
    if kind == SyncKind.IKE_SA:
        msg = _pull_ike(r)
    elif kind == SyncKind.IKE_SA_GONE:
        msg = IkeSaGone(r.pull_bytes(8), r.pull_bytes(8))
    elif kind == SyncKind.CHILD:
        msg = _pull_child(r)
    elif kind == SyncKind.CHILD_GONE:
        msg = ChildGone(r.pull_uint32())
    elif kind == SyncKind.ESP_COUNTERS:
        n = r.pull_uint32()
        if n > r.remaining // 20:
            raise MalformedMessage(f"{n} ESP counters cannot fit {r.remaining} bytes")
        msg = EspCounters(tuple(EspCounter(r.pull_uint32(), r.pull_uint64(), r.pull_uint64(),
                                           _pull_int(r, 65536)) for _ in range(n)))
    elif kind == SyncKind.ACK:
        msg = Ack(r.pull_uint64())
    elif kind == SyncKind.RESYNC:
        msg = Resync()
    elif kind == SyncKind.REKEY_CHILD:
        msg = RekeyChild(_pull_blob(r, 8), r.pull_uint32())
    elif kind == SyncKind.BULK_DONE:
        msg = BulkDone(r.pull_uint32())
    else:
        raise MalformedMessage(f"unknown sync message kind {kind}")
    if not r.eof():
        raise MalformedMessage(f"{r.remaining} bytes after a sync message")
    return msg
