"""Sockets for the harness: free UDP ports on loopback addresses, and a socket
made inside a network namespace."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def free_udp_ports(count: int, hosts: tuple[str, ...]) -> list[int]:
    """``count`` distinct UDP ports that are free on every one of ``hosts``
    right now (the kernel picks them; checked on all hosts)."""
    ports: list[int] = []
    holders: list[socket.socket] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            holders.append(s)
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
            ok = True
            for h in hosts[1:]:
                t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                holders.append(t)
                try:
                    t.bind((h, port))
                except OSError:
                    ok = False
                    break
            if ok and port not in ports:
                ports.append(port)
    finally:
        for s in holders:
            s.close()
    return ports


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` run on a thread that entered network namespace ``ns``
    (setns(2) changes only the calling thread): a socket it makes lives
    there, a ZeroMQ context it makes starts its I/O threads there."""
    result: list[T | BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def socket_in_netns(ns: str | None, family: int = socket.AF_INET,
                    kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket living in network namespace ``ns`` (None: ours)."""
    if ns is None:
        return socket.socket(family, kind)
    return in_netns(ns, lambda: socket.socket(family, kind))
