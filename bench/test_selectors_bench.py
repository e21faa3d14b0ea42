"""The RFC 4301 §5.2 selector checks on the packet path, before and after, in
one run (pytest-benchmark).

Run: PYTHONPATH=$PWD .venv/bin/pytest -q bench/test_selectors_bench.py

- inbound: ``Member.handle_esp`` (decrypt + selector check) against
  ``legacy_handle_esp``, the same method without the check (its body before
  the check was added, kept here verbatim);
- outbound: ``Member.handle_inner`` (child chosen by addresses, protocol and
  ports) against ``legacy_handle_inner`` with ``LegacyRoutes``, the
  address-only lookup it replaced, both over 1000 children with /24 remote
  selectors (the packet's child among them);
- the check alone: a child's ``in_match`` on one IPv4/UDP packet (compiled
  unless IPSEC_CLUSTER_PURE_ESP=1).
Each timed call handles BATCH distinct packets; figures are the min of the
rounds divided by BATCH, in µs per packet, printed by the last test.
"""

from __future__ import annotations

import ipaddress
import os
from bisect import bisect_right
from collections.abc import Callable, Sequence

import pytest

from bench.harness.configs import single_child_config
from bench.harness.packets import udp4_packet
from bench.harness.timing import best_us_per_packet
from common.cluster.routing import InsideRoutes, inner_addresses
from common.cluster.wire import ChildPush
from common.config import load_config
from common.errors import IntegrityError, MalformedMessage, ReplayError, SequenceExhausted
from common.esp.replay import ReplayState
from common.esp.transforms import TRANSFORMS, OutboundSA
from common.ike.ts import TrafficSelector, ts_from_cidr
from member.worker import Address, Member

BATCH = 256
ROUNDS = 100
SIZES = (64, 1400)
CHILDREN = 1000
TRANSFORM = "aes128gcm16"
SPI_IN, SPI_OUT = 0x0101_0001, 0xC0C0_0001
PEER = ("198.18.0.1", 4500)
RESULTS: dict[tuple[int, str], float] = {}

CONFIG = single_child_config(psk="selectors-bench-psk-0123456789")


# -- the code before the checks (for the "before" figure) ------------------------------


def legacy_handle_esp(m: Member, data: bytes, spi: int, remote: Address,
                      now: float) -> bytes | None:
    route = m.by_spi.get(spi)
    if route is None:
        m.drops["esp_unknown_spi"] += 1
        return None
    try:
        inner = route.inbound.unprotect(data)
    except ReplayError:
        m.drops["esp_replay"] += 1
        return None
    except IntegrityError:
        m.drops["esp_integrity"] += 1
        return None
    except MalformedMessage:
        m.drops["esp_malformed"] += 1
        return None
    m.engine.note_activity(route.ike_id, now)
    if m.deferred and spi in m.deferred:
        m._activate(spi, m.deferred.pop(spi))
    return inner


class LegacyRoutes:
    """InsideRoutes' lookup as it was: addresses only (one version, no rebuild)."""

    def __init__(self, children: Sequence[tuple[int, TrafficSelector, TrafficSelector]]) -> None:
        spans = sorted((r.start_int, r.end_int, cid, loc) for cid, loc, r in children)
        self.starts = [s[0] for s in spans]
        self.ends = [s[1] for s in spans]
        self.cands = [((s[2], 1, ((4, s[3].start_int, s[3].end_int),)),) for s in spans]

    def lookup_child(self, packet: bytes) -> tuple[int, int] | None:
        version, src, dst = inner_addresses(packet)
        i = bisect_right(self.starts, dst) - 1
        if i < 0 or dst > self.ends[i]:
            return None
        for child_id, member, srcs in self.cands[i]:
            for v, lo, hi in srcs:
                if v == version and lo <= src <= hi:
                    return child_id, member
        return None


def legacy_handle_inner(m: Member, routes: LegacyRoutes,
                        packet: bytes) -> tuple[bytes, Address] | None:
    try:
        found = routes.lookup_child(packet)
    except MalformedMessage:
        m.drops["inner_malformed"] += 1
        return None
    route = m.by_spi.get(found[0]) if found is not None else None
    if route is None:
        m.drops["inner_no_route"] += 1
        return None
    try:
        return route.outbound.protect(packet), route.remote
    except SequenceExhausted:
        m.drops["esp_seq_exhausted"] += 1
        return None


# -- fixtures -----------------------------------------------------------------------------


