"""Traffic selectors (RFC 7296 §3.13.1) and their narrowing (RFC 7296 §2.9).

Rules of this file:
- A selector is an inclusive address range, an inclusive port range and an IP
  protocol (0 = any). Ports of ICMP/ICMPv6 carry type << 8 | code (RFC 4301
  §4.4.1.3), which the caller computes; a packet without ports (ESP, a
  non-first fragment...) is matched with ``port=None``, which only a selector
  with the whole port range 0-65535 (or OPAQUE, start 65535 / end 0) accepts.
- The addresses are also kept as ints (``start_int``/``end_int``), computed once,
  so ``contains`` on the data path compares ints only.
- A range with start > end (from a misbehaving peer) is empty: it matches nothing
  and intersects with nothing; nothing here raises on it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from common.ike.constants import TsType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PORT_MIN = 0
PORT_MAX = 65535

#: Names for ``__str__``; other protocols print as their number.
_PROTOCOL_NAMES = {
    1: "icmp",
    6: "tcp",
    17: "udp",
    47: "gre",
    50: "esp",
    58: "ipv6-icmp",
    132: "sctp",
}
_VERSION_TS_TYPE = {4: TsType.TS_IPV4_ADDR_RANGE, 6: TsType.TS_IPV6_ADDR_RANGE}
_TS_TYPE_VERSION = {TsType.TS_IPV4_ADDR_RANGE: 4, TsType.TS_IPV6_ADDR_RANGE: 6}


@dataclass(slots=True, frozen=True)
class TrafficSelector:
    """One selector: an address range, a port range and an IP protocol (0 = any)."""

    ts_type: TsType
    ip_protocol: int
    start_port: int
    end_port: int
    start_addr: IPAddress
    end_addr: IPAddress
    # Derived once for the data path; not part of the value.
    start_int: int = field(init=False, repr=False, compare=False)
    end_int: int = field(init=False, repr=False, compare=False)
    any_port: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_int", int(self.start_addr))
        object.__setattr__(self, "end_int", int(self.end_addr))
        whole = self.start_port == PORT_MIN and self.end_port == PORT_MAX
        opaque = self.start_port == PORT_MAX and self.end_port == PORT_MIN
        object.__setattr__(self, "any_port", whole or opaque)

    @property
    def version(self) -> int:
        return _TS_TYPE_VERSION.get(self.ts_type, self.start_addr.version)

    def __str__(self) -> str:
        cidrs = to_cidrs(self)
        if len(cidrs) == 1:
            text = str(cidrs[0])
        else:
            text = f"{self.start_addr}-{self.end_addr}"
        if self.ip_protocol == 0 and self.any_port:
            return text
        proto = _PROTOCOL_NAMES.get(self.ip_protocol, str(self.ip_protocol))
        if self.ip_protocol == 0:
            proto = "any"
        if self.any_port:
            return f"{text}[{proto}]"
        if self.start_port == self.end_port:
            return f"{text}[{proto}/{self.start_port}]"
        return f"{text}[{proto}/{self.start_port}-{self.end_port}]"


def ts_from_range(
    start: IPAddress | str,
    end: IPAddress | str,
    protocol: int = 0,
    ports: tuple[int, int] = (PORT_MIN, PORT_MAX),
) -> TrafficSelector:
    """A selector from two addresses of the same family; ValueError otherwise."""
    first = ipaddress.ip_address(start)
    last = ipaddress.ip_address(end)
    if first.version != last.version:
        raise ValueError(f"selector {first}-{last} mixes IPv4 and IPv6")
    _check(protocol, ports)
    return TrafficSelector(
        _VERSION_TS_TYPE[first.version], protocol, ports[0], ports[1], first, last
    )


def ts_from_cidr(
    cidr: str | IPNetwork,
    protocol: int = 0,
    ports: tuple[int, int] = (PORT_MIN, PORT_MAX),
) -> TrafficSelector:
    """A selector covering a network, e.g. "10.1.0.0/24" or "2001:db8::/64".
    Host bits are dropped ("10.1.0.5/24" is 10.1.0.0/24) and a bare address
    is a /32 or /128, as in strongSwan's ``local_ts``."""
    net = ipaddress.ip_network(cidr, strict=False)
    return ts_from_range(net.network_address, net.broadcast_address, protocol, ports)


