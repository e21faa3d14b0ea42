"""IKEv2 payloads (RFC 7296 §3.2-§3.13) as slotted dataclasses, and their codec.

Rules of this file:
- ``pull_x(reader)`` parses one payload body (or substructure), ``push_x(writer,
  x)`` writes one; ``encode_payloads``/``decode_payloads`` do a whole chain.
- Decoding bytes from the network raises ``MalformedMessage`` for bad bytes
  (never ``IndexError``, ``struct.error``, ``ValueError`` or ``ipaddress``
  errors) and ``UnsupportedCriticalPayload`` for an unknown payload with the
  critical bit set (RFC 7296 §2.5). Encoding our own bad values raises
  ``ValueError`` (a bug on our side).
- The SK payload (§3.14) is not a ``Payload``: ``message.py`` handles it,
  because its body is not a payload chain but ciphertext.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from common.buffer import Reader, Writer
from common.errors import MalformedMessage, RemoteProtocolError
from common.ike.constants import (
    GENERIC_PAYLOAD_HEADER_LEN,
    AuthMethod,
    CertEncoding,
    CfgAttr,
    CfgType,
    DhId,
    EncrId,
    EsnId,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformAttr,
    TransformType,
    TsType,
)
from common.ike.transforms import Proposal, Transform
from common.ike.ts import TrafficSelector

# RFC 7296 §3.2: Next Payload (1), C + RESERVED (1), Payload Length (2).
GENERIC_HEADER = struct.Struct("!BBH")
CRITICAL_BIT = 0x80
MAX_PAYLOAD_LEN = 0xFFFF

NONCE_MIN_LEN = 16  # RFC 7296 §3.9
MAX_SELECTORS = 0xFF  # RFC 7296 §3.13: Number of TSs is one octet
NONCE_MAX_LEN = 256
SHA1_LEN = 20  # RFC 7296 §3.7: CERTREQ hashes

# RFC 7296 §3.3.1/§3.3.2: the "Last Substructure" values.
_LAST = 0
_MORE_PROPOSALS = 2
_MORE_TRANSFORMS = 3
_PROPOSAL_HEADER_LEN = 8
_TRANSFORM_HEADER_LEN = 8
_ATTR_FORMAT_TV = 0x8000  # RFC 7296 §3.3.5: AF bit set = TV format

# RFC 7296 §3.13.1: Selector Length of an address range selector.
_TS_LEN = {TsType.TS_IPV4_ADDR_RANGE: 16, TsType.TS_IPV6_ADDR_RANGE: 40}
_TS_ADDR_CLASS: dict[TsType, type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]] = {
    TsType.TS_IPV4_ADDR_RANGE: ipaddress.IPv4Address,
    TsType.TS_IPV6_ADDR_RANGE: ipaddress.IPv6Address,
}
_TS_ADDR_LEN = {TsType.TS_IPV4_ADDR_RANGE: 4, TsType.TS_IPV6_ADDR_RANGE: 16}
_TS_VERSION = {TsType.TS_IPV4_ADDR_RANGE: 4, TsType.TS_IPV6_ADDR_RANGE: 6}

_TRANSFORM_ID_ENUMS: dict[TransformType, type[EncrId | PrfId | IntegId | DhId | EsnId]] = {
    TransformType.ENCR: EncrId,
    TransformType.PRF: PrfId,
    TransformType.INTEG: IntegId,
    TransformType.DH: DhId,
    TransformType.ESN: EsnId,
}

# Payload types we carry without interpreting their bodies.
OPAQUE_TYPES = frozenset({PayloadType.EAP})

# RFC 7296 §3.15.1: R bit (reserved, ignored on receipt) + 15-bit attribute type.
_CFG_ATTR_RESERVED_BIT = 0x8000
_CFG_ATTR_HEADER_LEN = 4


class UnsupportedCriticalPayload(RemoteProtocolError):
    """An unknown payload type with the critical bit set (RFC 7296 §2.5).

    The whole message must be rejected with UNSUPPORTED_CRITICAL_PAYLOAD, whose
    notification data is the one-octet payload type (``notify_data``)."""

    notify_type = NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    drop_reason = "unsupported_critical_payload"

    def __init__(self, payload_type: int) -> None:
        super().__init__(f"unsupported critical payload type {payload_type}")
        self.payload_type = payload_type
        self.notify_data = bytes([payload_type])


# ---------------------------------------------------------------------------
# Payload dataclasses


@dataclass(slots=True)
class SaPayload:
    """RFC 7296 §3.3."""

    payload_type: ClassVar[PayloadType] = PayloadType.SA
    proposals: list[Proposal] = field(default_factory=list)


@dataclass(slots=True)
class KePayload:
    """RFC 7296 §3.4."""

    payload_type: ClassVar[PayloadType] = PayloadType.KE
    group: DhId
    data: bytes


@dataclass(slots=True)
class IdPayload:
    """RFC 7296 §3.5; use ``IdiPayload`` or ``IdrPayload``."""

    payload_type: ClassVar[PayloadType]
    id_type: IdType
    data: bytes


@dataclass(slots=True)
class IdiPayload(IdPayload):
    payload_type: ClassVar[PayloadType] = PayloadType.IDI


@dataclass(slots=True)
class IdrPayload(IdPayload):
    payload_type: ClassVar[PayloadType] = PayloadType.IDR


@dataclass(slots=True)
class AuthPayload:
    """RFC 7296 §3.8."""

    payload_type: ClassVar[PayloadType] = PayloadType.AUTH
    method: AuthMethod
    data: bytes


@dataclass(slots=True)
class CertPayload:
    """RFC 7296 §3.6: Cert Encoding (one octet), Certificate Data (for
    X509_SIGNATURE: one DER certificate)."""

    payload_type: ClassVar[PayloadType] = PayloadType.CERT
    encoding: CertEncoding
    data: bytes


@dataclass(slots=True)
class CertReqPayload:
    """RFC 7296 §3.7: Cert Encoding, Certification Authority (for
    X509_SIGNATURE: SHA-1 hashes of trust anchors' SubjectPublicKeyInfo,
    20 octets each)."""

    payload_type: ClassVar[PayloadType] = PayloadType.CERTREQ
    encoding: CertEncoding
    data: bytes = b""


@dataclass(slots=True)
class NoncePayload:
    """RFC 7296 §3.9 (16 to 256 octets)."""

    payload_type: ClassVar[PayloadType] = PayloadType.NONCE
    data: bytes


@dataclass(slots=True)
class NotifyPayload:
    """RFC 7296 §3.10. ``spi`` is empty for notifications about the IKE SA."""

    payload_type: ClassVar[PayloadType] = PayloadType.NOTIFY
    notify_type: NotifyType
    protocol: ProtocolId = ProtocolId.NONE
    spi: bytes = b""
    data: bytes = b""


@dataclass(slots=True)
class DeletePayload:
    """RFC 7296 §3.11. IKE: no SPIs (the SA is the one the message belongs
    to); ESP/AH: 4-byte SPIs."""

    payload_type: ClassVar[PayloadType] = PayloadType.DELETE
    protocol: ProtocolId
    spis: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class VendorIdPayload:
    """RFC 7296 §3.12."""

    payload_type: ClassVar[PayloadType] = PayloadType.VENDOR_ID
    data: bytes


@dataclass(slots=True)
class TsPayload:
    """RFC 7296 §3.13; use ``TsiPayload`` or ``TsrPayload``."""

    payload_type: ClassVar[PayloadType]
    selectors: list[TrafficSelector] = field(default_factory=list)


@dataclass(slots=True)
class TsiPayload(TsPayload):
    payload_type: ClassVar[PayloadType] = PayloadType.TSI


@dataclass(slots=True)
class TsrPayload(TsPayload):
    payload_type: ClassVar[PayloadType] = PayloadType.TSR


@dataclass(slots=True, frozen=True)
class CfgAttribute:
    """One Configuration Attribute (RFC 7296 §3.15.1); ``value`` may be empty
    (a request for "any" value)."""

    attr_type: CfgAttr
    value: bytes = b""


@dataclass(slots=True)
class CpPayload:
    """RFC 7296 §3.15: the Configuration payload (virtual IPs, DNS servers)."""

    payload_type: ClassVar[PayloadType] = PayloadType.CP
    cfg_type: CfgType
    attributes: list[CfgAttribute] = field(default_factory=list)


@dataclass(slots=True)
class OpaquePayload:
    """A payload we carry but do not interpret (CERT, CERTREQ, EAP)."""

    payload_type: PayloadType
    data: bytes
    critical: bool = False


Payload = (SaPayload | KePayload | IdiPayload | IdrPayload | AuthPayload | NoncePayload
           | CertPayload | CertReqPayload | NotifyPayload | DeletePayload | VendorIdPayload
           | TsiPayload | TsrPayload | CpPayload | OpaquePayload)


# ---------------------------------------------------------------------------
# SA payload: proposals, transforms, attributes (RFC 7296 §3.3)


def pull_transform(buf: Reader) -> tuple[bool, Transform]:
    """One transform substructure; returns (is_last, transform)."""
    last = buf.pull_uint8()
    if last not in (_LAST, _MORE_TRANSFORMS):
        raise MalformedMessage(f"bad last-substructure value {last} in transform")
    buf.pull_uint8()  # RESERVED
    length = buf.pull_uint16()
    if length < _TRANSFORM_HEADER_LEN:
        raise MalformedMessage(f"transform length {length} too small")
    body = buf.sub_reader(length - 4)
    ttype = TransformType(body.pull_uint8())
    body.pull_uint8()  # RESERVED
    raw_id = body.pull_uint16()
    enum = _TRANSFORM_ID_ENUMS.get(ttype)
    tid = enum(raw_id) if enum is not None else raw_id
    key_length: int | None = None
    while not body.eof():
        attr = body.pull_uint16()
        if attr != _ATTR_FORMAT_TV | TransformAttr.KEY_LENGTH:
            # RFC 7296 §3.3.5: Key Length (TV format) is the only attribute
            # IKEv2 defines. A transform with any other could not be carried
            # in ``Transform``, and dropping the attribute could make us accept
            # something the peer did not offer, so the message is refused.
            raise MalformedMessage(f"unsupported transform attribute {attr:#06x}")
        if key_length is not None:
            raise MalformedMessage("duplicate Key Length attribute")
        key_length = body.pull_uint16()
    return last == _LAST, Transform(ttype, tid, key_length)


def push_transform(buf: Writer, t: Transform, last: bool) -> None:
    buf.push_uint8(_LAST if last else _MORE_TRANSFORMS)
    buf.push_uint8(0)
    length = _TRANSFORM_HEADER_LEN + (4 if t.key_length is not None else 0)
    buf.push_uint16(length)
    buf.push_uint8(int(t.type))
    buf.push_uint8(0)
    _check_range("transform id", t.id, 0xFFFF)
    buf.push_uint16(int(t.id))
    if t.key_length is not None:
        _check_range("key length", t.key_length, 0xFFFF)
        buf.push_uint16(_ATTR_FORMAT_TV | TransformAttr.KEY_LENGTH)
        buf.push_uint16(t.key_length)


def _check_spi_size(protocol: ProtocolId, size: int) -> bool:
    if protocol == ProtocolId.IKE:
        return size in (0, 8)
    if protocol in (ProtocolId.ESP, ProtocolId.AH):
        return size == 4
    return size in (0, 4, 8)


def pull_proposal(buf: Reader) -> tuple[bool, Proposal]:
    """One proposal substructure; returns (is_last, proposal)."""
    last = buf.pull_uint8()
    if last not in (_LAST, _MORE_PROPOSALS):
        raise MalformedMessage(f"bad last-substructure value {last} in proposal")
    buf.pull_uint8()  # RESERVED
    length = buf.pull_uint16()
    if length < _PROPOSAL_HEADER_LEN:
        raise MalformedMessage(f"proposal length {length} too small")
    body = buf.sub_reader(length - 4)
    number = body.pull_uint8()
    protocol = ProtocolId(body.pull_uint8())
    spi_size = body.pull_uint8()
    count = body.pull_uint8()
    if not _check_spi_size(protocol, spi_size):
        raise MalformedMessage(f"SPI size {spi_size} invalid for protocol {protocol.name}")
    spi = body.pull_bytes(spi_size)
    transforms: list[Transform] = []
    for i in range(count):
        t_last, t = pull_transform(body)
        if t_last != (i == count - 1):
            raise MalformedMessage("transform count and last-substructure flags disagree")
        transforms.append(t)
    if not body.eof():
        raise MalformedMessage("trailing bytes in proposal")
    return last == _LAST, Proposal(number, protocol, spi, transforms)


def push_proposal(buf: Writer, p: Proposal, last: bool) -> None:
    if not _check_spi_size(p.protocol, len(p.spi)):
        raise ValueError(f"SPI of {len(p.spi)} bytes invalid for {p.protocol.name}")
    if not 0 < len(p.transforms) <= 0xFF:
        raise ValueError(f"a proposal needs 1..255 transforms, has {len(p.transforms)}")
    start = len(buf)
    buf.push_uint8(_LAST if last else _MORE_PROPOSALS)
    buf.push_uint8(0)
    buf.push_uint16(0)  # patched below
    buf.push_uint8(p.number)
    buf.push_uint8(int(p.protocol))
    buf.push_uint8(len(p.spi))
    buf.push_uint8(len(p.transforms))
    buf.push_bytes(p.spi)
    for i, t in enumerate(p.transforms):
        push_transform(buf, t, i == len(p.transforms) - 1)
    buf.patch_uint16(start + 2, _check_range("proposal length", len(buf) - start, 0xFFFF))


def _check_numbering(numbers: list[int]) -> bool:
    # RFC 7296 §3.3.1: proposals are numbered 1, 2, 3...; an accepted (single)
    # proposal keeps the number it had in the request.
    if not numbers or numbers[0] == 0:
        return False
    if len(numbers) > 1 and numbers[0] != 1:
        return False
    return all(b == a + 1 for a, b in itertools.pairwise(numbers))


def pull_sa(buf: Reader) -> SaPayload:
    proposals: list[Proposal] = []
    last = buf.eof()
    while not last:
        last, p = pull_proposal(buf)
        proposals.append(p)
    if not buf.eof():
        raise MalformedMessage("bytes after the last proposal")
    if not _check_numbering([p.number for p in proposals]):
        raise MalformedMessage("proposal numbers out of sequence")
    return SaPayload(proposals)


def push_sa(buf: Writer, sa: SaPayload) -> None:
    if not _check_numbering([p.number for p in sa.proposals]):
        raise ValueError("an SA payload needs proposals numbered 1, 2, 3...")
    for i, p in enumerate(sa.proposals):
        push_proposal(buf, p, i == len(sa.proposals) - 1)


# ---------------------------------------------------------------------------
# Traffic selectors (RFC 7296 §3.13)


def pull_traffic_selector(buf: Reader) -> TrafficSelector:
    ts_type = TsType(buf.pull_uint8())
    ip_protocol = buf.pull_uint8()
    length = buf.pull_uint16()
    expected = _TS_LEN.get(ts_type)
    if expected is None:
        raise MalformedMessage(f"unsupported traffic selector type {int(ts_type)}")
    if length != expected:
        raise MalformedMessage(f"selector length {length}, expected {expected}")
    start_port = buf.pull_uint16()
    end_port = buf.pull_uint16()
    cls = _TS_ADDR_CLASS[ts_type]
    n = _TS_ADDR_LEN[ts_type]
    start = cls(buf.pull_bytes(n))
    end = cls(buf.pull_bytes(n))
    return TrafficSelector(ts_type, ip_protocol, start_port, end_port, start, end)


def push_traffic_selector(buf: Writer, ts: TrafficSelector) -> None:
    version = _TS_VERSION.get(ts.ts_type)
    if version is None or ts.start_addr.version != version or ts.end_addr.version != version:
        raise ValueError(f"selector type {ts.ts_type!r} does not match its addresses")
    buf.push_uint8(int(ts.ts_type))
    buf.push_uint8(_check_range("IP protocol", ts.ip_protocol, 0xFF))
    buf.push_uint16(_TS_LEN[ts.ts_type])
    buf.push_uint16(_check_range("port", ts.start_port, 0xFFFF))
    buf.push_uint16(_check_range("port", ts.end_port, 0xFFFF))
    buf.push_bytes(ts.start_addr.packed)
    buf.push_bytes(ts.end_addr.packed)


_TsT = TypeVar("_TsT", TsiPayload, TsrPayload)


def pull_ts(buf: Reader, cls: type[_TsT]) -> _TsT:
    count = buf.pull_uint8()
    buf.pull_bytes(3)  # RESERVED
    selectors = [pull_traffic_selector(buf) for _ in range(count)]
    return cls(selectors)


def push_ts(buf: Writer, ts: TsPayload) -> None:
    buf.push_uint8(_check_range("selector count", len(ts.selectors), 0xFF))
    buf.push_bytes(b"\x00\x00\x00")
    for sel in ts.selectors:
        push_traffic_selector(buf, sel)


# ---------------------------------------------------------------------------
# The other payload bodies


def pull_notify(buf: Reader) -> NotifyPayload:
    protocol = ProtocolId(buf.pull_uint8())
    spi_size = buf.pull_uint8()
    notify_type = NotifyType(buf.pull_uint16())
    spi = buf.pull_bytes(spi_size)
    return NotifyPayload(notify_type, protocol, spi, buf.pull_rest())


def push_notify(buf: Writer, n: NotifyPayload) -> None:
    buf.push_uint8(int(n.protocol))
    buf.push_uint8(_check_range("SPI size", len(n.spi), 0xFF))
    buf.push_uint16(_check_range("notify type", n.notify_type, 0xFFFF))
    buf.push_bytes(n.spi)
    buf.push_bytes(n.data)


def pull_delete(buf: Reader) -> DeletePayload:
    protocol = ProtocolId(buf.pull_uint8())
    spi_size = buf.pull_uint8()
    count = buf.pull_uint16()
    # RFC 7296 §3.11: IKE uses SPI size 0 and no SPIs; ESP and AH 4-byte SPIs.
    if protocol == ProtocolId.IKE:
        if spi_size != 0 or count != 0:
            raise MalformedMessage("an IKE SA delete carries no SPIs")
    elif protocol in (ProtocolId.ESP, ProtocolId.AH):
        if spi_size != 4:
            raise MalformedMessage(f"SPI size {spi_size} in an {protocol.name} delete")
    else:
        raise MalformedMessage(f"delete for unknown protocol {int(protocol)}")
    if buf.remaining != spi_size * count:
        raise MalformedMessage("delete payload length disagrees with its SPI count")
    return DeletePayload(protocol, [buf.pull_bytes(spi_size) for _ in range(count)])


def push_delete(buf: Writer, d: DeletePayload) -> None:
    size = 0 if d.protocol == ProtocolId.IKE else 4
    if d.protocol not in (ProtocolId.IKE, ProtocolId.ESP, ProtocolId.AH) or any(
            len(s) != size for s in d.spis) or (size == 0 and d.spis):
        raise ValueError(f"bad delete: {d.protocol!r} with SPIs {d.spis!r}")
    buf.push_uint8(int(d.protocol))
    buf.push_uint8(size)
    buf.push_uint16(_check_range("SPI count", len(d.spis), 0xFFFF))
    for spi in d.spis:
        buf.push_bytes(spi)


def pull_cp(buf: Reader) -> CpPayload:
    """RFC 7296 §3.15: CFG Type, three RESERVED octets, attributes to the end."""
    cfg_type = CfgType(buf.pull_uint8())
    buf.pull_bytes(3)
    attributes: list[CfgAttribute] = []
    while not buf.eof():
        attr_type = CfgAttr(buf.pull_uint16() & ~_CFG_ATTR_RESERVED_BIT)
        attributes.append(CfgAttribute(attr_type, buf.pull_bytes(buf.pull_uint16())))
    return CpPayload(cfg_type, attributes)


def push_cp(buf: Writer, cp: CpPayload) -> None:
    buf.push_uint8(_check_range("CFG type", cp.cfg_type, 0xFF))
    buf.push_bytes(b"\x00\x00\x00")
    for attr in cp.attributes:
        buf.push_uint16(_check_range("attribute type", attr.attr_type,
                                     _CFG_ATTR_RESERVED_BIT - 1))
        buf.push_uint16(_check_range("attribute length", len(attr.value), 0xFFFF))
        buf.push_bytes(attr.value)


def pull_nonce(buf: Reader) -> NoncePayload:
    if not NONCE_MIN_LEN <= buf.remaining <= NONCE_MAX_LEN:
        raise MalformedMessage(f"nonce of {buf.remaining} bytes (RFC 7296 §3.9: 16..256)")
    return NoncePayload(buf.pull_rest())


def _pull_typed(buf: Reader) -> tuple[int, bytes]:
    """Type octet, three RESERVED octets, data (KE has a 2-byte type)."""
    kind = buf.pull_uint8()
    buf.pull_bytes(3)
    return kind, buf.pull_rest()


def pull_payload_body(ptype: PayloadType, critical: bool, buf: Reader) -> Payload | None:
    """Decode one payload body of a known type; None for an unknown type that
    may be skipped (RFC 7296 §2.5). SK/SKF are not handled here."""
    if ptype == PayloadType.SA:
        return pull_sa(buf)
    if ptype == PayloadType.KE:
        group = DhId(buf.pull_uint16())
        buf.pull_uint16()  # RESERVED
        return KePayload(group, buf.pull_rest())
    if ptype in (PayloadType.IDI, PayloadType.IDR):
        kind, data = _pull_typed(buf)
        cls = IdiPayload if ptype == PayloadType.IDI else IdrPayload
        return cls(IdType(kind), data)
    if ptype == PayloadType.AUTH:
        kind, data = _pull_typed(buf)
        return AuthPayload(AuthMethod(kind), data)
    if ptype in (PayloadType.CERT, PayloadType.CERTREQ):
        if buf.remaining < 1:
            raise MalformedMessage(f"empty {ptype.name} payload (RFC 7296 §3.6: encoding octet)")
        encoding = CertEncoding(buf.pull_uint8())
        if ptype == PayloadType.CERT:
            return CertPayload(encoding, buf.pull_rest())
        data = buf.pull_rest()
        if encoding == CertEncoding.X509_SIGNATURE and len(data) % SHA1_LEN:
            raise MalformedMessage(f"CERTREQ of {len(data)} bytes: not 20-byte SHA-1 hashes")
        return CertReqPayload(encoding, data)
    if ptype == PayloadType.NONCE:
        return pull_nonce(buf)
    if ptype == PayloadType.NOTIFY:
        return pull_notify(buf)
    if ptype == PayloadType.DELETE:
        return pull_delete(buf)
    if ptype == PayloadType.VENDOR_ID:
        return VendorIdPayload(buf.pull_rest())
    if ptype in (PayloadType.TSI, PayloadType.TSR):
        if ptype == PayloadType.TSI:
            return pull_ts(buf, TsiPayload)
        return pull_ts(buf, TsrPayload)
    if ptype == PayloadType.CP:
        return pull_cp(buf)
    if ptype in OPAQUE_TYPES:
        return OpaquePayload(ptype, buf.pull_rest(), critical)
    if ptype in (PayloadType.SK, PayloadType.SKF):
        raise MalformedMessage(f"{ptype.name} payload not allowed here")
    if critical:
        raise UnsupportedCriticalPayload(int(ptype))
    return None


def push_payload_body(buf: Writer, p: Payload) -> None:
    match p:
        case SaPayload():
            push_sa(buf, p)
        case KePayload():
            buf.push_uint16(_check_range("DH group", p.group, 0xFFFF))
            buf.push_uint16(0)
            buf.push_bytes(p.data)
        case IdiPayload() | IdrPayload():
            buf.push_uint8(int(p.id_type))
            buf.push_bytes(b"\x00\x00\x00")
            buf.push_bytes(p.data)
        case AuthPayload():
            buf.push_uint8(int(p.method))
            buf.push_bytes(b"\x00\x00\x00")
            buf.push_bytes(p.data)
        case CertPayload() | CertReqPayload():
            buf.push_uint8(_check_range("cert encoding", p.encoding, 0xFF))
            buf.push_bytes(p.data)
        case NoncePayload():
            if not NONCE_MIN_LEN <= len(p.data) <= NONCE_MAX_LEN:
                raise ValueError(f"nonce of {len(p.data)} bytes (RFC 7296 §3.9: 16..256)")
            buf.push_bytes(p.data)
        case NotifyPayload():
            push_notify(buf, p)
        case DeletePayload():
            push_delete(buf, p)
        case VendorIdPayload():
            buf.push_bytes(p.data)
        case TsiPayload() | TsrPayload():
            push_ts(buf, p)
        case CpPayload():
            push_cp(buf, p)
        case OpaquePayload():
            if p.payload_type not in OPAQUE_TYPES:
                raise ValueError(f"{p.payload_type!r} is not an opaque payload type")
            buf.push_bytes(p.data)


# ---------------------------------------------------------------------------
# Payload chains (RFC 7296 §3.2)


@dataclass(slots=True, frozen=True)
class RawPayload:
    """One payload as found in a chain, body not yet decoded."""

    payload_type: PayloadType
    next_type: PayloadType
    critical: bool
    start: int  # offset of the generic payload header
    body: Reader


def iter_raw_payloads(first_type: int, buf: Reader) -> Iterator[RawPayload]:
    """Walk the Next Payload chain. Stops after a payload whose next type is
    NONE, or after an SK/SKF payload (its Next Payload field names the first
    payload inside it). The caller checks that ``buf`` is then at its end."""
    ptype = PayloadType(first_type)
    while ptype != PayloadType.NONE:
        start = buf.position
        next_type = buf.pull_uint8()
        flags = buf.pull_uint8()
        length = buf.pull_uint16()
        if length < GENERIC_PAYLOAD_HEADER_LEN:
            raise MalformedMessage(f"payload length {length} too small")
        body = buf.sub_reader(length - GENERIC_PAYLOAD_HEADER_LEN)
        yield RawPayload(ptype, PayloadType(next_type), bool(flags & CRITICAL_BIT), start, body)
        if ptype in (PayloadType.SK, PayloadType.SKF):
            return
        ptype = PayloadType(next_type)


def decode_raw_payload(raw: RawPayload) -> Payload | None:
    """Decode the body of one payload found by ``iter_raw_payloads``; None
    when it is an unknown, non-critical payload to skip (RFC 7296 §2.5)."""
    p = pull_payload_body(raw.payload_type, raw.critical, raw.body)
    if p is not None and not raw.body.eof():
        raise MalformedMessage(f"trailing bytes in {raw.payload_type.name} payload")
    return p


def decode_payloads(first_type: int, data: bytes | bytearray | memoryview) -> list[Payload]:
    """Decode a payload chain that starts with a payload of ``first_type``.

    Unknown non-critical payloads are skipped; an unknown critical one raises
    ``UnsupportedCriticalPayload``; SK/SKF inside a chain is malformed."""
    buf = Reader(data)
    out: list[Payload] = []
    for raw in iter_raw_payloads(first_type, buf):
        p = decode_raw_payload(raw)
        if p is not None:
            out.append(p)
    if not buf.eof():
        raise MalformedMessage("bytes after the last payload")
    return out


def encode_payloads(payloads: Iterable[Payload],
                    last_next: int = PayloadType.NONE) -> tuple[PayloadType, bytes]:
    """Encode a chain; returns (type of the first payload, bytes).

    ``last_next`` is the Next Payload value of the last payload (NONE, unless
    another payload follows the chain). An empty chain returns (last_next, b"").
    """
    items = list(payloads)
    buf = Writer()
    for i, p in enumerate(items):
        nxt = items[i + 1].payload_type if i + 1 < len(items) else last_next
        start = len(buf)
        buf.push_uint8(int(nxt))
        critical = isinstance(p, OpaquePayload) and p.critical
        buf.push_uint8(CRITICAL_BIT if critical else 0)
        buf.push_uint16(0)  # patched below
        push_payload_body(buf, p)
        buf.patch_uint16(start + 2, _check_range(
            f"{p.payload_type.name} payload length", len(buf) - start, MAX_PAYLOAD_LEN))
    first = items[0].payload_type if items else PayloadType(last_next)
    return first, buf.data


def _check_range(what: str, value: int, maximum: int) -> int:
    if not 0 <= value <= maximum:
        raise ValueError(f"{what} out of range: {value}")
    return int(value)
