"""Inner IPv4/UDP packets as bytes: the Internet checksum (RFC 1071), a packet
builder with correct header and UDP checksums (RFC 791, RFC 768), a traffic
template whose checksum is updated incrementally (RFC 1624), and the echo's
address swap.

Pure: no I/O. Our peer (dispatcher/peer.py) generates and recognises its
traffic with these; the harness (bench/harness/packets.py) builds its test
packets on them."""

from __future__ import annotations

import ipaddress
import struct

#: first bytes of the UDP payload of every packet a ``TrafficTemplate`` makes:
#: the mark, then a 32-bit sequence number
TRAFFIC_MARK = b"IPCP"
IPV4_UDP_HEADERS = 28
MIN_TRAFFIC_SIZE = IPV4_UDP_HEADERS + len(TRAFFIC_MARK) + 4

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
UDP_HEADER = struct.Struct("!HHHH")
PROTO_UDP = 17


def fold(total: int) -> int:
    """``total`` folded into 16 bits with end-around carries (RFC 1071)."""
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes) -> int:
    """The 16-bit ones' complement sum of ``data`` (RFC 1071), not inverted."""
    if len(data) % 2:
        data += b"\0"
    return fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def inet_checksum(data: bytes) -> int:
    """The Internet checksum of ``data``: 0 over data that carries a correct one."""
    return ~ones_sum(data) & 0xFFFF


def pseudo_header4(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The IPv4 pseudo header of the UDP and TCP checksums (RFC 768, RFC 9293)."""
    return src + dst + struct.pack("!BBH", 0, proto, length)


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ident: int = 0,
                ttl: int = 64, frag: int = 0, options: bytes = b"",
                checksum: bool = True) -> bytes:
    """An IPv4 header (``options`` a multiple of 4 bytes) with its checksum
    (or 0 when ``checksum`` is False)."""
    ihl = 5 + len(options) // 4
    header = IPV4_HEADER.pack(0x40 | ihl, 0, ihl * 4 + payload_len, ident & 0xFFFF, frag, ttl,
                              proto, 0, src, dst) + options
    if not checksum:
        return header
    return header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]


def udp4_packet(src: str, dst: str, sport: int, dport: int, payload: bytes,
                ident: int = 0, ttl: int = 64) -> bytes:
    """An IPv4/UDP packet with correct header and UDP checksums (RFC 791, 768)."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp_len = 8 + len(payload)
    header = ipv4_header(s, d, PROTO_UDP, udp_len, ident=ident, ttl=ttl)
    udp = UDP_HEADER.pack(sport, dport, udp_len, 0) + payload
    csum = inet_checksum(pseudo_header4(s, d, PROTO_UDP, udp_len) + udp) or 0xFFFF  # 0: none
    return header + udp[:6] + struct.pack("!H", csum) + udp[8:]


class TrafficTemplate:
    """Packets of one flow: fixed addresses, ports and size; the sequence number
    in the payload changes, and the UDP checksum is updated incrementally
    (RFC 1624: the ones' complement sum is linear in the 16-bit words)."""

    def __init__(self, src: str, dst: str, sport: int, dport: int, size: int,
                 mark: bytes = TRAFFIC_MARK) -> None:
        if len(mark) != len(TRAFFIC_MARK):
            raise ValueError(f"the mark is {len(TRAFFIC_MARK)} bytes")
        if size < MIN_TRAFFIC_SIZE:
            raise ValueError(f"a traffic packet is at least {MIN_TRAFFIC_SIZE} bytes")
        payload = mark + bytes(4) + bytes(size - MIN_TRAFFIC_SIZE)
        base = udp4_packet(src, dst, sport, dport, payload)
        self.src, self.dst = src, dst
        self.mark = mark
        self._head = base[:26]
        self._tail = base[IPV4_UDP_HEADERS + 8:]
        # the ones' sum of pseudo header + UDP with checksum 0 and sequence 0
        self._base_sum = fold(~struct.unpack_from("!H", base, 26)[0] & 0xFFFF)

    def packet(self, seq: int) -> bytes:
        csum = ~fold(self._base_sum + (seq >> 16) + (seq & 0xFFFF)) & 0xFFFF
        return (self._head + struct.pack("!H", csum or 0xFFFF) + self.mark
                + struct.pack("!I", seq) + self._tail)


def swap_inner(packet: bytes) -> bytes | None:
    """The echo of an inner IPv4/UDP packet: addresses and ports swapped. Both
    checksums stay valid (ones' complement sums do not depend on word order).
    None for anything else."""
    if len(packet) < IPV4_UDP_HEADERS or packet[0] != 0x45 or packet[9] != PROTO_UDP:
        return None
    return (packet[:12] + packet[16:20] + packet[12:16] + packet[22:24] + packet[20:22]
            + packet[24:])
