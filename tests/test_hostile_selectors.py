"""RFC 4301 §5.2 selector checks (common/esp/selectors.py, Member.handle_esp and
handle_inner, InsideRoutes): an authenticated peer cannot inject packets from
outside its selectors, and we never encrypt traffic into a child that did not
negotiate it. Hypothesis compares the matcher with a plain reference built on
``common.ike.ts.contains`` (addresses, protocol, ports)."""

from __future__ import annotations

import ipaddress
import os
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.harness.configs import single_child_config
from bench.harness.packets import (
    GRE,
    ICMP,
    ICMP6,
    SCTP,
    TCP,
    UDP,
    frag6,
    icmp,
    ipv4,
    ipv6,
    ports,
)
from bench.harness.packets import ext6 as ext
from common.cluster.routing import InsideRoutes
from common.cluster.wire import ChildPush
from common.config import load_config
from common.errors import MalformedMessage
from common.esp import selectors as sel
from common.esp.selectors import (
    NO_PORTS,
    compile_blob,
    compile_ts,
    five_tuple,
    five_tuple_py,
    packet_matches,
)
from common.esp.transforms import TRANSFORMS, OutboundSA
from common.ike.ts import TrafficSelector, contains, ts_from_cidr, ts_from_range
from member.worker import Member
from tests.fuzz import fuzz_settings

TRANSFORM = "aes128gcm16"
SPI_IN, SPI_OUT = 0x0101_0001, 0xC0C0_0001
PEER = ("198.18.0.1", 4500)

CONFIG = single_child_config(psk="selectors-test-psk-0123456789")


# -- five_tuple ---------------------------------------------------------------------------


def test_five_tuple_ipv4_udp_tcp_icmp_and_no_ports() -> None:
    a, b = int(ipaddress.IPv4Address("10.0.0.1")), int(ipaddress.IPv4Address("10.0.0.2"))
    assert five_tuple(ipv4("10.0.0.1", "10.0.0.2", UDP, ports(5000, 7001))) == \
        (4, a, b, UDP, 5000, 7001)
    assert five_tuple(ipv4("10.0.0.1", "10.0.0.2", TCP, ports(1, 2, bytes(16)))) == \
        (4, a, b, TCP, 1, 2)
    # RFC 4301 §4.4.1.3: ICMP type and code in the port fields, on both sides
    assert five_tuple(ipv4("10.0.0.1", "10.0.0.2", ICMP, icmp(8, 0))) == \
        (4, a, b, ICMP, 0x0800, 0x0800)
    assert five_tuple(ipv4("10.0.0.1", "10.0.0.2", GRE, bytes(4))) == \
        (4, a, b, GRE, NO_PORTS, NO_PORTS)
    # with IPv4 options: the ports come after them
    assert five_tuple(ipv4("10.0.0.1", "10.0.0.2", UDP, ports(9, 10), ihl=7)) == \
        (4, a, b, UDP, 9, 10)


def test_five_tuple_fragments() -> None:
    # RFC 4301 §7: a non-initial fragment has no ports; an initial one has them
    later = ipv4("10.0.0.1", "10.0.0.2", UDP, bytes(8), frag=0x2000 | 185)
    assert five_tuple(later)[3:] == (UDP, NO_PORTS, NO_PORTS)
    first = ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1, 2), frag=0x2000)
    assert five_tuple(first)[3:] == (UDP, 1, 2)
    six_later = ipv6("2001:db8::1", "2001:db8::2", 44, frag6(UDP, 100) + bytes(8))
    assert five_tuple(six_later)[3:] == (UDP, NO_PORTS, NO_PORTS)
    six_first = ipv6("2001:db8::1", "2001:db8::2", 44, frag6(UDP, 0) + ports(53, 54))
    assert five_tuple(six_first)[3:] == (UDP, 53, 54)


