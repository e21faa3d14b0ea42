"""Per-member TUN devices: cleartext reaches the member that carries its child
through the kernel, not through the dispatcher (docs/routing.md "Host routes").

With a TUN inside and members started by the supervisor on its host, the
dispatcher creates one TUN device per member id at start (``MemberTuns``),
brings it up with the inside's MTU and holds it open for its whole life: a
member's death or restart does not remove the device, the routes through it
or the packets queued on it. Each incarnation of member N gets the same
device's fd at spawn (``pass_fds``, ``--tun-fd``) and reads it
(``TunReader``); the cluster's table routes each child's remote prefixes to
its member's device (common/cluster/routing.py ``kernel_routes``,
member/routes.py ``KernelRoutes``). While a member id has no live
incarnation, the dispatcher reads that device itself and relays what it
reads on its userspace path, so nothing queued is lost.

Rules of this file: reads never block (the fds are non-blocking; both the
dispatcher and the member hold the same open file); at most ``max_n``
packets per wake-up, so other fds get their turn; a read error other than
EAGAIN is counted and stops that reader (never a loop spinning on a dead fd).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from member.batch_io import read_batch
from member.tun import IFNAMSIZ, READ_SIZE, TunError, configure, open_tun

log = logging.getLogger("ipsec_cluster.tuns")

#: packets read per wake-up of a reader
TUN_BURST = 256

OnPackets = Callable[[list[bytes]], None]


def read_packets(fd: int, max_n: int = TUN_BURST) -> list[bytes]:
    """Up to ``max_n`` packets from a non-blocking TUN fd, until EAGAIN: one
    compiled call (member/batch_io.py ``read_batch``)."""
    return read_batch(fd, max_n, READ_SIZE)


def member_tun_name(base: str, member_id: int) -> str:
    """The device of member ``member_id``: the dispatcher's TUN name + ``m`` +
    the id, the base cut so that the whole fits IFNAMSIZ."""
    suffix = f"m{member_id}"
    return base[:IFNAMSIZ - 1 - len(suffix)] + suffix


def _exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


class TunReader:
    """``on_packets(batch)`` for what arrives on ``fd``, from the event loop."""

    def __init__(self, fd: int, on_packets: OnPackets, *, name: str = "tun",
                 max_n: int = TUN_BURST) -> None:
        self.fd = fd
        self.name = name
        self.max_n = max_n
        self.on_packets = on_packets
        self.rx_packets = 0
        self.rx_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def reading(self) -> bool:
        return self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self.fd, self._readable)

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.fd)
            self._loop = None

    def _readable(self) -> None:
        try:
            packets = read_packets(self.fd, self.max_n)
        except OSError as exc:
            self.rx_errors += 1
            log.warning("reading %s failed: %s; not reading it any more", self.name, exc)
            self.stop()
            return
        if packets:
            self.rx_packets += len(packets)
            self.on_packets(packets)


class MemberTuns:
    """The dispatcher's per-member TUN devices, one per member id
    ``1..members``, named from the dispatcher's own TUN ``base``."""

    def __init__(self, base: str, members: int, mtu: int) -> None:
        self.base = base
        self.members = members
        self.mtu = mtu
        #: member id -> (fd, device name)
        self.devices: dict[int, tuple[int, str]] = {}
        #: member id -> the dispatcher's reader of that device (while the id is dead)
        self.readers: dict[int, TunReader] = {}

    def names(self) -> dict[int, str]:
        return {m: member_tun_name(self.base, m) for m in range(1, self.members + 1)}

    def open(self) -> None:
        """Create and bring up every device; ``TunError`` (nothing left open)
        when a name is taken or a device cannot be made."""
        names = self.names()
        taken = [n for n in names.values() if n == self.base or _exists(n)]
        if len(set(names.values())) != len(names) or taken:
            raise TunError(f"per-member TUN names not free: {', '.join(taken) or 'clash'}")
        try:
            for member_id, name in names.items():
                fd, actual = open_tun(name)
                self.devices[member_id] = (fd, actual)
                configure(actual, None, self.mtu)
        except BaseException:
            self.close()
            raise

    def fd(self, member_id: int) -> int | None:
        dev = self.devices.get(member_id)
        return None if dev is None else dev[0]

    def device(self, member_id: int) -> str | None:
        dev = self.devices.get(member_id)
        return None if dev is None else dev[1]

    def device_names(self) -> set[str]:
        return {name for _, name in self.devices.values()}

    def read_while_dead(self, alive: Callable[[int], bool], loop: asyncio.AbstractEventLoop,
                        on_packets: OnPackets) -> None:
        """Read the device of every member id without a live incarnation;
        stop reading those whose member is alive again (it reads them)."""
        for member_id, (fd, name) in self.devices.items():
            reader = self.readers.get(member_id)
            if alive(member_id):
                if reader is not None and reader.reading:
                    reader.stop()
            else:
                if reader is None:
                    reader = self.readers[member_id] = TunReader(fd, on_packets, name=name)
                reader.start(loop)

    def relayed(self) -> int:
        """Packets the dispatcher read from members' devices."""
        return sum(r.rx_packets for r in self.readers.values())

    def close(self) -> None:
        """Stop reading and close every device (the kernel removes each, with
        its routes, once no member holds it either)."""
        for reader in self.readers.values():
            reader.stop()
        self.readers.clear()
        for fd, _name in self.devices.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.devices.clear()
