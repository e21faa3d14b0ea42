"""Batched datagram I/O for the member's data path: one syscall per burst.

Four functions, all non-blocking (Linux only):

- ``recv_batch(fd, max_n, bufsize=65535) -> (items, truncated)``: one
  recvmmsg(2) of up to ``max_n`` datagrams from a UDP socket (AF_INET or
  AF_INET6). ``items`` is a list of ``(payload, ip, port)``, ``ip`` packed (4
  bytes from an AF_INET socket, 16 from an AF_INET6 one, v4-mapped senders
  included); ``truncated`` counts the datagrams longer than ``bufsize``, which
  are dropped (they took a place of the ``max_n``). Nothing queued:
  ``([], 0)``. An error before the first datagram: OSError (a later one is
  reported by the next call).
- ``send_batch(fd, datagrams) -> sent``: sendmmsg(2) of ``(payload, ip,
  port)`` items from a UDP socket, looping until all are sent or the socket
  would block (EAGAIN/ENOBUFS ends the burst); returns how many the kernel
  took, and the caller counts the rest as drops. A 4-byte ip on an AF_INET6
  socket goes out v4-mapped (``::ffff:a.b.c.d``); a 16-byte ip on an AF_INET
  socket is a ValueError. A datagram the kernel refuses on its own (too big,
  no route, port 0) is skipped and not counted, the burst goes on. Every
  item is checked before anything is sent (TypeError / ValueError).
- ``read_batch(fd, max_n, bufsize=65535) -> packets``: read(2) until EAGAIN,
  end of file or ``max_n`` packets, from an fd in non-blocking mode (a TUN
  device gives one packet per read; ValueError if the fd blocks). A packet
  longer than ``bufsize`` comes back cut to ``bufsize`` (read(2) cannot tell).
- ``write_raw_batch(fd4, fd6, packets) -> unsent``: decrypted inner packets
  into the host's IP stack through raw sockets opened as member/rawinside.py
  opens them (IPPROTO_RAW, IP_HDRINCL / IPV6_HDRINCL), one sendmmsg(2) per
  family, each packet to the destination in its own header. ``fd6`` -1: no
  IPv6 socket. Returns the indexes (ascending) of the packets NOT sent: too
  short for their header (or an IPv4 IHL beyond the packet), unknown
  version, IPv6 without ``fd6``, refused by the kernel, or left over when
  the socket would block; the caller hands those back another way.

Arguments: an fd is an int in 0..2**31-1 (ValueError otherwise; ``fd6`` may
be -1), ``max_n`` < 0 is a ValueError and above ``MAX_BATCH`` is clamped
(``max_n`` 0 returns at once without a syscall), ``bufsize`` < 0 (< 1 for
``read_batch``) is a ValueError and above ``MAX_BUFSIZE`` is clamped;
payloads and packets are C-contiguous buffers (TypeError). An fd the kernel
calls unusable (EBADF, ENOTSOCK, ...) is an OSError; a socket that is not
AF_INET/AF_INET6 is OSError(EAFNOSUPPORT).

``member._batch_io`` (member/_batch_io.c) is used when it was built; else
(or with IPSEC_CLUSTER_PURE_IO=1) the pure-Python twins below, which are
the reference: same results, same exception types, same order of checks,
one syscall per datagram.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, TypeAlias

from typing_extensions import Buffer

PURE_IO_ENV = "IPSEC_CLUSTER_PURE_IO"   # "1": use the pure-Python functions only
MAX_BATCH = 1024       # UIO_MAXIOV: the kernel caps a recvmmsg/sendmmsg there
MAX_BUFSIZE = 65535    # no IP packet (and no UDP payload) is larger
_IPV4_HEADER = 20
_IPV6_HEADER = 40

Datagram: TypeAlias = tuple[bytes, bytes, int]
"""A received datagram: payload, the peer's packed IP (4 or 16 bytes), its port."""
RecvResult: TypeAlias = tuple[list[Datagram], int]

#: errors that make the socket itself unusable: raised, never counted per datagram
_UNUSABLE = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EFAULT, errno.EOPNOTSUPP,
                       errno.EDESTADDRREQ, errno.ENOTCONN, errno.EPIPE})
_WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})


# -- argument checks (the same rules, in the same order, as member/_batch_io.c) --------