def test_five_tuple_walks_ipv6_extension_headers() -> None:
    pkt = ipv6("2001:db8::1", "2001:db8::2", 0, ext(43, 14) + ext(60) + ext(UDP)
               + ports(1234, 7001))
    assert five_tuple(pkt)[3:] == (UDP, 1234, 7001)
    chain = ipv6("2001:db8::1", "2001:db8::2", 0, ext(43) + ext(60) + ext(UDP) + ports(4, 5))
    assert five_tuple(chain)[3:] == (UDP, 4, 5)
    icmp6 = ipv6("2001:db8::1", "2001:db8::2", 60, ext(ICMP6) + icmp(128, 0))
    assert five_tuple(icmp6)[3:] == (ICMP6, 128 << 8, 128 << 8)
    nothing = ipv6("2001:db8::1", "2001:db8::2", 59)
    assert five_tuple(nothing)[3:] == (59, NO_PORTS, NO_PORTS)


@pytest.mark.parametrize("packet", [
    b"", b"\x45", b"\x45" + bytes(18), b"\x60" + bytes(38), b"\x50" + bytes(40),
    b"\x44" + bytes(40),                                  # IHL 4 (< 5)
    b"\x4f" + bytes(40),                                  # IHL 15: 60 bytes, only 41 here
    ipv4("10.0.0.1", "10.0.0.2", UDP, b"\x00\x01"),       # UDP without its ports
    ipv4("10.0.0.1", "10.0.0.2", TCP, b"\x00\x01\x00"),
    ipv4("10.0.0.1", "10.0.0.2", ICMP, b"\x08"),          # ICMP without its code
    ipv4("10.0.0.1", "10.0.0.2", UDP, ports(1, 2), ihl=7)[:-5],
    ipv6("::1", "::2", UDP, b"\x00"),
    ipv6("::1", "::2", 0, b"\x11"),                        # hop-by-hop header cut
    ipv6("::1", "::2", 0, bytes([UDP, 3]) + bytes(6)),     # says 32 bytes, has 8
    ipv6("::1", "::2", 44, frag6(UDP, 0)[:5]),
    ipv6("::1", "::2", 0, ext(0) * 9 + ports(1, 2)),       # more than 8 headers
])
def test_truncated_and_malformed_headers_raise_malformed_only(packet: bytes) -> None:
    with pytest.raises(MalformedMessage):
        five_tuple(packet)
    with pytest.raises(MalformedMessage):
        InsideRoutes().lookup(packet)


# -- the reference ----------------------------------------------------------------------


