"""The inside interface as a Linux TUN device (no external packages).

Rules of this file:
- ``open_tun`` and ``configure`` are plain functions (ioctl, then ``ip``); the
  ``TunDevice`` class adds the asyncio shell: one ``loop.add_reader`` callback
  that drains the device, and a ``write`` that never blocks (a full queue is a
  counted drop, as for every other queue in the dispatcher).
- IFF_NO_PI: each read is exactly one IP packet (v4 or v6, told apart by the
  version nibble), each write must be exactly one.
- The routes into the device live in the cluster's own routing table with our
  own rules (member/routes.py), never in the main table; ``close`` removes
  exactly what ``open`` added. Closing the (non-persistent) device makes the
  kernel drop it, its addresses and every route through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
import subprocess
from collections.abc import Callable, Sequence

from common.errors import StartupError
from member.routes import DEFAULT_MARK, DEFAULT_TABLE, PolicyRoutes

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), linux/if_tun.h
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name, ifr_flags, union padding
DEFAULT_MTU = 1400
READ_SIZE = 65536  # larger than any IP packet the device can hold
READ_BATCH = 64  # packets per readable callback, so other fds get their turn
IP_TIMEOUT_S = 10.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
OnPacket = Callable[[bytes], None]


class TunError(OSError):
    """Opening or configuring the TUN device failed (message says which step)."""


def open_tun(name: str = "ipsc%d") -> tuple[int, str]:
    """Create TUN device ``name`` (``%d`` lets the kernel number it); returns the
    non-blocking fd and the device's actual name. Needs CAP_NET_ADMIN."""
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ:
        raise TunError(f"TUN name must be 1..{IFNAMSIZ - 1} bytes, got {name!r}")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from exc
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, IFF_TUN | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise TunError(exc.errno, f"TUNSETIFF {name!r} failed: {exc.strerror}") from exc
    actual = _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
    return fd, actual


def _ip(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True,
                          timeout=IP_TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise TunError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def configure(name: str, address: str | None, mtu: int = DEFAULT_MTU) -> None:
    """Bring ``name`` up with ``mtu`` and put ``address`` on it (``"10.91.2.1"``
    is a /32, ``"10.91.2.1/24"`` as given)."""
    _ip("link", "set", "dev", name, "mtu", str(mtu), "up")
    if address:
        iface = ipaddress.ip_interface(address)
        extra = ["nodad"] if iface.version == 6 else []  # usable at once (RFC 4862 §5.4)
        _ip("addr", "replace", str(iface), "dev", name, *extra)


class TunDevice:
    """A TUN device as the gateway's inside: ``start(on_packet)`` calls
    ``on_packet(packet)`` for each IP packet the kernel routes into it,
    ``write(packet)`` hands a packet to the kernel. Same interface as
    ``member.inside.UdpInside`` (the ``Inside`` protocol)."""

    def __init__(self, name: str = "ipsc%d", *, address: str | None = None,
                 routes: Sequence[IPNetwork] = (), mtu: int = DEFAULT_MTU,
                 table: int = DEFAULT_TABLE, mark: int = DEFAULT_MARK) -> None:
        self.name = name
        self.table = table
        self.mark = mark
        self.address = address
        self.routes = list(routes)
        self.mtu = mtu
        self.fd = -1
        self.rx_packets = 0
        self.tx_packets = 0
        self.drops = 0  # writes refused: queue full (EAGAIN) or the kernel rejected the packet
        self.rx_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packet: OnPacket | None = None
        self._policy: PolicyRoutes | None = None

    def open(self) -> None:
        """Create and configure the device (idempotent); ``start`` calls it."""
        if self.fd >= 0:
            return
        try:
            self.fd, self.name = open_tun(self.name)
        except TunError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise StartupError(
                    f"cannot create the TUN device {self.name!r}: {exc.strerror}: a TUN "
                    "inside needs root or CAP_NET_ADMIN (or use inside = \"udp:HOST:PORT\", "
                    "docs/config.md)") from None
            raise StartupError(f"cannot create the TUN device {self.name!r}: {exc} "
                               "(is /dev/net/tun there? modprobe tun)") from None
        try:
            configure(self.name, self.address, self.mtu)
            policy = PolicyRoutes(self.name, self.table, self.mark)
            policy.install(self.routes)
        except BaseException:
            self.close()
            raise
        self._policy = policy

    async def start(self, on_packet: OnPacket) -> None:
        self.open()
        self._on_packet = on_packet
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        on_packet = self._on_packet
        for _ in range(READ_BATCH):
            try:
                packet = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. the device went away; keep the loop alive
                self.rx_errors += 1
                log.warning("reading %s failed: %s", self.name, exc)
                return
            if not packet:
                return
            self.rx_packets += 1
            if on_packet is not None:
                on_packet(packet)

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Hand one IP packet to the kernel; False (and a counted drop) if the
        device queue is full or the kernel refused the packet."""
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            self.drops += 1
            return False
        except OSError as exc:  # EINVAL for a malformed packet, EIO when down
            self.drops += 1
            log.debug("write to %s refused: %s", self.name, exc)
            return False
        self.tx_packets += 1
        return True

    def close(self) -> None:
        """Stop reading, delete our routes and close the device (idempotent)."""
        if self.fd < 0:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.fd)
            self._loop = None
        if self._policy is not None:
            self._policy.remove(self.routes)
            self._policy = None
        os.close(self.fd)
        self.fd = -1
