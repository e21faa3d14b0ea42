"""A member's ESP work per packet against the same work in bursts, in one run
(pytest-benchmark).

Run: PYTHONPATH=$PWD .venv/bin/pytest -q -s bench/test_member_batch_bench.py

- inbound: BATCH calls of ``Member.handle_esp`` against one
  ``Member.handle_esp_batch`` of BATCH packets (decrypt, replay window,
  liveness, selector check);
- outbound: BATCH calls of ``Member.handle_inner`` against one
  ``Member.handle_inner_batch`` (child lookup, encrypt);
one child, AES-GCM-128, inner packets of 64 and 1400 bytes, whichever ESP
implementation SAs use by default (the compiled one when built). Each timed
call handles BATCH distinct packets; the inbound window is reset outside the
timed part before each round. Figures are the best round divided by BATCH,
in µs per packet; the last test prints them with the per-packet/batch ratio.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.harness.configs import single_child_config
from bench.harness.packets import udp4_packet
from bench.harness.timing import best_us_per_packet
from common.cluster.wire import ChildPush
from common.config import load_config
from common.esp.replay import ReplayState
from common.esp.transforms import FAST_PATH, TRANSFORMS, OutboundSA
from common.ike.ts import ts_from_cidr
from member.worker import Member

BATCH = 256
ROUNDS = 100
SIZES = (64, 1400)
TRANSFORM = "aes128gcm16"
SPI_IN, SPI_OUT = 0x0101_0001, 0xC0C0_0001
PEER = ("198.18.0.1", 4500)
RESULTS: dict[tuple[int, str], float] = {}   # (size, name) -> µs per packet

CONFIG = single_child_config(psk="member-batch-bench-psk-0123456789")


def member() -> tuple[Member, OutboundSA]:
    """A member carrying one child (10.91.2.0/24 here, 10.91.1.0/24 at the
    peer), and the peer's outbound SA towards it."""
    m = Member(load_config(CONFIG, "gw.toml"))
    size = TRANSFORMS[TRANSFORM].keymat_size
    km_in, km_out = os.urandom(size), os.urandom(size)
    assert m.install_pushed(ChildPush(
        SPI_IN, 1, "net", SPI_IN, SPI_OUT, TRANSFORM, False, km_in, km_out,
        (ts_from_cidr("10.91.2.0/24"),), (ts_from_cidr("10.91.1.0/24"),),
        ipaddress.IPv4Address(PEER[0]).packed, PEER[1], bytes(8))) is None
    return m, OutboundSA(SPI_IN, TRANSFORM, km_in, sender_id=2)


def inner(src: str, dst: str, size: int, n: int) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` bytes."""
    return udp4_packet(src, dst, 40000, 7001, os.urandom(size - 28), ident=n)


def run(benchmark: BenchmarkFixture, size: int, name: str, fn: Callable[[], object],
        setup: Callable[[], None] | None = None) -> None:
    RESULTS[(size, name)] = best_us_per_packet(benchmark, fn, rounds=ROUNDS, per_call=BATCH,
                                               setup=setup)


@pytest.mark.parametrize("path", ["per-packet", "batch"])
@pytest.mark.parametrize("size", SIZES)
def test_inbound(benchmark: BenchmarkFixture, size: int, path: str) -> None:
    benchmark.group = f"member-in-{size}B"
    m, peer = member()
    items = [(peer.protect(inner("10.91.1.1", "10.91.2.1", size, n)), SPI_IN, PEER)
             for n in range(BATCH)]
    route = m.by_spi[SPI_IN]
    fresh = ReplayState(m.replay_window, 0, 1)
    now = 1.0

    def per_packet() -> None:
        handle_esp = m.handle_esp
        for data, spi, remote in items:
            handle_esp(data, spi, remote, now)

    def batch() -> None:
        m.handle_esp_batch(items, now)

    run(benchmark, size, f"in {path}", per_packet if path == "per-packet" else batch,
        setup=lambda: route.inbound.import_window(fresh))
    # every round took every packet: none dropped, the window at the last one
    assert not m.drops
    assert route.inbound.window.highest == BATCH


@pytest.mark.parametrize("path", ["per-packet", "batch"])
@pytest.mark.parametrize("size", SIZES)
def test_outbound(benchmark: BenchmarkFixture, size: int, path: str) -> None:
    benchmark.group = f"member-out-{size}B"
    m, _ = member()
    packets = [inner("10.91.2.1", "10.91.1.1", size, n) for n in range(BATCH)]

    def per_packet() -> None:
        handle_inner = m.handle_inner
        for p in packets:
            handle_inner(p)

    def batch() -> None:
        m.handle_inner_batch(packets)

    run(benchmark, size, f"out {path}", per_packet if path == "per-packet" else batch)
    assert not m.drops
    assert m.by_spi[SPI_IN].outbound.packets % BATCH == 0 < m.by_spi[SPI_IN].outbound.packets


def table() -> str:
    impl = "compiled" if FAST_PATH else "pure Python"
    lines = [f"Member ESP, one child, {TRANSFORM}, {impl}, bursts of {BATCH} "
             "(best round, µs per packet)",
             "| direction | size | per packet µs | batch µs | per packet / batch |",
             "|---|---|---|---|---|"]
    for direction, label in (("in", "in (handle_esp)"), ("out", "out (handle_inner)")):
        for size in SIZES:
            one = RESULTS[(size, f"{direction} per-packet")]
            burst = RESULTS[(size, f"{direction} batch")]
            lines.append(f"| {label} | {size} | {one:.2f} | {burst:.2f} | {one / burst:.2f}x |")
    return "\n".join(lines)


def test_zz_print_table(capsys: pytest.CaptureFixture[str]) -> None:
    if len(RESULTS) < len(SIZES) * 4:
        pytest.skip("run the whole bench module to get the table")
    with capsys.disabled():
        print("\n\n" + table())