def reference(packet: bytes, src_ts: list[TrafficSelector],
              dst_ts: list[TrafficSelector]) -> bool:
    """Straight from the RFC with scapy-free slicing and ``ts.contains``."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 15) * 4
        proto, src, dst = packet[9], packet[12:16], packet[16:20]
        body = packet[ihl:]
        fragmented = int.from_bytes(packet[6:8], "big") & 0x1FFF != 0
    else:
        proto, src, dst = packet[6], packet[8:24], packet[24:40]
        body = packet[40:]
        fragmented = False
        while proto in (0, 43, 60, 44):
            if proto == 44:
                fragmented = int.from_bytes(body[2:4], "big") >> 3 != 0
                proto, body = body[0], body[8:]
                if fragmented:
                    break
            else:
                proto, body = body[0], body[(body[1] + 1) * 8:]
    sport: int | None
    dport: int | None
    if fragmented:
        sport = dport = None
    elif proto in (6, 17, 33, 132, 136):
        sport, dport = int.from_bytes(body[0:2], "big"), int.from_bytes(body[2:4], "big")
    elif proto in (1, 58):
        sport = dport = int.from_bytes(body[0:2], "big")
    else:
        sport = dport = None
    return any(contains(t, src, proto, sport) for t in src_ts) and \
        any(contains(t, dst, proto, dport) for t in dst_ts)


# -- Hypothesis: random packets against random selectors --------------------------------

_V4_NET = st.sampled_from(["10.91.1.0/24", "10.91.0.0/16", "10.91.1.128/25", "10.91.1.7/32",
                           "0.0.0.0/0", "10.99.0.0/16"])
_V6_NET = st.sampled_from(["2001:db8:1::/48", "2001:db8::/32", "::/0", "2001:db8:1::7/128"])
_PROTO = st.sampled_from([0, 0, TCP, UDP, ICMP, ICMP6, SCTP, GRE])
_PORT_RANGE = st.sampled_from([(0, 65535), (7001, 7001), (1024, 65535), (0x0800, 0x08FF),
                               (0, 0), (65535, 0), (10, 5)])


@st.composite
def selectors(draw: st.DrawFn, version: int) -> list[TrafficSelector]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        net = ipaddress.ip_network(draw(_V4_NET if version == 4 else _V6_NET))
        lo, hi = draw(_PORT_RANGE)
        ts = ts_from_cidr(net, draw(_PROTO))
        # inverted port ranges (OPAQUE 65535-0, or a peer's 10-5) are built directly
        out.append(TrafficSelector(ts.ts_type, ts.ip_protocol, lo, hi, ts.start_addr,
                                   ts.end_addr))
    if draw(st.booleans()):
        # an empty address range from a misbehaving peer matches nothing
        out.append(ts_from_range("10.0.0.9", "10.0.0.1") if version == 4
                   else ts_from_range("::9", "::1"))
    return out


_V4_ADDR = st.sampled_from(["10.91.1.1", "10.91.1.200", "10.91.11.1", "10.99.99.99",
                            "10.91.1.7", "192.0.2.1"])
_V6_ADDR = st.sampled_from(["2001:db8:1::1", "2001:db8:1::7", "2001:db8:2::1", "fe80::1"])
_L4_PORT = st.sampled_from([0, 53, 1023, 1024, 7000, 7001, 7002, 0x0800, 0x0805, 65535])


@st.composite
def packets(draw: st.DrawFn, version: int) -> bytes:
    proto = draw(st.sampled_from([TCP, UDP, ICMP, ICMP6, SCTP, GRE, 59]))
    if proto in (TCP, UDP, SCTP):
        l4 = ports(draw(_L4_PORT), draw(_L4_PORT))
    elif proto in (ICMP, ICMP6):
        l4 = icmp(draw(st.sampled_from([0, 3, 8, 128, 129])), draw(st.integers(0, 3)))
    else:
        l4 = bytes(8)
    fragment = draw(st.sampled_from([0, 0, 0, 1, 100]))
    if version == 4:
        frag = (0x2000 | fragment) if draw(st.booleans()) else fragment
        return ipv4(draw(_V4_ADDR), draw(_V4_ADDR), proto, l4, frag=frag,
                    ihl=draw(st.sampled_from([5, 5, 6])))
    headers = draw(st.lists(st.sampled_from([0, 43, 60, 44]), max_size=3))
    chain = [*headers, proto]
    rest = b""
    for here, nxt in pairwise(chain):
        rest += frag6(nxt, fragment) if here == 44 else ext(nxt)
    return ipv6(draw(_V6_ADDR), draw(_V6_ADDR), chain[0], rest + l4)


@pytest.mark.fuzz
@fuzz_settings(200)
@given(st.data(), st.sampled_from([4, 6]))
def test_matcher_agrees_with_the_reference(data: st.DataObject, version: int) -> None:
    src_ts, dst_ts = data.draw(selectors(version)), data.draw(selectors(version))
    packet = data.draw(packets(version))
    assert packet_matches(packet, compile_ts(src_ts), compile_ts(dst_ts)) == \
        reference(packet, src_ts, dst_ts)


@pytest.mark.fuzz
@fuzz_settings(100)
@given(st.integers(1, 5), st.data())
def test_inside_routes_agree_with_a_linear_scan_of_the_reference(
        n_children: int, data: st.DataObject) -> None:
    routes = InsideRoutes()
    table = []
    for cid in range(n_children):
        local, remote = data.draw(selectors(4)), data.draw(selectors(4))
        routes.add(cid, local, remote, member=cid + 100)
        table.append((cid, local, remote))
    packet = data.draw(packets(4))
    expected = next(((cid, cid + 100) for cid, local, remote in reversed(table)
                     if reference(packet, local, remote)), None)
    assert routes.lookup_child(packet) == expected


@pytest.mark.fuzz
@fuzz_settings(200)
@given(st.binary(max_size=80), st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x40, 0x70]))
def test_random_bytes_never_crash_the_parser(tail: bytes, first: int) -> None:
    packet = bytes([first]) + tail
    try:
        version, *_ = five_tuple(packet)
    except MalformedMessage:
        return
    assert version in (4, 6)


def _outcome(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except MalformedMessage:
        return MalformedMessage


needs_c = pytest.mark.skipif(sel._c_match is None or sel._c_five_tuple is None,
                             reason="common.esp._esp_fast not built (or pure forced)")


@needs_c
@pytest.mark.fuzz
@fuzz_settings(100)
@given(st.data(), st.sampled_from([4, 6]), st.integers(0, 60))
def test_compiled_matcher_agrees_with_python(data: st.DataObject, version: int,
                                             cut: int) -> None:
    src_ts, dst_ts = data.draw(selectors(version)), data.draw(selectors(version))
    whole = data.draw(packets(version))
    for packet in (whole, whole[:cut]):   # and truncated
        assert _outcome(sel._c_five_tuple, packet) == _outcome(five_tuple_py, packet)
        assert _outcome(sel._c_match, compile_blob(src_ts), compile_blob(dst_ts), packet) \
            == _outcome(packet_matches, packet, compile_ts(src_ts), compile_ts(dst_ts))


@needs_c
@pytest.mark.fuzz
@fuzz_settings(200)
@given(st.binary(max_size=80), st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x40, 0x70, 0x00]))
def test_compiled_parser_agrees_with_python_on_random_bytes(tail: bytes, first: int) -> None:
    packet = bytes([first]) + tail
    assert _outcome(sel._c_five_tuple, packet) == _outcome(five_tuple_py, packet)


# -- the member: inbound ----------------------------------------------------------------


@pytest.fixture(params=["compiled", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The member tests run with the compiled matcher (when built) and the pure one."""
    if request.param == "python":
        monkeypatch.setattr(sel, "_c_match", None)
    elif sel._c_match is None:
        pytest.skip("common.esp._esp_fast not built (or pure forced)")
    return str(request.param)


