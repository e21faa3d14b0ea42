"""The gateway's inside: where cleartext IP packets enter and leave.

Two kinds with one interface (``Inside``), so the gateway treats them alike:
- ``TunDevice`` (member/tun.py): a Linux TUN device, needs root.
- ``UdpInside``: root-less; each inner IP packet is the whole payload of one UDP
  datagram between our inside socket and the configured ``udp:HOST:PORT`` (the
  tests and the demo put a fake protected network there).

Rules of this file: ``datagram_received`` does no work beyond counting and the
callback; datagrams from any address other than the configured one are counted
drops (the inside is a trust boundary too); while the transport has paused
writing (its buffer is full), each write is a counted drop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

from common.config import InsideConfig
from member.tun import DEFAULT_MTU, TunDevice

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
OnPacket = Callable[[bytes], None]


@runtime_checkable
class Inside(Protocol):
    """What the gateway needs from its inside interface."""

    rx_packets: int
    tx_packets: int
    drops: int

    async def start(self, on_packet: OnPacket) -> None: ...

    def write(self, packet: bytes | bytearray | memoryview) -> bool: ...

    def close(self) -> None: ...


class UdpInside(asyncio.DatagramProtocol):
    """Inner packets as UDP payloads to/from ``peer``; our socket binds ``local``
    (port 0 = any free port; ``local_address`` tells which after ``start``)."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.peer_host = ipaddress.ip_address(peer[0])
        self.peer = (str(self.peer_host), peer[1])
        self.local = local
        self.rx_packets = 0
        self.tx_packets = 0
        self.drops = 0  # sends refused (buffer full, closed) and datagrams from strangers
        self.errors = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._on_packet: OnPacket | None = None
        self._paused = False  # the transport's buffer is above its high-water mark

    @property
    def local_address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("UdpInside not started")
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    async def start(self, on_packet: OnPacket) -> None:
        self._on_packet = on_packet
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=self.local)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own UDP transport does not subclass DatagramTransport (3.11)
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if addr[1] != self.peer[1] or _host(addr[0]) != self.peer_host:
            self.drops += 1
            return
        self.rx_packets += 1
        if self._on_packet is not None:
            self._on_packet(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable etc. for an earlier send: count, do not stop.
        self.errors += 1
        log.debug("inside socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        transport = self._transport
        if transport is None or self._paused:
            self.drops += 1
            return False
        transport.sendto(packet, self.peer)
        self.tx_packets += 1
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _host(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def make_inside(config: InsideConfig, *, address: str | None = None,
                routes: Sequence[IPNetwork] = (), mtu: int = DEFAULT_MTU) -> Inside:
    """The inside that ``cluster.inside`` asks for. ``address`` and ``routes``
    (the children's remote networks, routed in ``cluster.route_table``) only
    apply to a TUN device."""
    if config.kind == "tun":
        return TunDevice(config.name, address=address, routes=routes, mtu=mtu,
                         table=config.route_table, mark=config.route_mark)
    if config.host is None or config.bind_host is None:
        raise ValueError("a udp inside needs a host and a bind host (common/config.py sets both)")
    return UdpInside((str(config.host), config.port), (str(config.bind_host), config.bind_port))
