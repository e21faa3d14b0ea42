"""Traffic selectors: constructors, packet matching, intersection and narrowing
(RFC 7296 §2.9, §3.13.1)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.ike.constants import TsType
from common.ike.ts import (
    TrafficSelector,
    contains,
    intersect,
    narrow,
    to_cidrs,
    ts_any,
    ts_from_cidr,
    ts_from_range,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def test_from_cidr() -> None:
    ts = ts_from_cidr("10.1.0.0/24")
    assert ts == TrafficSelector(
        TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535, V4("10.1.0.0"), V4("10.1.0.255")
    )
    assert ts_from_cidr("10.1.0.77/24") == ts  # host bits dropped, as strongSwan does
    single = ts_from_cidr("192.0.2.1")
    assert (single.start_addr, single.end_addr) == (V4("192.0.2.1"), V4("192.0.2.1"))
    v6 = ts_from_cidr("2001:db8::/64", protocol=17, ports=(53, 53))
    assert v6.ts_type == TsType.TS_IPV6_ADDR_RANGE
    assert (v6.ip_protocol, v6.start_port, v6.end_port) == (17, 53, 53)
    assert v6.end_addr == V6("2001:db8::ffff:ffff:ffff:ffff")


def test_constructor_errors() -> None:
    with pytest.raises(ValueError):
        ts_from_cidr("10.1.0.0/33")
    with pytest.raises(ValueError):
        ts_from_range("10.0.0.1", "::1")
    with pytest.raises(ValueError):
        ts_from_cidr("10.0.0.0/8", protocol=256)
    with pytest.raises(ValueError):
        ts_from_cidr("10.0.0.0/8", ports=(0, 65536))
    with pytest.raises(ValueError):
        ts_any(5)


def test_any() -> None:
    assert str(ts_any(4)) == "0.0.0.0/0"
    assert str(ts_any(6)) == "::/0"
    assert ts_any(6).end_addr == V6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")


def test_str() -> None:
    assert str(ts_from_cidr("10.1.0.0/24")) == "10.1.0.0/24"
    assert str(ts_from_cidr("10.1.0.5")) == "10.1.0.5/32"
    assert str(ts_from_range("10.1.0.5", "10.1.0.9", 17, (53, 53))) == "10.1.0.5-10.1.0.9[udp/53]"
    assert str(ts_from_cidr("10.0.0.0/8", 6)) == "10.0.0.0/8[tcp]"
    assert str(ts_from_cidr("10.0.0.0/8", 6, (1000, 2000))) == "10.0.0.0/8[tcp/1000-2000]"
    assert str(ts_from_cidr("10.0.0.0/8", 0, (80, 80))) == "10.0.0.0/8[any/80]"
    assert str(ts_from_cidr("10.0.0.0/8", 99)) == "10.0.0.0/8[99]"
    assert str(ts_from_cidr("2001:db8::/32", 58)) == "2001:db8::/32[ipv6-icmp]"


def test_contains() -> None:
    net = ts_from_cidr("10.1.0.0/24")
    assert contains(net, V4("10.1.0.7"), 6, 443)
    assert contains(net, bytes([10, 1, 0, 255]), 17, None)  # raw header octets
    assert not contains(net, V4("10.1.1.0"), 6, 443)
    assert not contains(net, V6("::a01:7"), 6, 443)  # same int, other family
    assert not contains(net, bytes(16), 6, 443)
    dns = ts_from_range("10.1.0.5", "10.1.0.9", 17, (53, 53))
    assert contains(dns, V4("10.1.0.5"), 17, 53)
    assert not contains(dns, V4("10.1.0.5"), 6, 53)
    assert not contains(dns, V4("10.1.0.5"), 17, 54)
    assert not contains(dns, V4("10.1.0.5"), 17, None)  # no ports (e.g. a fragment)
    opaque = ts_from_cidr("10.1.0.0/24", 17, (65535, 0))
    assert contains(opaque, V4("10.1.0.1"), 17, None)


def test_to_cidrs() -> None:
    ts = ts_from_range("10.1.0.5", "10.1.0.9")
    assert [str(n) for n in to_cidrs(ts)] == ["10.1.0.5/32", "10.1.0.6/31", "10.1.0.8/31"]
    assert to_cidrs(ts_any(6)) == [ipaddress.ip_network("::/0")]
    empty = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535, V4("10.0.0.2"), V4("10.0.0.1"))
    assert to_cidrs(empty) == []
    assert not contains(empty, V4("10.0.0.1"), 0, None)


def test_intersect_examples() -> None:
    a = ts_from_cidr("10.0.0.0/8")
    b = ts_from_cidr("10.1.0.0/16", 17, (53, 53))
    assert intersect(a, b) == b
    assert intersect(b, a) == b
    assert intersect(ts_from_cidr("10.0.0.0/8", 6), b) is None  # tcp vs udp
    assert intersect(a, ts_from_cidr("192.168.0.0/16")) is None
    assert intersect(a, ts_any(6)) is None
    assert intersect(
        ts_from_cidr("10.0.0.0/8", 6, (1000, 2000)), ts_from_cidr("10.0.0.0/8", 0, (1500, 3000))
    ) == ts_from_cidr("10.0.0.0/8", 6, (1500, 2000))


def test_narrow_examples() -> None:
    # RFC 7296 §2.9: initiator asks for everything, policy allows two subnets.
    proposed = [ts_any(4)]
    allowed = [ts_from_cidr("10.1.0.0/24"), ts_from_cidr("10.2.0.0/24"), ts_any(6)]
    assert narrow(proposed, allowed) == allowed[:2]
    assert narrow([ts_from_cidr("192.168.0.0/16")], allowed) == []  # TS_UNACCEPTABLE
    # duplicates collapse, order follows the proposal
    twice = [ts_from_cidr("10.1.0.0/24"), ts_from_cidr("10.1.0.0/25")]
    assert narrow(twice, [ts_any(4), ts_from_cidr("10.0.0.0/8")]) == twice


# -- properties ------------------------------------------------------------------

# A small IPv4 space with few protocols and ports, so ranges overlap often.
_ADDR = st.integers(0, 40).map(lambda n: V4(0x0A000000 + n))
_PORT = st.sampled_from([0, 1, 53, 80, 443, 1000, 65534, 65535])


@st.composite
def selectors(draw: st.DrawFn) -> TrafficSelector:
    lo, hi = sorted((draw(_ADDR), draw(_ADDR)))
    plo, phi = sorted((draw(_PORT), draw(_PORT)))
    protocol = draw(st.sampled_from([0, 0, 6, 17]))
    return ts_from_range(lo, hi, protocol, (plo, phi))


def inside(inner: TrafficSelector, outer: TrafficSelector) -> bool:
    return (
        outer.start_int <= inner.start_int
        and inner.end_int <= outer.end_int
        and outer.start_port <= inner.start_port
        and inner.end_port <= outer.end_port
        and outer.ip_protocol in (0, inner.ip_protocol)
    )


@given(selectors(), selectors())
def test_intersection_is_inside_both(a: TrafficSelector, b: TrafficSelector) -> None:
    common = intersect(a, b)
    if common is not None:
        assert inside(common, a) and inside(common, b)


@given(selectors(), selectors())
def test_intersection_commutes(a: TrafficSelector, b: TrafficSelector) -> None:
    assert intersect(a, b) == intersect(b, a)


@given(selectors(), selectors(), _ADDR, st.sampled_from([6, 17, 50]), _PORT)
def test_packet_in_both_iff_in_intersection(
    a: TrafficSelector, b: TrafficSelector, addr: V4, protocol: int, port: int
) -> None:
    common = intersect(a, b)
    in_both = contains(a, addr, protocol, port) and contains(b, addr, protocol, port)
    assert in_both == (common is not None and contains(common, addr, protocol, port))


@given(selectors())
def test_intersect_with_self_and_any(a: TrafficSelector) -> None:
    assert intersect(a, a) == a
    assert intersect(a, ts_any(4)) == a


@given(st.lists(selectors(), max_size=4), st.lists(selectors(), min_size=1, max_size=4))
def test_narrow_properties(proposed: list[TrafficSelector], allowed: list[TrafficSelector]) -> None:
    result = narrow(proposed, allowed)
    assert len(result) == len(set(result))
    for ts in result:
        assert any(inside(ts, p) for p in proposed)
        assert any(inside(ts, a) for a in allowed)


@given(st.lists(selectors(), min_size=1, max_size=4), st.lists(selectors(), max_size=3))
def test_narrow_of_a_subset_returns_it(
    proposed: list[TrafficSelector], extra: list[TrafficSelector]
) -> None:
    # If the policy allows a superset of every proposed selector, the proposal
    # survives unchanged (minus duplicates), whatever else the policy allows.
    unique = list(dict.fromkeys(proposed))
    assert narrow(proposed, [ts_any(4)]) == unique
    result = narrow(proposed, [ts_any(4), *extra])
    assert all(p in result for p in proposed)


@given(selectors())
def test_to_cidrs_cover_the_range_exactly(ts: TrafficSelector) -> None:
    cidrs = to_cidrs(ts)
    assert sum(n.num_addresses for n in cidrs) == ts.end_int - ts.start_int + 1
    assert int(cidrs[0].network_address) == ts.start_int
    assert int(cidrs[-1].broadcast_address) == ts.end_int