def member_with_child(local: list[TrafficSelector], remote: list[TrafficSelector]
                      ) -> tuple[Member, OutboundSA]:
    """A member carrying one child, and the peer's outbound SA towards it."""
    m = Member(load_config(CONFIG, "gw.toml"))
    size = TRANSFORMS[TRANSFORM].keymat_size
    km_in, km_out = os.urandom(size), os.urandom(size)
    m.install_pushed(ChildPush(SPI_IN, 1, "net", SPI_IN, SPI_OUT, TRANSFORM, False, km_in,
                               km_out, tuple(local), tuple(remote),
                               ipaddress.IPv4Address(PEER[0]).packed, PEER[1], bytes(8)))
    return m, OutboundSA(SPI_IN, TRANSFORM, km_in, sender_id=2)


def udp(src: str, dst: str, sport: int = 40000, dport: int = 7001) -> bytes:
    return ipv4(src, dst, UDP, ports(sport, dport, bytes(4)) + b"payload!")


@pytest.mark.usefixtures("implementation")
def test_inbound_spoofed_sources_are_dropped_and_counted() -> None:
    m, peer = member_with_child([ts_from_cidr("10.91.2.0/24")], [ts_from_cidr("10.91.1.0/24")])
    good = udp("10.91.1.1", "10.91.2.1")
    assert m.handle_esp(peer.protect(good), SPI_IN, PEER, 1.0) == good
    # the attack: authenticated for 10.91.1.0/24, sends from elsewhere
    for spoofed in (udp("10.91.11.1", "10.91.2.1"), udp("10.99.99.99", "10.91.2.1"),
                    udp("10.91.1.1", "10.91.3.1"),         # destination outside local_ts
                    ipv6("2001:db8::1", "2001:db8::2", UDP, ports(1, 2))):
        assert m.handle_esp(peer.protect(spoofed), SPI_IN, PEER, 1.0) is None
    assert m.drops["selector_mismatch"] == 4
    assert m.by_spi[SPI_IN].selector_drops == 4
    assert m.handle_esp(peer.protect(good), SPI_IN, PEER, 1.0) == good


