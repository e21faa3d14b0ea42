"""The synch channel's messages (RFC 6027 §3.2-3.7): what a backup member
needs to continue an IKE SA or an ESP SA after its owner died.

Rules of this file:
- Every message is versioned and typed: version u8 || kind u8 || body; the
  envelope (common/cluster/wire.py SYNC) carries source, destination and a sequence
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
import math
import struct
from dataclasses import dataclass, field

from common.buffer import Reader, Writer
from common.errors import MalformedMessage
from common.ike.ts import TrafficSelector

SYNC_VERSION = 3   # 2: IkeSaState as one struct per layout (bulk transfer speed)
#                   3: IkeSaState.leases (virtual IPs) after the layout


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
    #: virtual IPs the peer holds: (pool name, packed address) (RFC 7296 §3.15)
    leases: tuple[tuple[str, bytes], ...] = ()


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


#: Selectors repeat across SAs (one policy, thousands of peers): their
#: encoding and decoding (ipaddress objects) are memoised, both ways, in
#: bounded caches. TrafficSelector is frozen, so sharing one tuple is safe.
#: Encoding looks a tuple up by identity first (children of one policy share
#: their tuples; hashing a tuple of selectors hashes ipaddress objects, which
#: is slow), then by value.
_TS_CACHE_MAX = 4096
_ts_by_id: dict[int, tuple[tuple[TrafficSelector, ...], bytes]] = {}
_ts_encoded: dict[tuple[TrafficSelector, ...], bytes] = {}
_ts_decoded: dict[bytes, tuple[TrafficSelector, ...]] = {}


def _ts_bytes(tss: tuple[TrafficSelector, ...]) -> bytes:
    hit = _ts_by_id.get(id(tss))
    if hit is not None and hit[0] is tss:
        return hit[1]
    raw = _ts_encoded.get(tss)
    if raw is None:
        from common.cluster.wire import push_selectors

        sub = Writer()
        push_selectors(sub, tss)
        raw = sub.data
        if len(_ts_encoded) >= _TS_CACHE_MAX:
            _ts_encoded.clear()
        _ts_encoded[tss] = raw
    if len(_ts_by_id) >= _TS_CACHE_MAX:
        _ts_by_id.clear()
    _ts_by_id[id(tss)] = (tss, raw)   # the tuple is kept: its id is not reused meanwhile
    return raw


def _ts_from(raw: bytes) -> tuple[TrafficSelector, ...]:
    """Selectors from exactly ``raw`` (push_selectors layout)."""
    tss = _ts_decoded.get(raw)
    if tss is None:
        from common.cluster.wire import pull_selectors

        sub = Reader(raw)
        tss = pull_selectors(sub)   # validates (MalformedMessage on a bad version)
        if not sub.eof():
            raise MalformedMessage("traffic selectors longer than their count says")
        if len(_ts_decoded) >= _TS_CACHE_MAX:
            _ts_decoded.clear()
        _ts_decoded[raw] = tss
    return tss


def _push_ts(w: Writer, tss: tuple[TrafficSelector, ...]) -> None:
    w.push_bytes(_ts_bytes(tss))


def _pull_ts(r: Reader) -> tuple[TrafficSelector, ...]:
    # The same layout as common/cluster/wire.py push_selectors: u8 count, then per
    # selector u8 version, 5 bytes, two addresses of 4 (v4) or 16 bytes.
    count = r.pull_uint8()
    parts = [bytes((count,))]
    for _ in range(count):
        version = r.pull_uint8()
        parts.append(bytes((version,)))
        parts.append(r.pull_bytes(5 + (32 if version == 6 else 8)))
    return _ts_from(b"".join(parts))


def _pull_bool(r: Reader) -> bool:
    v = r.pull_uint8()
    if v > 1:
        raise MalformedMessage(f"boolean byte {v}")
    return v == 1


# -- messages ------------------------------------------------------------------------


# IkeSaState (layout of SYNC_VERSION 2): version u8, kind u8, a fixed part
# (_IKE_HEAD), the lengths of each child's strings (4 x u16 per child), the
# remote address (4 or 16 bytes by a flag), the variable-length fields back to
# back (lengths in the fixed part), then per child a fixed part (_CHILD_FIXED)
# and its name, transform and two selector lists (common/cluster/wire.py
# push_selectors layout). SAs of one policy share all their lengths, so the
# struct of a whole layout is compiled once: an SA is one ``pack`` to encode
# and three ``unpack_from`` to decode.

#: version, kind, spi_i, spi_r, flags, state, remote_port, local_port, encr,
#: key_bits, prf, integ, dh, peer_id_type, send_next, recv_next, response_id
#: (2^32-1 = none), rekey_in; the lengths of policy, sk_d, sk_ai, sk_ar, sk_ei,
#: sk_er, sk_pi, sk_pr, peer_id (u16 each), response (u32), request_digest (u8);
#: the number of children.
_IKE_HEAD = struct.Struct("!BB8s8sBBHHHHHHHBIIIdHHHHHHHHHIBH")
_IKE_LIMITS = (4096, 512, 512, 512, 512, 512, 512, 512, 1024, 65536, 64)
_F_INITIATOR, _F_MID_SYNC, _F_STALE, _F_V6, _F_LEASES = 1, 2, 4, 8, 16
#: after the layout when _F_LEASES: count u8, then per lease the pool name
#: (u8 length + UTF-8) and the address (u8 length 4 or 16 + bytes)
_MAX_LEASES = 8
_NO_RESPONSE = 0xFFFFFFFF
#: spi_in, spi_out, dh, state, esn (0/1), rekey_in (then name, transform,
#: local_ts, remote_ts).
_CHILD_FIXED = "IIHBBd"
_CHILD_FIELDS = 10
#: name and transform of a child are at most this long
_CHILD_STR_LIMIT = 4096
#: a replay window of at most this many bits (common/esp/replay.py MAX_WINDOW_SIZE)
_MAX_REPLAY_BITS = 65536


def _pull_timer(v: float) -> float:
    """A ``rekey_in``: -1 (none) or seconds from now; never NaN or infinite
    (a timer at NaN would never fire and never sort)."""
    if not math.isfinite(v) or (v < 0 and v != -1.0):
        raise MalformedMessage(f"timer of {v} s")
    return v

#: Compiled layouts: (fixed part, lengths of what follows) -> struct. Bounded:
#: lengths come from other processes.
_LAYOUT_CACHE_MAX = 256
_layouts: dict[tuple[int, ...], struct.Struct] = {}


def _layout(lens: tuple[int, ...]) -> struct.Struct:
    """The whole IkeSaState of these lengths: the remote address, the eleven
    variable-length fields, then four per child (see above)."""
    s = _layouts.get(lens)
    if s is None:
        n_children = (len(lens) - 12) // 4
        fmt = [_IKE_HEAD.format, "H" * (4 * n_children)]
        fmt += [f"{n}s" for n in lens[:12]]
        for i in range(12, len(lens), 4):
            fmt.append(_CHILD_FIXED + "".join(f"{n}s" for n in lens[i:i + 4]))
        s = struct.Struct("".join(fmt))
        if len(_layouts) >= _LAYOUT_CACHE_MAX:
            _layouts.clear()
        _layouts[lens] = s
    return s


_U16S: dict[int, struct.Struct] = {}


def _u16s(n: int) -> struct.Struct:
    s = _U16S.get(n)
    if s is None:
        s = struct.Struct(f"!{n}H")
        if n <= 64:   # (a count from another process: only the usual ones are kept)
            _U16S[n] = s
    return s


#: Names and transforms repeat: memoised both ways (bounded), which also
#: shares one string among all the replicas of a policy.
_STR_CACHE_MAX = 4096
_str_encoded: dict[str, bytes] = {}
_str_decoded: dict[bytes, str] = {}


def _enc_str(v: str) -> bytes:
    raw = _str_encoded.get(v)
    if raw is None:
        raw = v.encode()
        if len(_str_encoded) >= _STR_CACHE_MAX:
            _str_encoded.clear()
        _str_encoded[v] = raw
    return raw


def _dec_str(raw: bytes) -> str:
    v = _str_decoded.get(raw)
    if v is None:
        try:
            v = raw.decode()
        except UnicodeDecodeError as e:
            raise MalformedMessage(f"sync string is not UTF-8: {e}") from None
        if len(_str_decoded) >= _STR_CACHE_MAX:
            _str_decoded.clear()
        _str_decoded[raw] = v
    return v


def _ike_bytes(m: IkeSaState) -> bytes:
    spi_i, spi_r, ip = m.spi_i, m.spi_r, m.remote_ip
    if len(spi_i) != 8 or len(spi_r) != 8:
        raise ValueError("IKE SPIs are 8 bytes")
    if len(ip) == 4:
        flags = 0
    elif len(ip) == 16:
        flags = _F_V6
    else:
        raise ValueError(f"remote address of {len(ip)} bytes")
    if m.initiator:
        flags |= _F_INITIATOR
    if m.peer_mid_sync:
        flags |= _F_MID_SYNC
    if m.stale:
        flags |= _F_STALE
    if m.leases:
        flags |= _F_LEASES
    var = (_enc_str(m.policy), m.sk_d, m.sk_ai, m.sk_ar, m.sk_ei, m.sk_er, m.sk_pi, m.sk_pr,
           m.peer_id, m.response, m.request_digest)
    lens = tuple(map(len, var))
    for n, limit in zip(lens, _IKE_LIMITS, strict=True):
        if n > limit:
            raise ValueError(f"a field of {n} bytes is over its {limit}-byte limit")
    child_lens: list[int] = []
    child_values: list[object] = []
    for c in m.children:
        name, transform = _enc_str(c.name), _enc_str(c.transform)
        if len(name) > _CHILD_STR_LIMIT or len(transform) > _CHILD_STR_LIMIT:
            raise ValueError("child name or transform over 4096 bytes")
        lts, rts = _ts_bytes(c.local_ts), _ts_bytes(c.remote_ts)
        child_lens += (len(name), len(transform), len(lts), len(rts))
        child_values += (c.spi_in, c.spi_out, c.dh, c.state, 1 if c.esn else 0, c.rekey_in,
                         name, transform, lts, rts)
    rid = m.response_id if m.response_id >= 0 else _NO_RESPONSE
    body = _layout((len(ip), *lens, *child_lens)).pack(
        SYNC_VERSION, SyncKind.IKE_SA, spi_i, spi_r, flags, m.state, m.remote_port,
        m.local_port, m.encr, m.key_bits, m.prf, m.integ, m.dh, m.peer_id_type, m.send_next,
        m.recv_next, rid, m.rekey_in, *lens, len(m.children), *child_lens, ip, *var,
        *child_values)
    return body + _leases_bytes(m.leases) if m.leases else body


def _leases_bytes(leases: tuple[tuple[str, bytes], ...]) -> bytes:
    if len(leases) > _MAX_LEASES:
        raise ValueError(f"{len(leases)} leases (at most {_MAX_LEASES})")
    out = bytearray([len(leases)])
    for pool, addr in leases:
        name = _enc_str(pool)
        if len(name) > 0xFF or len(addr) not in (4, 16):
            raise ValueError(f"bad lease {pool!r} {addr!r}")
        out += bytes([len(name)]) + name + bytes([len(addr)]) + addr
    return bytes(out)


def _leases_from(buf: Reader) -> tuple[tuple[str, bytes], ...]:
    count = buf.pull_uint8()
    if not 0 < count <= _MAX_LEASES:
        raise MalformedMessage(f"{count} leases")
    out = []
    for _ in range(count):
        name = _dec_str(buf.pull_bytes(buf.pull_uint8()))
        n = buf.pull_uint8()
        if n not in (4, 16):
            raise MalformedMessage(f"lease address of {n} bytes")
        out.append((name, buf.pull_bytes(n)))
    if not buf.eof():
        raise MalformedMessage("bytes after the leases")
    return tuple(out)


_IKE_HEAD_FIELDS = 30   # values in an unpacked _IKE_HEAD


def _ike_from(data: bytes | bytearray | memoryview) -> IkeSaState:
    """An IkeSaState from a whole message (version and kind already checked)."""
    try:
        (_v, _k, spi_i, spi_r, flags, state, remote_port, local_port, encr, key_bits, prf,
         integ, dh, peer_id_type, send_next, recv_next, rid, rekey_in, *lens,
         n_children) = _IKE_HEAD.unpack_from(data, 0)
        if flags & ~(_F_INITIATOR | _F_MID_SYNC | _F_STALE | _F_V6 | _F_LEASES):
            raise MalformedMessage(f"IKE SA flags {flags:#x}")
        for n, limit in zip(lens, _IKE_LIMITS, strict=True):
            if n > limit:
                raise MalformedMessage(f"sync field of {n} bytes is over its {limit}-byte limit")
        if 8 * n_children > len(data) - _IKE_HEAD.size:
            raise MalformedMessage(f"{n_children} children cannot fit {len(data)} bytes")
        child_lens = _u16s(4 * n_children).unpack_from(data, _IKE_HEAD.size) if n_children \
            else ()
        for i in range(0, len(child_lens), 4):
            if child_lens[i] > _CHILD_STR_LIMIT or child_lens[i + 1] > _CHILD_STR_LIMIT:
                raise MalformedMessage("child name or transform over 4096 bytes")
        layout = _layout((16 if flags & _F_V6 else 4, *lens, *child_lens))
        values = layout.unpack_from(data, 0)
    except struct.error as e:
        raise MalformedMessage(f"truncated IKE SA state: {e}") from None
    leases: tuple[tuple[str, bytes], ...] = ()
    if flags & _F_LEASES:
        leases = _leases_from(Reader(data, layout.size))
    elif layout.size != len(data):
        raise MalformedMessage(f"{len(data) - layout.size} bytes after a sync message")
    pos = _IKE_HEAD_FIELDS + 4 * n_children
    (remote_ip, policy, sk_d, sk_ai, sk_ar, sk_ei, sk_er, sk_pi, sk_pr, peer_id, response,
     digest) = values[pos:pos + 12]
    pos += 12
    children = []
    for i in range(pos, len(values), _CHILD_FIELDS):
        spi_in, spi_out, cdh, cstate, esn, crekey, name, transform, lts, rts = \
            values[i:i + _CHILD_FIELDS]
        if esn > 1:
            raise MalformedMessage(f"boolean byte {esn}")
        children.append(ChildRecord(_dec_str(name), spi_in, spi_out, _dec_str(transform),
                                    esn == 1, cdh, cstate, _pull_timer(crekey), _ts_from(lts),
                                    _ts_from(rts)))
    return IkeSaState(spi_i, spi_r, bool(flags & _F_INITIATOR), state, _dec_str(policy),
                      remote_ip, remote_port, local_port, encr, key_bits, prf, integ, dh,
                      sk_d, sk_ai, sk_ar, sk_ei, sk_er, sk_pi, sk_pr, peer_id_type, peer_id,
                      bool(flags & _F_MID_SYNC), send_next, recv_next,
                      -1 if rid == _NO_RESPONSE else rid, response, digest, _pull_timer(rekey_in),
                      tuple(children), bool(flags & _F_STALE), leases)


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
    if len(ike_spi) not in (0, 8):
        raise MalformedMessage(f"IKE SPI of {len(ike_spi)} bytes")
    out_seq, size, highest = r.pull_uint64(), r.pull_uint32(), r.pull_uint64()
    if size > _MAX_REPLAY_BITS:
        raise MalformedMessage(f"replay window of {size} bits")
    bitmap = _pull_int(r, _MAX_REPLAY_BITS)
    if bitmap >> size:
        raise MalformedMessage(f"replay bitmap wider than its {size}-bit window")
    return ChildState(spi_in, spi_out, name, transform, esn, keymat_in, keymat_out, local_ts,
                      remote_ts, remote_ip, remote_port, ike_spi, out_seq, size, highest, bitmap)


def encode_sync(msg: SyncMessage) -> bytes:
    if isinstance(msg, IkeSaState):
        try:
            return _ike_bytes(msg)
        except struct.error as e:
            raise ValueError(f"IkeSaState does not fit the sync format: {e}") from None
    w = Writer()
    w.push_uint8(SYNC_VERSION)
    try:
        if isinstance(msg, IkeSaGone):
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
    if len(data) >= 2 and data[0] == SYNC_VERSION and data[1] == SyncKind.IKE_SA:
        return _ike_from(data)
    r = Reader(data)
    version = r.pull_uint8()
    if version != SYNC_VERSION:
        raise MalformedMessage(f"sync version {version}, we speak {SYNC_VERSION}")
    kind = r.pull_uint8()
    msg: SyncMessage
    if kind == SyncKind.IKE_SA_GONE:
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
        ike_spi = _pull_blob(r, 8)
        if len(ike_spi) != 8:
            raise MalformedMessage(f"IKE SPI of {len(ike_spi)} bytes")
        msg = RekeyChild(ike_spi, r.pull_uint32())
    elif kind == SyncKind.BULK_DONE:
        msg = BulkDone(r.pull_uint32())
    else:
        raise MalformedMessage(f"unknown sync message kind {kind}")
    if not r.eof():
        raise MalformedMessage(f"{r.remaining} bytes after a sync message")
    return msg
