"""Batched socket I/O (member/batch_io.py) against one syscall per datagram,
in one run (pytest-benchmark).

Run: PYTHONPATH=$PWD .venv/bin/pytest -q -s bench/test_batch_io_bench.py

Over UDP on 127.0.0.1, for 64 and 1400-byte payloads, BATCH datagrams per
timed call:
- receive: ``recv_batch(fd, BATCH, 2048)`` (one recvmmsg) against a loop of
  ``sock.recvfrom(2048)``; before each round (untimed) the sender queues
  BATCH datagrams at the receiver;
- send: ``send_batch(fd, BATCH datagrams)`` (sendmmsg) against a loop of
  ``sock.sendto``; before each round (untimed) the receiver is drained.
The batch calls are timed for the compiled module and for its pure-Python
twin. Figures: the best round divided by BATCH, µs per datagram; the last
test prints them with the per-datagram/batch ratio.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.harness.timing import best_us_per_packet
from member import batch_io
from member.batch_io import Impl

BATCH = 64
ROUNDS = 200
SIZES = (64, 1400)
BUFSIZE = 2048
IMPLS = ("c", "python")
RESULTS: dict[tuple[int, str], float] = {}   # (size, name) -> µs per datagram
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def impl_named(name: str) -> Impl:
    if name == "python":
        return batch_io.PYTHON
    if batch_io.COMPILED is None:
        pytest.skip("member._batch_io is not built (or IPSEC_CLUSTER_PURE_IO=1)")
    return batch_io.COMPILED


class Link:
    """A sender and a non-blocking receiver on 127.0.0.1 with room for a burst."""

    def __init__(self) -> None:
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):   # root: past rmem_max
            self.rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.rx.bind(("127.0.0.1", 0))
        self.rx.setblocking(False)
        self.tx.setblocking(False)
        self.addr = self.rx.getsockname()
        self.ip = socket.inet_aton("127.0.0.1")

    def fill(self, size: int) -> None:
        payload = bytes(size)
        for _ in range(BATCH):
            self.tx.sendto(payload, self.addr)

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.rx.recv(BUFSIZE)
            except BlockingIOError:
                return n
            n += 1

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


@pytest.fixture
def link() -> Iterator[Link]:
    lk = Link()
    yield lk
    lk.close()


def run(benchmark: BenchmarkFixture, size: int, name: str, fn: Callable[[], object],
        setup: Callable[[], object]) -> None:
    def before() -> None:
        setup()
    RESULTS[(size, name)] = best_us_per_packet(benchmark, fn, rounds=ROUNDS, per_call=BATCH,
                                               setup=before)


@pytest.mark.parametrize("size", SIZES)
def test_recvfrom_loop(benchmark: BenchmarkFixture, link: Link, size: int) -> None:
    benchmark.group = f"batch-io-recv-{size}B"
    recvfrom = link.rx.recvfrom
    got: list[int] = []

    def loop() -> None:
        n = 0
        for _ in range(BATCH):
            try:
                recvfrom(BUFSIZE)
            except BlockingIOError:
                break
            n += 1
        got.append(n)
    run(benchmark, size, "recvfrom loop", loop, setup=lambda: link.fill(size))
    assert got[-1] == BATCH


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_recv_batch(benchmark: BenchmarkFixture, link: Link, size: int,
                    impl: str) -> None:
    benchmark.group = f"batch-io-recv-{size}B"
    recv_batch, fd = impl_named(impl).recv_batch, link.rx.fileno()
    got: list[int] = []

    def batch() -> None:
        items, truncated = recv_batch(fd, BATCH, BUFSIZE)
        got.append(len(items) + truncated)
    run(benchmark, size, f"recv_batch {impl}", batch, setup=lambda: link.fill(size))
    assert got[-1] == BATCH


@pytest.mark.parametrize("size", SIZES)
def test_sendto_loop(benchmark: BenchmarkFixture, link: Link, size: int) -> None:
    benchmark.group = f"batch-io-send-{size}B"
    sendto, payload, addr = link.tx.sendto, os.urandom(size), link.addr

    def loop() -> None:
        for _ in range(BATCH):
            sendto(payload, addr)
    run(benchmark, size, "sendto loop", loop, setup=link.drain)
    assert link.drain() == BATCH


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_send_batch(benchmark: BenchmarkFixture, link: Link, size: int,
                    impl: str) -> None:
    benchmark.group = f"batch-io-send-{size}B"
    send_batch, fd = impl_named(impl).send_batch, link.tx.fileno()
    datagrams = [(os.urandom(size), link.ip, link.addr[1])] * BATCH
    sent: list[int] = []

    def batch() -> None:
        sent.append(send_batch(fd, datagrams))
    run(benchmark, size, f"send_batch {impl}", batch, setup=link.drain)
    assert sent[-1] == BATCH
    assert link.drain() == BATCH


def ratio_table() -> str:
    lines = ["| size | per-datagram loop µs | recv_batch c µs | x | recv_batch python µs "
             "| per-datagram loop µs | send_batch c µs | x | send_batch python µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        r0, s0 = RESULTS[(size, "recvfrom loop")], RESULTS[(size, "sendto loop")]
        rc, sc = RESULTS.get((size, "recv_batch c")), RESULTS.get((size, "send_batch c"))
        rp, sp = RESULTS[(size, "recv_batch python")], RESULTS[(size, "send_batch python")]
        rcx = f"{rc:.2f} | {r0 / rc:.2f}x" if rc else "- | -"
        scx = f"{sc:.2f} | {s0 / sc:.2f}x" if sc else "- | -"
        lines.append(f"| {size} | recvfrom {r0:.2f} | {rcx} | {rp:.2f} "
                     f"| sendto {s0:.2f} | {scx} | {sp:.2f} |")
    return "\n".join(lines)


def test_zz_print_ratio_table(capsys: pytest.CaptureFixture[str]) -> None:
    needed = [(s, n) for s in SIZES for n in ("recvfrom loop", "sendto loop",
                                              "recv_batch python", "send_batch python")]
    if any(k not in RESULTS for k in needed):
        pytest.skip("run the whole bench module to get the ratio table")
    with capsys.disabled():
        print(f"\n\nBatched socket I/O, UDP on 127.0.0.1, {BATCH} datagrams per call "
              "(min of rounds, µs per datagram; x = loop / batch)\n" + ratio_table())
