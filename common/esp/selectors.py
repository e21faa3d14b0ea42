"""RFC 4301 §5.2 selector checks on inner (cleartext) packets, both directions.

Rules of this file (docs/esp.md "Selector checks"):
- ``five_tuple(packet)`` reads ``(version, source, destination, protocol,
  source port, destination port)`` from an IPv4 or IPv6 header, addresses as
  ints. Bad bytes raise ``MalformedMessage`` and nothing else: a packet too
  short for its IP header, an IPv4 IHL under 5 or past the end, an IPv6
  extension header past the end (or more than ``MAX_IPV6_EXT_HEADERS``), a
  TCP/UDP/SCTP/UDP-Lite/DCCP header too short for its ports, an ICMP header
  too short for type and code.
- IPv6: Hop-by-Hop, Routing, Fragment and Destination Options headers are
  skipped (RFC 8200 §4); the protocol is the Next Header after them (RFC 4301
  §4.4.1.1 "Next Layer Protocol"). Anything else (AH, ESP, Mobility, No Next
  Header...) is the protocol itself.
- ICMP and ICMPv6 carry ``type << 8 | code`` in both port fields (RFC 4301
  §4.4.1.3, RFC 7296 §3.13.1), so each side's selector must allow it.
- Packets without ports (other protocols; non-initial fragments, whose ports
  are in the first fragment: RFC 4301 §7) get ``NO_PORTS``, which only a
  selector with any port (0-65535, or OPAQUE 65535-0) accepts. We keep no
  fragment state (RFC 4301 §7.3): a child restricted to ports does not carry
  non-initial fragments, in either direction.
- Selectors are compiled once per child into tuples of ints (``compile_ts``);
  the per-packet work is one ``struct`` unpack and int comparisons. Matching
  agrees with ``common.ike.ts.contains`` (the reference the tests compare to).
- The data path calls ``matcher(src_ts, dst_ts)`` once per child and then the
  result per packet. With the compiled module (common/esp/_esp_fast.c, unless
  ``IPSEC_CLUSTER_PURE_ESP=1``) that is ``match_selectors`` on packed records
  (``compile_blob``), else ``packet_matches`` here; ``five_tuple`` likewise.
  Both raise ``MalformedMessage`` in the same cases.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from functools import partial

from common.errors import MalformedMessage
from common.esp.transforms import PURE_ESP_ENV
from common.ike.ts import PORT_MAX, TrafficSelector

#: the port of a packet that has none (any negative value fails a port range)
NO_PORTS = -1
#: extension headers walked before giving up (a real packet has a few)
MAX_IPV6_EXT_HEADERS = 8

IPV4_MIN_HEADER = 20   # RFC 791 §3.1
IPV6_HEADER = 40       # RFC 8200 §3
IPV4_FRAG_OFFSET_MASK = 0x1FFF
IPV6_FRAG_OFFSET_MASK = 0xFFF8
IPV6_FRAG_HEADER = 8   # RFC 8200 §4.5

#: protocols whose first 4 bytes are source and destination port
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDP-Lite
ICMP_PROTOCOLS = frozenset({1, 58})                 # ICMP, ICMPv6
#: RFC 8200 §4: Hop-by-Hop, Routing, Destination Options ((len + 1) * 8 bytes)
IPV6_SKIPPED = frozenset({0, 43, 60})
IPV6_FRAGMENT = 44

#: (version, first address, last address, protocol or 0, first port, last port)
CompiledTs = tuple[int, int, int, int, int, int]
#: (version, source, destination, protocol, source port, destination port)
FiveTuple = tuple[int, int, int, int, int, int]

# fragment field, protocol, source, destination, then the first 4 bytes after
# a 20-byte header (ports, or ICMP type and code): the common case in one unpack
_V4_PORTS = struct.Struct("!6xHxB2xIIHH")
_V4 = struct.Struct("!6xHxB2xII")
_V6 = struct.Struct("!6xB1xQQQQ")
_PORTS = struct.Struct("!HH")
_TYPE_CODE = struct.Struct("!H")
#: one compiled selector for common/esp/_esp_fast.c: version, protocol, first and
#: last port (native ints), first and last address (16 bytes, big-endian)
_BLOB = struct.Struct("=BBxxii16s16s")

Packet = bytes | bytearray | memoryview
#: a child's check for one direction: True, False, or MalformedMessage
Matcher = Callable[[Packet], bool]


def compile_ts(tss: Iterable[TrafficSelector]) -> tuple[CompiledTs, ...]:
    """Selectors as int tuples for the data path; empty ranges (start > end,
    from a misbehaving peer) are left out, so they match nothing."""
    out: list[CompiledTs] = []
    for ts in tss:
        if ts.start_int > ts.end_int:
            continue
        if ts.any_port:
            lo, hi = NO_PORTS, PORT_MAX
        elif ts.start_port <= ts.end_port:
            lo, hi = ts.start_port, ts.end_port
        else:
            continue
        out.append((ts.version, ts.start_int, ts.end_int, ts.ip_protocol, lo, hi))
    return tuple(out)


def compile_blob(tss: Iterable[TrafficSelector]) -> bytes:
    """``compile_ts`` packed for the compiled matcher."""
    return b"".join(_BLOB.pack(v, proto, plo, phi, lo.to_bytes(4 if v == 4 else 16, "big"),
                               hi.to_bytes(4 if v == 4 else 16, "big"))
                    for v, lo, hi, proto, plo, phi in compile_ts(tss))


def matcher(src_ts: Iterable[TrafficSelector], dst_ts: Iterable[TrafficSelector]) -> Matcher:
    """The per-packet check that a packet's source is in ``src_ts`` and its
    destination in ``dst_ts`` (the fastest implementation there is)."""
    if _c_match is not None:
        return partial(_c_match, compile_blob(src_ts), compile_blob(dst_ts))
    return partial(_py_match, compile_ts(src_ts), compile_ts(dst_ts))


def five_tuple_py(packet: Packet) -> FiveTuple:
    """The selector fields of an IPv4/IPv6 packet (module rules)."""
    n = len(packet)
    if n == 0:
        raise MalformedMessage("empty inner packet")
    b0 = packet[0]
    if b0 == 0x45 and n >= IPV4_MIN_HEADER + 4:
        # The common case: no IPv4 options, ports (or type/code) present.
        frag, proto, src, dst, sport, dport = _V4_PORTS.unpack_from(packet)
        if frag & IPV4_FRAG_OFFSET_MASK:
            return 4, src, dst, proto, NO_PORTS, NO_PORTS
        if proto in PORT_PROTOCOLS:
            return 4, src, dst, proto, sport, dport
        if proto in ICMP_PROTOCOLS:
            return 4, src, dst, proto, sport, sport
        return 4, src, dst, proto, NO_PORTS, NO_PORTS
    version = b0 >> 4
    if version == 4:
        ihl = (b0 & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or n < ihl:
            raise MalformedMessage(f"IPv4 header of {ihl} bytes in a {n}-byte packet")
        frag, proto, src, dst = _V4.unpack_from(packet)
        if frag & IPV4_FRAG_OFFSET_MASK:
            return 4, src, dst, proto, NO_PORTS, NO_PORTS
        sport, dport = _ports(packet, proto, ihl, n)
        return 4, src, dst, proto, sport, dport
    if version == 6:
        return _five_tuple_v6(packet, n)
    raise MalformedMessage(f"inner packet of IP version {version}")


def _five_tuple_v6(packet: Packet, n: int) -> FiveTuple:
    if n < IPV6_HEADER:
        raise MalformedMessage(f"IPv6 packet of {n} bytes")
    nh, s_hi, s_lo, d_hi, d_lo = _V6.unpack_from(packet)
    src, dst = (s_hi << 64) | s_lo, (d_hi << 64) | d_lo
    off = IPV6_HEADER
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if nh in IPV6_SKIPPED:
            if n < off + 2:
                raise MalformedMessage("IPv6 extension header past the end")
            nh, off = packet[off], off + (packet[off + 1] + 1) * 8
        elif nh == IPV6_FRAGMENT:
            if n < off + IPV6_FRAG_HEADER:
                raise MalformedMessage("IPv6 fragment header past the end")
            offset = (packet[off + 2] << 8 | packet[off + 3]) & IPV6_FRAG_OFFSET_MASK
            nh, off = packet[off], off + IPV6_FRAG_HEADER
            if offset:
                # RFC 4301 §7: a non-initial fragment has no ports; its
                # protocol is what the fragment header names.
                return 6, src, dst, nh, NO_PORTS, NO_PORTS
        else:
            break
    else:
        raise MalformedMessage(f"more than {MAX_IPV6_EXT_HEADERS} IPv6 extension headers")
    if off > n:
        raise MalformedMessage("IPv6 extension header past the end")
    sport, dport = _ports(packet, nh, off, n)
    return 6, src, dst, nh, sport, dport


def _ports(packet: Packet, proto: int, off: int,
           n: int) -> tuple[int, int]:
    if proto in PORT_PROTOCOLS:
        if n < off + 4:
            raise MalformedMessage(f"protocol {proto} header too short for its ports")
        sport, dport = _PORTS.unpack_from(packet, off)
        return int(sport), int(dport)
    if proto in ICMP_PROTOCOLS:
        if n < off + 2:
            raise MalformedMessage("ICMP header too short for type and code")
        (type_code,) = _TYPE_CODE.unpack_from(packet, off)
        return int(type_code), int(type_code)
    return NO_PORTS, NO_PORTS


def _py_match(src_sels: tuple[CompiledTs, ...], dst_sels: tuple[CompiledTs, ...],
              packet: Packet) -> bool:
    return packet_matches(packet, src_sels, dst_sels)


def packet_matches(packet: Packet, src_sels: tuple[CompiledTs, ...],
                   dst_sels: tuple[CompiledTs, ...]) -> bool:
    """Is the packet's source in ``src_sels`` and its destination in
    ``dst_sels``, protocol and ports included? ``MalformedMessage`` when the
    headers are not there. Inbound: ``src_sels`` is the child's remote_ts,
    ``dst_sels`` its local_ts; outbound the other way round."""
    if len(packet) >= IPV4_MIN_HEADER + 4 and packet[0] == 0x45:
        # ``five_tuple``'s common case inline: this runs for every packet.
        frag, proto, src, dst, sport, dport = _V4_PORTS.unpack_from(packet)
        version = 4
        if frag & IPV4_FRAG_OFFSET_MASK:
            sport = dport = NO_PORTS
        elif proto not in PORT_PROTOCOLS:
            dport = sport if proto in ICMP_PROTOCOLS else NO_PORTS
            sport = dport
    else:
        version, src, dst, proto, sport, dport = five_tuple_py(packet)
    for v, lo, hi, p, plo, phi in src_sels:
        if v == version and lo <= src <= hi and (p == 0 or p == proto) \
                and plo <= sport <= phi:
            break
    else:
        return False
    for v, lo, hi, p, plo, phi in dst_sels:
        if v == version and lo <= dst <= hi and (p == 0 or p == proto) \
                and plo <= dport <= phi:
            return True
    return False


def _load_compiled() -> tuple[Callable[[bytes, bytes, Packet], bool] | None,
                              Callable[[Packet], FiveTuple] | None]:
    if os.environ.get(PURE_ESP_ENV) == "1":
        return None, None
    try:
        from common.esp._esp_fast import five_tuple as c_five_tuple
        from common.esp._esp_fast import match_selectors as c_match
    except ImportError:   # not built, or built before these existed
        return None, None
    return c_match, c_five_tuple


_c_match, _c_five_tuple = _load_compiled()
#: ``five_tuple_py``, compiled when available
five_tuple: Callable[[Packet], FiveTuple] = _c_five_tuple or five_tuple_py