def ts_any(version: int) -> TrafficSelector:
    """Every address of one family, every protocol and port: 0.0.0.0/0 or ::/0."""
    if version not in _VERSION_TS_TYPE:
        raise ValueError(f"IP version must be 4 or 6, not {version}")
    return ts_from_cidr("0.0.0.0/0" if version == 4 else "::/0")


def _check(protocol: int, ports: tuple[int, int]) -> None:
    if not 0 <= protocol <= 255:
        raise ValueError(f"IP protocol {protocol} out of 0-255")
    if not (PORT_MIN <= ports[0] <= PORT_MAX and PORT_MIN <= ports[1] <= PORT_MAX):
        raise ValueError(f"ports {ports} out of {PORT_MIN}-{PORT_MAX}")


def contains(ts: TrafficSelector, addr: IPAddress | bytes, protocol: int, port: int | None) -> bool:
    """Does a packet (one of its addresses, its protocol, that side's port)
    fall inside ``ts``? ``addr`` may be the 4 or 16 raw octets from the IP header."""
    if isinstance(addr, bytes):
        version = 4 if len(addr) == 4 else 6
        value = int.from_bytes(addr, "big")
    else:
        version = addr.version
        value = int(addr)
    if version != ts.version or not ts.start_int <= value <= ts.end_int:
        return False
    if ts.ip_protocol != 0 and ts.ip_protocol != protocol:
        return False
    if ts.any_port:
        return True
    return port is not None and ts.start_port <= port <= ts.end_port


def intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    """The selector both ``a`` and ``b`` allow, or None if they share nothing.
    OPAQUE ports are not intersected with ranges: they match only themselves
    or the whole range."""
    if a.version != b.version:
        return None
    if a.ip_protocol == 0:
        protocol = b.ip_protocol
    elif b.ip_protocol in (0, a.ip_protocol):
        protocol = a.ip_protocol
    else:
        return None
    start_port, end_port = max(a.start_port, b.start_port), min(a.end_port, b.end_port)
    if a.start_port > a.end_port or b.start_port > b.end_port:  # OPAQUE
        if (a.start_port, a.end_port) == (PORT_MIN, PORT_MAX):
            start_port, end_port = b.start_port, b.end_port
        elif (b.start_port, b.end_port) in ((PORT_MIN, PORT_MAX), (a.start_port, a.end_port)):
            start_port, end_port = a.start_port, a.end_port
        else:
            return None
    elif start_port > end_port:
        return None
    start, end = max(a.start_int, b.start_int), min(a.end_int, b.end_int)
    if start > end:
        return None
    address = ipaddress.IPv4Address if a.version == 4 else ipaddress.IPv6Address
    return TrafficSelector(a.ts_type, protocol, start_port, end_port, address(start), address(end))


def narrow(
    proposed: list[TrafficSelector], allowed: list[TrafficSelector]
) -> list[TrafficSelector]:
    """Responder narrowing (RFC 7296 §2.9): every non-empty intersection of a
    proposed selector with an allowed one, in proposed-then-allowed order,
    without duplicates. An empty list means TS_UNACCEPTABLE.

    This is the plain set narrowing; what to do with the initiator's first
    (packet-specific) selector is the exchange's decision.
    """
    result: list[TrafficSelector] = []
    for p in proposed:
        for a in allowed:
            common = intersect(p, a)
            if common is not None and common not in result:
                result.append(common)
    return result


def within(answer: list[TrafficSelector], offered: list[TrafficSelector]) -> bool:
    """Every selector of ``answer`` lies inside one of ``offered``: what an
    initiator checks in the responder's TSi/TSr (RFC 7296 §2.9: the responder
    may only narrow)."""
    return all(any(intersect(a, o) == a for o in offered) for a in answer)


def to_cidrs(ts: TrafficSelector) -> list[IPNetwork]:
    """The address range as the fewest CIDR blocks (for routes on the TUN device)."""
    if ts.start_int > ts.end_int:
        return []
    return list(ipaddress.summarize_address_range(ts.start_addr, ts.end_addr))