def _int(value: object, name: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _fd(value: object, name: str = "fd", allow_none: bool = False) -> int:
    fd = _int(value, name)
    if allow_none and fd == -1:
        return -1
    if not 0 <= fd <= 0x7FFF_FFFF:
        raise ValueError(f"{name} {fd} is not a file descriptor")
    return fd


def _count(value: object) -> int:
    n = _int(value, "max_n")
    if n < 0:
        raise ValueError(f"max_n {n} is negative")
    return min(n, MAX_BATCH)


def _bufsize(value: object, lo: int) -> int:
    size = _int(value, "bufsize")
    if size < lo:
        raise ValueError(f"bufsize {size} is below {lo}")
    return min(size, MAX_BUFSIZE)


def _view(obj: object, what: str, i: int) -> memoryview:
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} {i} is not a contiguous buffer "
                        f"({type(obj).__name__})") from None
    if not view.c_contiguous:
        raise TypeError(f"{what} {i} is not a contiguous buffer ({type(obj).__name__})")
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def _socket(fd: int) -> socket.socket:
    """A socket object on ``fd`` (the caller detaches it: the fd stays the caller's)."""
    return socket.socket(fileno=fd)


def _no_inet() -> OSError:
    return OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))


# -- the pure-Python twins -----------------------------------------------------------


