"""A UDP ``SO_REUSEPORT`` group steered by a classic BPF program.

Rules of this file (docs/routing.md "Kernel steering: the building blocks"):
- ``SteeringGroup.open`` binds one UDP socket per slot to the same address
  and port with ``SO_REUSEPORT``, in slot order: the kernel numbers the
  sockets of a group in bind order, so slot i is the index the program
  returns for it (common/cluster/steering.py). The dispatcher's socket is
  slot 0: a program the kernel aborts (a load past the end) returns 0.
- ``attach`` installs the program with ``SO_ATTACH_REUSEPORT_CBPF`` on the
  group (one program per group, replaced atomically on every new table
  epoch). A kernel that refuses raises ``SteeringUnavailable`` naming the
  reason, once, so the caller can fall back to the relay.
- Closing a socket of the group detaches it: the last socket takes its index
  and the packets queued on it are lost. The group is closed as a whole.
- The dispatcher (dispatcher/cluster.py) opens one group per UDP port
  when ``cluster.data_path`` is "kernel" and hands each member its socket at
  spawn; it holds every socket for its whole life, so a member's death or
  restart never changes the indexes or loses what is queued.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Collection

from common.cluster.segments import SegmentTable
from common.cluster.steering import Program, build_program

#: linux/asm-generic/socket.h; Python's socket module may lack it
SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
SO_MARK = getattr(socket, "SO_MARK", 36)
DISPATCHER_SLOT = 0

_FPROG = struct.Struct("@HP")  # struct sock_fprog: unsigned short len; struct sock_filter *


class SteeringUnavailable(OSError):
    """The kernel will not steer this group (the reason is in the message)."""


class SteeringGroup:
    """``1 + len(members)`` UDP sockets on one address and port: slot 0 the
    dispatcher's, then one per local member in the order given."""

    __slots__ = ("_epoch", "_program", "address", "members", "natt", "sockets")

    def __init__(self, sockets: list[socket.socket], members: tuple[int, ...],
                 address: tuple[str, int], natt: bool) -> None:
        self.sockets = sockets
        self.members = members
        self.address = address
        self.natt = natt
        self._program: Program | None = None
        self._epoch: int | None = None

    @classmethod
    def open(cls, host: str, port: int, members: tuple[int, ...] | list[int], *,
             natt: bool | None = None, mark: int | None = None,
             bufsize: int = 0) -> SteeringGroup:
        """Bind the group (``port`` 0: the first bind picks a free port, the
        others join it). ``natt``: RFC 3948 framing, default unless port 500;
        ``mark``: SO_MARK on every socket (our own IKE/ESP bypass the tunnel's
        table, member/routes.py); ``bufsize``: SO_RCVBUF and SO_SNDBUF."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socks: list[socket.socket] = []
        try:
            for _ in range(1 + len(members)):
                s = socket.socket(family, socket.SOCK_DGRAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if bufsize:
                    with contextlib.suppress(OSError):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
                if mark is not None:
                    s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                s.setblocking(False)
                s.bind((host, port))
                port = s.getsockname()[1]
        except OSError:
            for s in socks:
                s.close()
            raise
        return cls(socks, tuple(members), (host, port),
                   port != 500 if natt is None else natt)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def epoch(self) -> int | None:
        """The table epoch of the attached program (None: none attached)."""
        return self._epoch

    @property
    def program(self) -> Program | None:
        return self._program

    def slots(self) -> dict[int, int]:
        """member id -> socket index."""
        return {m: i + 1 for i, m in enumerate(self.members)}

    def socket_of(self, member: int | None) -> socket.socket:
        """A member's socket; None: the dispatcher's."""
        return self.sockets[DISPATCHER_SLOT if member is None else self.slots()[member]]

    def steer(self, table: SegmentTable, alive: Collection[int] | None = None) -> Program:
        """Build and attach the program for ``table`` (call again at each
        epoch); ``alive``: the members whose sockets are read (others'
        segments go to the dispatcher's socket; None: every member)."""
        slots = self.slots()
        if alive is not None:
            slots = {m: i for m, i in slots.items() if m in alive}
        program = build_program(table, slots, DISPATCHER_SLOT, natt=self.natt)
        self.attach(program)
        self._epoch = table.epoch
        return program

    def attach(self, program: Program) -> None:
        """``SO_ATTACH_REUSEPORT_CBPF``; ``SteeringUnavailable`` when refused."""
        attach_program(self.sockets[DISPATCHER_SLOT], program)
        self._program = program

    def close(self) -> None:
        for s in self.sockets:
            s.close()

    def __enter__(self) -> SteeringGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_program(sock: socket.socket, program: Program) -> None:
    """Attach ``program`` to the reuseport group of ``sock``."""
    filt = ctypes.create_string_buffer(program.packed())
    fprog = _FPROG.pack(len(program), ctypes.addressof(filt))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        reason = {
            errno.ENOPROTOOPT: "the kernel has no SO_ATTACH_REUSEPORT_CBPF",
            errno.EINVAL: "the kernel rejected the classic BPF program",
            errno.ENOMEM: "the program exceeds net.core.optmem_max",
            errno.EPERM: "not permitted",
        }.get(exc.errno or 0, os.strerror(exc.errno or 0))
        raise SteeringUnavailable(
            exc.errno, f"cannot steer UDP port {sock.getsockname()[1]} in the kernel: "
                       f"{reason} ({len(program)} instructions)") from exc
