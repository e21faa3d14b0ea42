"""The shared routing function and the inside routes (common/cluster/routing.py)."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from common.cluster.routing import (
    InsideRoutes,
    PortKind,
    Route,
    RouteKind,
    init_segment,
    inner_addresses,
    route_datagram,
)
from common.cluster.segments import SegmentTable
from common.cluster.spi import SpiAllocator
from common.errors import MalformedMessage
from common.ike.ts import ts_from_cidr
from common.rand import deterministic_random

PEER = bytes([192, 0, 2, 7])
PEER6 = bytes.fromhex("20010db8000000000000000000000007")
I_FLAG, R_FLAG = 0x08, 0x20


def ike(spi_i: int, spi_r: int, flags: int, exchange: int = 37, length: int = 28) -> bytes:
    # RFC 7296 §3.1 header: SPIi, SPIr, next payload, version, exchange, flags, MID, length
    return struct.pack("!QQBBBBII", spi_i, spi_r, 0, 0x20, exchange, flags, 0, length)


def esp(spi: int) -> bytes:
    return struct.pack("!II", spi, 1) + bytes(24)


@pytest.fixture
def table() -> SegmentTable:
    return SegmentTable(8).assign([1, 2, 3])


def test_esp_routes_by_the_spi_top_byte(table: SegmentTable) -> None:
    spi = SpiAllocator(deterministic_random(1)).allocate_esp(200)
    route = route_datagram(PortKind.NATT, esp(spi), PEER, 4500, table)
    assert route == Route(RouteKind.ESP, 200, table.owner(200))


def test_established_ike_routes_by_our_spi(table: SegmentTable) -> None:
    alloc = SpiAllocator(deterministic_random(2))
    ours, theirs = alloc.allocate_ike(17), alloc.allocate_ike(99)
    # We are the responder: the peer (original initiator) sets the I flag; ours is SPIr.
    msg = ike(theirs, ours, I_FLAG)
    assert route_datagram(PortKind.IKE, msg, PEER, 500, table).segment == 17
    assert route_datagram(PortKind.NATT, bytes(4) + msg, PEER, 4500, table) \
        == Route(RouteKind.IKE, 17, table.owner(17))
    # We initiated: the peer's messages have no I flag; ours is SPIi.
    assert route_datagram(PortKind.IKE, ike(ours, theirs, R_FLAG), PEER, 500,
                          table).segment == 17


def test_first_ike_sa_init_routes_by_the_hash(table: SegmentTable) -> None:
    spi_i = 0x0123456789ABCDEF
    msg = ike(spi_i, 0, I_FLAG, exchange=34)
    expected = xxhash.xxh64(PEER + struct.pack("!H", 500) + struct.pack("!Q", spi_i),
                            seed=0).intdigest() % 256
    route = route_datagram(PortKind.IKE, msg, PEER, 500, table)
    assert route == Route(RouteKind.IKE_INIT, expected, table.owner(expected), hashed=True)
    assert init_segment(PEER, 500, spi_i, 8) == expected
    assert init_segment(PEER, 500, struct.pack("!Q", spi_i), 8) == expected
    # A retransmission (or a retry with a cookie, same SPIi) lands on the same member.
    assert route_datagram(PortKind.IKE, msg, PEER, 500, table) == route


def test_responder_spi_chosen_in_the_init_segment_keeps_the_sa_there(
        table: SegmentTable) -> None:
    spi_i = 0x1111222233334444
    seg = init_segment(PEER, 4500, spi_i, table.segment_bits)
    spi_r = SpiAllocator(deterministic_random(3)).allocate_ike(seg)
    first = route_datagram(PortKind.NATT, bytes(4) + ike(spi_i, 0, I_FLAG, 34), PEER, 4500,
                           table)
    later = route_datagram(PortKind.NATT, bytes(4) + ike(spi_i, spi_r, I_FLAG, 35), PEER,
                           4500, table)
    assert first.owner == later.owner and first.segment == later.segment == seg


def test_foreign_spi_falls_back_to_the_hash() -> None:
    # The caller says segment 3 is not ours (e.g. SPIs of a gateway before the cluster).
    t = SegmentTable(2).assign([1])
    spi = 0xC0000100                            # segment 3
    r = route_datagram(PortKind.NATT, esp(spi), PEER, 4500, t, valid_segment=lambda s: s < 3)
    expected = xxhash.xxh64(PEER + struct.pack("!H", 4500) + struct.pack("!I", spi),
                            seed=0).intdigest() % 4
    assert r == Route(RouteKind.ESP, expected, 1, hashed=True)
    r = route_datagram(PortKind.IKE, ike(5, 0xC000000000000001, I_FLAG), PEER, 500, t,
                       valid_segment=lambda s: s != 3)
    assert r.hashed and r.kind is RouteKind.IKE


def test_unowned_segment_is_foreign_by_default() -> None:
    t = SegmentTable(1)                         # nobody owns anything
    r = route_datagram(PortKind.NATT, esp(0x80000100), PEER, 4500, t)
    assert r.hashed and r.owner is None


def test_keepalive_routes_nowhere(table: SegmentTable) -> None:
    assert route_datagram(PortKind.NATT, b"\xff", PEER, 4500, table) \
        == Route(RouteKind.KEEPALIVE, None, None)


def test_port_kind_of_port() -> None:
    assert PortKind.of_port(500) is PortKind.IKE
    assert PortKind.of_port(4500) is PortKind.NATT
    assert PortKind.of_port(4501) is PortKind.NATT


@pytest.mark.parametrize("port_kind, data", [
    (PortKind.IKE, b""),
    (PortKind.IKE, ike(1, 0, I_FLAG)[:27]),
    (PortKind.IKE, ike(0, 0, I_FLAG)),               # SPIi zero
    (PortKind.NATT, b""),
    (PortKind.NATT, b"\x00"),
    (PortKind.NATT, b"\x00\x00\x00\x00" + bytes(10)),
    (PortKind.NATT, struct.pack("!I", 255) + bytes(4)),
    (PortKind.NATT, struct.pack("!I", 0x1000)),      # ESP without a sequence number
])
def test_malformed_datagrams(table: SegmentTable, port_kind: PortKind, data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        route_datagram(port_kind, data, PEER, 500, table)


def test_peer_ip_must_be_an_address(table: SegmentTable) -> None:
    with pytest.raises(ValueError):
        init_segment(b"\x01\x02", 500, 1, 8)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), port_kind=st.sampled_from(list(PortKind)),
       v6=st.booleans(), port=st.integers(0, 65535))
def test_any_bytes_route_or_raise_malformed(data: bytes, port_kind: PortKind, v6: bool,
                                            port: int) -> None:
    table = SegmentTable(4).assign([1, 2])
    try:
        r = route_datagram(port_kind, data, PEER6 if v6 else PEER, port, table)
    except MalformedMessage:
        return
    if r.kind is not RouteKind.KEEPALIVE:
        assert r.segment is not None and 0 <= r.segment < 16 and r.owner in (1, 2)


@settings(max_examples=100, deadline=None)
@given(seg=st.integers(0, 255), seed=st.integers(0, 1000))
def test_spis_we_allocate_route_to_their_segment(seg: int, seed: int) -> None:
    table = SegmentTable(8).assign([1, 2, 3, 4])
    alloc = SpiAllocator(deterministic_random(seed))
    assert route_datagram(PortKind.NATT, esp(alloc.allocate_esp(seg)), PEER, 4500,
                          table).segment == seg
    spi = alloc.allocate_ike(seg)
    assert route_datagram(PortKind.IKE, ike(7, spi, I_FLAG), PEER, 500, table).segment == seg


# -- inside routes ------------------------------------------------------------------


def v4(src: str, dst: str) -> bytes:
    import ipaddress
    return (b"\x45" + bytes(11) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed)


def v6(src: str, dst: str) -> bytes:
    import ipaddress
    # next header 59: No Next Header (RFC 8200 §4.7), no extension headers to walk
    return (b"\x60" + bytes(5) + b"\x3b\x40" + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed)


def test_inside_routes_match_source_and_destination() -> None:
    r = InsideRoutes()
    local = [ts_from_cidr("10.1.0.0/16")]
    r.add(1, local, [ts_from_cidr("10.2.0.0/24")], member=1)
    r.add(2, local, [ts_from_cidr("10.2.1.0/24"), ts_from_cidr("10.9.0.0/16")], member=2)
    r.add(3, [ts_from_cidr("2001:db8:1::/48")], [ts_from_cidr("2001:db8:2::/48")], member=3)
    assert len(r) == 3
    assert r.lookup(v4("10.1.2.3", "10.2.0.9")) == 1
    assert r.lookup(v4("10.1.2.3", "10.2.1.255")) == 2
    assert r.lookup(v4("10.1.2.3", "10.9.200.1")) == 2
    assert r.lookup_child(v4("10.1.2.3", "10.9.200.1")) == (2, 2)
    assert r.lookup(v4("10.3.2.3", "10.2.0.9")) is None       # source outside local_ts
    assert r.lookup(v4("10.1.2.3", "10.2.2.0")) is None       # between the ranges
    assert r.lookup(v6("2001:db8:1::5", "2001:db8:2::1")) == 3
    assert r.lookup(v6("2001:db8:1::5", "2001:db8:3::1")) is None
    r.remove(2)
    r.remove(2)
    assert r.lookup(v4("10.1.2.3", "10.2.1.1")) is None
    assert r.lookup(v4("10.1.2.3", "10.2.0.1")) == 1


def test_inside_routes_newest_overlapping_child_wins() -> None:
    # A rekeyed child SA (same selectors) replaces its predecessor for new traffic.
    r = InsideRoutes()
    local, remote = [ts_from_cidr("10.1.0.0/16")], [ts_from_cidr("0.0.0.0/0")]
    r.add(1, local, remote, member=1)
    r.add(2, local, [ts_from_cidr("10.2.0.0/24")], member=2)
    assert r.lookup(v4("10.1.0.1", "10.2.0.1")) == 2
    assert r.lookup(v4("10.1.0.1", "8.8.8.8")) == 1
    r.add(3, local, remote, member=3)
    assert r.lookup(v4("10.1.0.1", "10.2.0.1")) == 3
    r.remove(3)
    assert r.lookup(v4("10.1.0.1", "10.2.0.1")) == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32), st.integers(1, 4)),
                max_size=12),
       st.integers(0, 255), st.integers(0, 255))
def test_inside_routes_agree_with_a_linear_scan(
        children: list[tuple[int, int, int]], third: int, fourth: int) -> None:
    import ipaddress
    r = InsideRoutes()
    nets = []
    for cid, (octet, plen, member) in enumerate(children):
        net = ipaddress.ip_network(f"10.0.{octet}.0/{plen}", strict=False)
        r.add(cid, [ts_from_cidr("0.0.0.0/0")], [ts_from_cidr(net)], member)
        nets.append((cid, net, member))
    dst = ipaddress.ip_address(f"10.0.{third}.{fourth}")
    expected = next((m for cid, net, m in reversed(nets) if dst in net), None)
    assert r.lookup(v4("1.2.3.4", str(dst))) == expected


@pytest.mark.parametrize("packet", [b"", b"\x45" + bytes(18), b"\x60" + bytes(38),
                                    b"\x50" + bytes(40)])
def test_inner_addresses_malformed(packet: bytes) -> None:
    with pytest.raises(MalformedMessage):
        inner_addresses(packet)
    with pytest.raises(MalformedMessage):
        InsideRoutes().lookup(packet)


# Speed (not asserted; docs/testing.md: timing belongs in bench/). timeit on the dev box,
# CPython 3.11: route_datagram of an ESP packet ~1.8 us, of a first IKE_SA_INIT
# ~1.9 us; InsideRoutes.lookup with 1000 /24 children ~0.7 us, index rebuild ~2 ms.