def member_and_peer() -> tuple[Member, OutboundSA, list[tuple[int, TrafficSelector,
                                                              TrafficSelector]]]:
    """A member carrying the child 10.91.2.0/24 <-> 10.91.1.0/24 and 999 others
    (10.N.M.0/24 remote), and the peer's outbound SA of the first."""
    m = Member(load_config(CONFIG, "gw.toml"))
    size = TRANSFORMS[TRANSFORM].keymat_size
    km_in, km_out = os.urandom(size), os.urandom(size)
    local = ts_from_cidr("10.91.2.0/24")
    m.install_pushed(ChildPush(SPI_IN, 1, "net", SPI_IN, SPI_OUT, TRANSFORM, False, km_in,
                               km_out, (local,), (ts_from_cidr("10.91.1.0/24"),),
                               ipaddress.IPv4Address(PEER[0]).packed, PEER[1], bytes(8)))
    children = [(SPI_IN, local, ts_from_cidr("10.91.1.0/24"))]
    for i in range(1, CHILDREN):
        remote = ts_from_cidr(f"10.{100 + i // 256}.{i % 256}.0/24")
        m.routes.add(SPI_IN + i, [local], [remote], member=1)
        children.append((SPI_IN + i, local, remote))
    return m, OutboundSA(SPI_IN, TRANSFORM, km_in, sender_id=2), children


def packet(size: int, src: str = "10.91.1.1", dst: str = "10.91.2.1") -> bytes:
    return udp4_packet(src, dst, 40000, 7001, bytes(size - 28))


def run(benchmark: pytest.FixtureRequest, size: int, name: str, fn: Callable[[], object],
        setup: Callable[[], None] | None = None) -> None:
    RESULTS[(size, name)] = best_us_per_packet(benchmark, fn, rounds=ROUNDS, per_call=BATCH,
                                               setup=setup)


# -- the figures ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["before", "after"])
@pytest.mark.parametrize("size", SIZES)
def test_handle_esp(benchmark: pytest.FixtureRequest, size: int, variant: str) -> None:
    benchmark.group = f"selectors-in-{size}B"
    m, peer, _ = member_and_peer()
    inner = packet(size)
    packets = [peer.protect(inner) for _ in range(BATCH)]
    fresh = ReplayState(1024, 0, 1)
    inbound = m.by_spi[SPI_IN].inbound
    if variant == "after":
        handle = m.handle_esp

        def batch() -> None:
            for p in packets:
                handle(p, SPI_IN, PEER, 1.0)
    else:
        def batch() -> None:
            for p in packets:
                legacy_handle_esp(m, p, SPI_IN, PEER, 1.0)
    run(benchmark, size, f"handle_esp {variant}", batch,
        setup=lambda: inbound.import_window(fresh))
    assert not m.drops, m.drops


@pytest.mark.parametrize("variant", ["before", "after"])
@pytest.mark.parametrize("size", SIZES)
def test_handle_inner(benchmark: pytest.FixtureRequest, size: int, variant: str) -> None:
    benchmark.group = f"selectors-out-{size}B"
    m, _, children = member_and_peer()
    outbound = packet(size, "10.91.2.1", "10.91.1.1")
    if variant == "after":
        handle = m.handle_inner

        def batch() -> None:
            for _ in range(BATCH):
                handle(outbound)
    else:
        legacy = LegacyRoutes(children)

        def batch() -> None:
            for _ in range(BATCH):
                legacy_handle_inner(m, legacy, outbound)
    run(benchmark, size, f"handle_inner {variant}", batch)
    assert not m.drops, m.drops


def test_check_alone(benchmark: pytest.FixtureRequest) -> None:
    benchmark.group = "selectors-check"
    m, _, _ = member_and_peer()
    p, match = packet(64), m.by_spi[SPI_IN].in_match

    def batch() -> None:
        for _ in range(BATCH):
            match(p)
    run(benchmark, 64, "in_match", batch)


def test_routes_lookup_alone(benchmark: pytest.FixtureRequest) -> None:
    benchmark.group = "selectors-check"
    routes = InsideRoutes()
    _, _, children = member_and_peer()
    for cid, loc, rem in children:
        routes.add(cid, [loc], [rem], member=1)
    p = packet(64, "10.91.2.1", "10.91.1.1")
    lookup = routes.lookup_child

    def batch() -> None:
        for _ in range(BATCH):
            lookup(p)
    run(benchmark, 64, "InsideRoutes.lookup_child", batch)


def test_zz_print_table(capsys: pytest.CaptureFixture[str]) -> None:
    if len(RESULTS) < 4 * len(SIZES) + 2:
        pytest.skip("run the whole module to get the table")
    lines = ["| path | size | before µs | after µs | cost of the check µs |",
             "|---|---|---|---|---|"]
    for what in ("handle_esp", "handle_inner"):
        for size in SIZES:
            b, a = RESULTS[(size, f"{what} before")], RESULTS[(size, f"{what} after")]
            lines.append(f"| {what} | {size} | {b:.2f} | {a:.2f} | {a - b:+.2f} |")
    lines.append(f"| the check alone (ChildRoute.in_match) | 64 | | "
                 f"{RESULTS[(64, 'in_match')]:.2f} | |")
    lines.append(f"| InsideRoutes.lookup_child alone ({CHILDREN} children) | 64 | | "
                 f"{RESULTS[(64, 'InsideRoutes.lookup_child')]:.2f} | |")
    with capsys.disabled():
        print("\n\nSelector checks on the packet path (min of rounds, µs per packet)\n"
              + "\n".join(lines))