def py_recv_batch(fd: int, max_n: int, bufsize: int = MAX_BUFSIZE) -> RecvResult:
    """``recv_batch`` with one recvmsg(2) per datagram."""
    fd, n, size = _fd(fd), _count(max_n), _bufsize(bufsize, 0)
    items: list[Datagram] = []
    truncated = 0
    if n == 0:
        return items, 0
    sock = _socket(fd)
    try:
        foreign = sock.family not in (socket.AF_INET, socket.AF_INET6)
        for i in range(n):
            try:
                data, _, flags, addr = sock.recvmsg(size, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if i == 0:
                    raise
                break
            if flags & socket.MSG_TRUNC:
                truncated += 1
                continue
            if foreign or not isinstance(addr, tuple):
                raise _no_inet()
            host = addr[0].split("%", 1)[0]
            items.append((data, socket.inet_pton(sock.family, host), addr[1]))
    finally:
        sock.detach()
    return items, truncated


def _check_datagrams(datagrams: Iterable[tuple[Buffer, bytes, int]]
                     ) -> list[tuple[memoryview, bytes, int]]:
    checked = []
    for i, item in enumerate(tuple(datagrams)):
        if not isinstance(item, tuple) or len(item) != 3:
            raise TypeError(f"datagram {i} is not a (payload, ip, port) tuple")
        payload, ip, port = item
        view = _view(payload, "datagram", i)
        if not isinstance(ip, bytes):
            raise TypeError(f"datagram {i}: the ip must be bytes")
        if len(ip) not in (4, 16):
            raise ValueError(f"datagram {i}: the ip is {len(ip)} bytes, not 4 or 16")
        port = _int(port, "port")
        if not 0 <= port <= 65535:
            raise ValueError(f"datagram {i}: port {port} out of range")
        checked.append((view, ip, port))
    return checked


def py_send_batch(fd: int, datagrams: Sequence[tuple[Buffer, bytes, int]]) -> int:
    """``send_batch`` with one sendto(2) per datagram."""
    fd = _fd(fd)
    checked = _check_datagrams(datagrams)
    if not checked:
        return 0
    sock = _socket(fd)
    try:
        family = sock.family
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise _no_inet()
        if family == socket.AF_INET:
            for i, (_, ip, _) in enumerate(checked):
                if len(ip) != 4:
                    raise ValueError(f"datagram {i}: a 16-byte ip on an AF_INET socket")
        sent = 0
        for view, ip, port in checked:
            if family == socket.AF_INET6 and len(ip) == 4:
                ip = b"\0" * 10 + b"\xff\xff" + ip        # ::ffff:a.b.c.d
            try:
                sock.sendto(view, socket.MSG_DONTWAIT, (socket.inet_ntop(family, ip), port))
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:
                    break
                if exc.errno in _UNUSABLE:
                    raise
                continue    # this datagram's own error (too big, no route...): skipped
            sent += 1
        return sent
    finally:
        sock.detach()


def py_read_batch(fd: int, max_n: int, bufsize: int = MAX_BUFSIZE) -> list[bytes]:
    """``read_batch`` with os.read."""
    fd, n, size = _fd(fd), _count(max_n), _bufsize(bufsize, 1)
    packets: list[bytes] = []
    if n == 0:
        return packets
    if os.get_blocking(fd):
        raise ValueError(f"fd {fd} is in blocking mode")
    while len(packets) < n:
        try:
            packet = os.read(fd, size)
        except BlockingIOError:
            break
        except OSError:
            if not packets:
                raise
            break
        if not packet:
            break       # end of file
        packets.append(packet)
    return packets


def _raw_family(data: memoryview, have_v6: bool) -> int:
    """4 or 6 if the packet can go out through that family's raw socket, else 0."""
    if len(data) >= _IPV4_HEADER and data[0] >> 4 == 4:
        return 4 if _IPV4_HEADER <= (data[0] & 0x0F) * 4 <= len(data) else 0
    if have_v6 and len(data) >= _IPV6_HEADER and data[0] >> 4 == 6:
        return 6
    return 0


def _raw_send(fd: int, family: socket.AddressFamily, views: list[memoryview],
              indexes: list[int], unsent: set[int]) -> None:
    sock = _socket(fd)
    try:
        for k, i in enumerate(indexes):
            dst = bytes(views[i][16:20] if family == socket.AF_INET else views[i][24:40])
            try:
                sock.sendto(views[i], socket.MSG_DONTWAIT, (socket.inet_ntop(family, dst), 0))
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:
                    unsent.update(indexes[k:])
                    return
                if exc.errno in _UNUSABLE:
                    raise
                unsent.add(i)       # this packet's own error (too big, no route...)
    finally:
        sock.detach()


def py_write_raw_batch(fd4: int, fd6: int, packets: Sequence[Buffer]) -> list[int]:
    """``write_raw_batch`` with one sendto(2) per packet."""
    fd4, fd6 = _fd(fd4, "fd4"), _fd(fd6, "fd6", allow_none=True)
    views = [_view(p, "packet", i) for i, p in enumerate(tuple(packets))]
    v4: list[int] = []
    v6: list[int] = []
    unsent: set[int] = set()
    for i, view in enumerate(views):
        kind = _raw_family(view, fd6 >= 0)
        if kind == 4:
            v4.append(i)
        elif kind == 6:
            v6.append(i)
        else:
            unsent.add(i)
    if v4:
        _raw_send(fd4, socket.AF_INET, views, v4, unsent)
    if v6:
        _raw_send(fd6, socket.AF_INET6, views, v6, unsent)
    return sorted(unsent)


# -- the implementation the product uses ----------------------------------------------


class Impl(NamedTuple):
    """One implementation of the four functions."""

    name: str
    recv_batch: Callable[..., RecvResult]
    send_batch: Callable[[int, Sequence[tuple[Buffer, bytes, int]]], int]
    read_batch: Callable[..., list[bytes]]
    write_raw_batch: Callable[[int, int, Sequence[Buffer]], list[int]]


PYTHON = Impl("python", py_recv_batch, py_send_batch, py_read_batch, py_write_raw_batch)


def _load_compiled() -> Impl | None:
    """The compiled functions, unless they were not built or are switched off."""
    if os.environ.get(PURE_IO_ENV) == "1":
        return None
    try:
        from member import _batch_io
    except ImportError:   # no compiler at install time
        return None
    return Impl("c", _batch_io.recv_batch, _batch_io.send_batch, _batch_io.read_batch,
                _batch_io.write_raw_batch)


#: the compiled functions when built, else None
COMPILED = _load_compiled()
_impl = COMPILED or PYTHON
#: True when the functions below are the compiled ones
FAST_PATH = COMPILED is not None

recv_batch = _impl.recv_batch
send_batch = _impl.send_batch
read_batch = _impl.read_batch
write_raw_batch = _impl.write_raw_batch

__all__ = [
    "COMPILED",
    "FAST_PATH",
    "MAX_BATCH",
    "MAX_BUFSIZE",
    "PURE_IO_ENV",
    "PYTHON",
    "Datagram",
    "Impl",
    "RecvResult",
    "py_read_batch",
    "py_recv_batch",
    "py_send_batch",
    "py_write_raw_batch",
    "read_batch",
    "recv_batch",
    "send_batch",
    "write_raw_batch",
]
