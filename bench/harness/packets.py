"""Packet builders for the tests and the benchmarks: IPv4 and IPv6 headers,
UDP, TCP and ICMP, IPv6 extension headers and fragments, and a parser that
checks an IPv4/UDP packet's checksums.

Built on common/packets.py (the Internet checksum and the IPv4/UDP packet of
our peer's traffic). Two kinds of builders:

- whole, well-formed packets with every checksum right (``udp4_packet``,
  ``udp6_packet``, ``tcp4_packet``, ``icmp4_echo``): what a real host sends;
- pieces to assemble odd ones (``ipv4``, ``ipv6``, ``ports``, ``icmp``,
  ``ext6``, ``frag6``): options, fragments, extension-header chains, no
  ports; for the selector checks (RFC 4301 §5.2, §4.4.1.3, §7), which read
  addresses, protocol and ports and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from common.packets import (
    IPV4_HEADER,
    PROTO_UDP,
    UDP_HEADER,
    TrafficTemplate,
    inet_checksum,
    ipv4_header,
    ones_sum,
    pseudo_header4,
    swap_inner,
    udp4_packet,
)

__all__ = [
    "GRE", "ICMP", "ICMP6", "IPV4_HEADER", "SCTP", "TCP", "UDP", "UDP_HEADER", "TrafficTemplate",
    "Udp4", "ext6", "frag6", "icmp", "icmp4_echo", "inet_checksum", "ipv4", "ipv6",
    "ones_sum", "parse_udp4", "ports", "pseudo_header", "swap_inner", "tcp", "tcp4_packet",
    "udp", "udp4_packet", "udp6_packet"]

TCP, UDP, ICMP, ICMP6, SCTP, GRE = 6, PROTO_UDP, 1, 58, 132, 47
TCP_SYN, TCP_ACK = 0x02, 0x10
IPV6_HEADER = struct.Struct("!IHBB16s16s")


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    """The pseudo header of UDP, TCP and ICMPv6 checksums over IPv4 or IPv6."""
    s, d = _packed(src), _packed(dst)
    if len(s) == 4:
        return pseudo_header4(s, d, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)   # RFC 8200 §8.1


# -- pieces ----------------------------------------------------------------------------------


def ipv4(src: str, dst: str, proto: int, l4: bytes = b"", *, frag: int = 0, ihl: int = 5,
         ident: int = 0, ttl: int = 64, checksum: bool = True) -> bytes:
    """An IPv4 packet around ``l4``: ``ihl`` - 5 words of (zero) options,
    ``frag`` the flags and fragment offset field as it is (0x2000: more
    fragments; the offset in 8-byte units)."""
    head = ipv4_header(_packed(src), _packed(dst), proto, len(l4), ident=ident, ttl=ttl,
                       frag=frag, options=bytes((ihl - 5) * 4), checksum=checksum)
    return head + l4


def ipv6(src: str, dst: str, nh: int, rest: bytes = b"", *, hop_limit: int = 64) -> bytes:
    """An IPv6 packet: next header ``nh``, then ``rest`` (extension headers, payload)."""
    return IPV6_HEADER.pack(0x6000_0000, len(rest), nh, hop_limit, _packed(src),
                            _packed(dst)) + rest


def ports(sport: int, dport: int, extra: bytes = bytes(4)) -> bytes:
    """The first bytes of a UDP or TCP header: the ports, then ``extra``."""
    return struct.pack("!HH", sport, dport) + extra


def icmp(type_: int, code: int, body: bytes = bytes(4)) -> bytes:
    """An ICMP (or ICMPv6) message without its checksum: type, code, 0, body."""
    return bytes([type_, code]) + bytes(2) + body


def ext6(nh: int, body_len: int = 6) -> bytes:
    """A Hop-by-Hop / Routing / Destination Options header of ``body_len`` + 2
    bytes (a multiple of 8), next header ``nh``."""
    total = body_len + 2
    if total % 8:
        raise ValueError("an IPv6 extension header is a multiple of 8 bytes")
    return bytes([nh, total // 8 - 1]) + bytes(body_len)


def frag6(nh: int, offset: int, *, more: bool = False, ident: int = 1) -> bytes:
    """An IPv6 Fragment header (RFC 8200 §4.5), ``offset`` in 8-byte units."""
    return struct.pack("!BBHI", nh, 0, offset << 3 | int(more), ident)


# -- transport headers with their checksums ------------------------------------------------


def udp(sport: int, dport: int, payload: bytes = b"", *, src: str | None = None,
        dst: str | None = None) -> bytes:
    """A UDP datagram; with ``src`` and ``dst`` (IPv4 or IPv6) its checksum."""
    length = 8 + len(payload)
    head = UDP_HEADER.pack(sport, dport, length, 0)
    if src is None or dst is None:
        return head + payload
    csum = inet_checksum(pseudo_header(src, dst, UDP, length) + head + payload) or 0xFFFF
    return head[:6] + struct.pack("!H", csum) + payload


def tcp(sport: int, dport: int, payload: bytes = b"", *, flags: int = TCP_SYN, seq: int = 0,
        ack: int = 0, window: int = 65535, src: str | None = None,
        dst: str | None = None) -> bytes:
    """A TCP segment (20-byte header); with ``src`` and ``dst`` its checksum."""
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    if src is None or dst is None:
        return head + payload
    csum = inet_checksum(pseudo_header(src, dst, TCP, len(head) + len(payload)) + head
                         + payload)
    return head[:16] + struct.pack("!H", csum) + head[18:] + payload


# -- whole packets ---------------------------------------------------------------------------


def udp6_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv6/UDP packet with its (mandatory, RFC 8200 §8.1) UDP checksum."""
    return ipv6(src, dst, UDP, udp(sport, dport, payload, src=src, dst=dst))


def tcp4_packet(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *,
                flags: int = TCP_SYN, ident: int = 0) -> bytes:
    """An IPv4/TCP packet with correct header and TCP checksums."""
    return ipv4(src, dst, TCP, tcp(sport, dport, payload, flags=flags, src=src, dst=dst),
                ident=ident)


def icmp4_echo(src: str, dst: str, ident: int, seq: int, payload: bytes = b"", *,
               reply: bool = False) -> bytes:
    """An IPv4 ICMP echo request (or reply) with both checksums."""
    msg = icmp(0 if reply else 8, 0, struct.pack("!HH", ident, seq) + payload)
    msg = msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]
    return ipv4(src, dst, ICMP, msg)


# -- parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Udp4:
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


def parse_udp4(packet: bytes) -> Udp4 | None:
    """The packet if it is IPv4/UDP (no options) with valid lengths and
    checksums, else None."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[9] != UDP:
        return None
    total = struct.unpack_from("!H", packet, 2)[0]
    if total != len(packet) or inet_checksum(packet[:20]) != 0:
        return None
    s, d = packet[12:16], packet[16:20]
    sport, dport, udp_len, csum = UDP_HEADER.unpack_from(packet, 20)
    if udp_len != total - 20:
        return None
    if csum and inet_checksum(pseudo_header4(s, d, UDP, udp_len) + packet[20:]) != 0:
        return None
    return Udp4(str(ipaddress.IPv4Address(s)), str(ipaddress.IPv4Address(d)), sport, dport,
                packet[28:])
