"""Type stub of the compiled batched datagram I/O (member/_batch_io.c).

member/batch_io.py documents the four functions and holds their pure-Python
twins (the reference); import that module, not this one.
"""

from collections.abc import Sequence

from typing_extensions import Buffer

MAX_BATCH: int
MAX_BUFSIZE: int

def recv_batch(fd: int, max_n: int, bufsize: int = 65535
               ) -> tuple[list[tuple[bytes, bytes, int]], int]:
    """One recvmmsg(2): ``([(payload, ip, port)], truncated)``."""

def send_batch(fd: int, datagrams: Sequence[tuple[Buffer, bytes, int]]) -> int:
    """sendmmsg(2) until all are sent or the socket would block: how many were sent."""

def read_batch(fd: int, max_n: int, bufsize: int = 65535) -> list[bytes]:
    """read(2) on a non-blocking fd until EAGAIN, end of file or ``max_n`` packets."""

def write_raw_batch(fd4: int, fd6: int, packets: Sequence[Buffer]) -> list[int]:
    """One sendmmsg(2) per family through raw sockets: the indexes of the packets not sent."""