@pytest.mark.usefixtures("implementation")
def test_inbound_protocol_and_ports_are_checked() -> None:
    m, peer = member_with_child([ts_from_cidr("10.91.2.0/24", UDP, (7001, 7001))],
                                [ts_from_cidr("10.91.1.0/24", UDP)])
    assert m.handle_esp(peer.protect(udp("10.91.1.1", "10.91.2.1")), SPI_IN, PEER, 1.0)
    for bad in (udp("10.91.1.1", "10.91.2.1", dport=7002),
                ipv4("10.91.1.1", "10.91.2.1", ICMP, icmp(8, 0)),
                ipv4("10.91.1.1", "10.91.2.1", TCP, ports(40000, 7001, bytes(16))),
                ipv4("10.91.1.1", "10.91.2.1", UDP, bytes(8), frag=100)):  # no ports: §7
        assert m.handle_esp(peer.protect(bad), SPI_IN, PEER, 1.0) is None
    assert m.drops["selector_mismatch"] == 4


@pytest.mark.usefixtures("implementation")
@pytest.mark.parametrize("inner", [
    b"\x45" + bytes(10), ipv4("10.91.1.1", "10.91.2.1", UDP, b"\x01"),
    b"\x60" + bytes(20), b"\x45\x00",
])
def test_inbound_truncated_inner_is_dropped_as_malformed(inner: bytes) -> None:
    m, peer = member_with_child([ts_from_cidr("10.91.2.0/24")], [ts_from_cidr("10.91.1.0/24")])
    assert m.handle_esp(peer.protect(inner), SPI_IN, PEER, 1.0) is None
    assert m.drops == {"inner_malformed": 1}


# -- the member: outbound ---------------------------------------------------------------


@pytest.mark.usefixtures("implementation")
def test_outbound_udp_7001_child_never_carries_icmp_or_other_ports() -> None:
    m, _ = member_with_child([ts_from_cidr("10.91.2.0/24", UDP, (7001, 7001))],
                             [ts_from_cidr("10.91.4.0/24", UDP, (7001, 7001))])
    out = m.handle_inner(udp("10.91.2.1", "10.91.4.1", 7001, 7001))
    assert out is not None and out[1] == PEER
    for other in (ipv4("10.91.2.1", "10.91.4.1", ICMP, icmp(8, 0)),
                  udp("10.91.2.1", "10.91.4.1", 7001, 7002),
                  udp("10.91.2.1", "10.91.4.1", 5000, 7001),
                  ipv4("10.91.2.1", "10.91.4.1", TCP, ports(7001, 7001, bytes(16))),
                  udp("10.91.2.1", "10.91.5.1", 7001, 7001)):
        assert m.handle_inner(other) is None
    assert m.drops == {"no_child": 5}
    assert m.handle_inner(b"\x45\x00\x00") is None
    assert m.drops["inner_malformed"] == 1


def test_outbound_picks_the_child_by_protocol_and_ports() -> None:
    r = InsideRoutes()
    local, remote = "10.91.2.0/24", "10.91.4.0/24"
    r.add(1, [ts_from_cidr(local)], [ts_from_cidr(remote, UDP, (7001, 7001))], member=1)
    r.add(2, [ts_from_cidr(local)], [ts_from_cidr(remote, ICMP)], member=2)
    r.add(3, [ts_from_cidr(local, TCP, (22, 22))], [ts_from_cidr(remote, TCP)], member=3)
    assert r.lookup(udp("10.91.2.1", "10.91.4.1")) == 1
    assert r.lookup(ipv4("10.91.2.1", "10.91.4.1", ICMP, icmp(8, 0))) == 2
    assert r.lookup(ipv4("10.91.2.1", "10.91.4.1", TCP, ports(22, 5555, bytes(16)))) == 3
    assert r.lookup(ipv4("10.91.2.1", "10.91.4.1", TCP, ports(23, 5555, bytes(16)))) is None
    assert r.lookup(udp("10.91.2.1", "10.91.4.1", dport=53)) is None
