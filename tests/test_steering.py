"""The steering program (common/cluster/steering.py) against route_datagram,
and on a real SO_REUSEPORT group on loopback (member/reuseport.py)."""

from __future__ import annotations

import collections
import socket
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.cluster.routing import PortKind, RouteKind, route_datagram
from common.cluster.segments import SegmentTable
from common.cluster.steering import MAX_INSNS, RET_K, Program, build_program, run
from common.errors import MalformedMessage
from member.reuseport import DISPATCHER_SLOT, SteeringGroup, SteeringUnavailable
from tests.fuzz import fuzz_settings

PEER = (b"\x7f\x00\x00\x01", 40000)
DISPATCHER = 0


def expected(natt: bool, data: bytes, table: SegmentTable, sockets: dict[int, int]) -> int:
    """The socket route_datagram's decision implies."""
    kind = PortKind.NATT if natt else PortKind.IKE
    try:
        route = route_datagram(kind, data, PEER[0], PEER[1], table)
    except MalformedMessage:
        return DISPATCHER
    if route.kind in (RouteKind.KEEPALIVE, RouteKind.IKE_INIT) or route.hashed:
        return DISPATCHER
    return DISPATCHER if route.owner is None else sockets.get(route.owner, DISPATCHER)


def esp(spi: int, size: int = 24) -> bytes:
    return (struct.pack("!II", spi, 1) + bytes(max(0, size - 8)))[:size]


def ike(spi_i: int, spi_r: int, flags: int, marker: bool = True, size: int = 28) -> bytes:
    head = struct.pack("!QQBBBBII", spi_i, spi_r, 33, 0x20, 34 if spi_r == 0 else 37,
                       flags, 0, size)
    return (b"\0" * 4 if marker else b"") + head + bytes(max(0, size - 28))


def esp_spi(segment: int, bits: int, low: int = 0x1234) -> int:
    return (segment << (32 - bits)) | (low & ((1 << (32 - bits)) - 1)) | 0x100


def ike_spi(segment: int, bits: int, low: int = 0x55) -> int:
    return (segment << (64 - bits)) | (low & ((1 << (64 - bits)) - 1)) | 1


def scattered(bits: int, members: int, moves: int) -> SegmentTable:
    """A round-robin table, two failovers, then a member joins in part."""
    t = SegmentTable(bits).assign(list(range(1, min(members, 1 << bits) + 1)))
    if len(t.members) > 2:
        t.fail_over(t.members[0])
        t.fail_over(t.members[-1])
    t.apply(t.join_plan(99, moves))
    return t


# -- the pure program ---------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(17))
def test_program_fits_and_never_names_a_wrong_member(bits: int) -> None:
    for table in (SegmentTable(bits).assign([1]),
                  SegmentTable(bits).assign(list(range(1, min(64, 1 << bits) + 1))),
                  scattered(bits, 64, 50), scattered(min(bits, 10), 5, 1 << 10)):
        sockets = {m: i + 1 for i, m in enumerate(table.members) if m % 3}  # some remote
        bits = table.segment_bits
        for natt in (True, False):
            program = build_program(table, sockets, DISPATCHER, natt=natt)
            assert len(program) <= MAX_INSNS
            assert len(program.packed()) == 8 * len(program)
            step = max(1, table.segments // 256)
            for seg in range(0, table.segments, step):
                owner = table.owner(seg)
                want = sockets.get(owner, DISPATCHER) if owner is not None else DISPATCHER
                got = run(program, ike(7, ike_spi(seg, bits), 0x08, marker=natt))
                if natt:
                    assert run(program, esp(esp_spi(seg, bits))) == got
                if program.overflow == 0:
                    assert got == want, (bits, seg)
                else:
                    assert got in (want, DISPATCHER)


def test_periodic_tables_are_exact_at_16_bits() -> None:
    table = SegmentTable(16).assign(list(range(1, 65)))
    table.fail_over(5)
    sockets = {m: m for m in table.members}
    program = build_program(table, sockets, DISPATCHER)
    assert program.overflow == 0 and program.period == 64
    for seg in range(0, 1 << 16, 97):
        assert run(program, esp(esp_spi(seg, 16))) == sockets[table.owner(seg) or 0]


def test_the_rules_by_hand() -> None:
    table = SegmentTable(2).assign([1, 2])  # segments 0, 2 -> 1; 1, 3 -> 2
    sockets = {1: 1, 2: 2}
    p = build_program(table, sockets, DISPATCHER)
    assert run(p, b"\xff") == DISPATCHER                       # keepalive
    assert run(p, esp(esp_spi(1, 2))) == 2
    assert run(p, esp(esp_spi(2, 2))) == 1
    assert run(p, esp(0x80)) == DISPATCHER                      # reserved SPI
    assert run(p, esp(esp_spi(1, 2))[:7]) == DISPATCHER         # short ESP
    assert run(p, ike(ike_spi(3, 2), 0, 0x08)) == DISPATCHER     # IKE_SA_INIT
    # I flag set: the peer initiated, our SPI is SPIr
    assert run(p, ike(ike_spi(0, 2), ike_spi(3, 2), 0x08)) == 2
    # I flag clear: we initiated, our SPI is SPIi
    assert run(p, ike(ike_spi(0, 2), ike_spi(3, 2), 0x20)) == 1
    assert run(p, ike(0, ike_spi(3, 2), 0x08)) == DISPATCHER     # SPIi zero
    assert run(p, ike(ike_spi(0, 2), 5, 0x08)[:31]) == DISPATCHER  # short IKE
    p500 = build_program(table, sockets, DISPATCHER, natt=False)
    assert run(p500, ike(ike_spi(0, 2), ike_spi(3, 2), 0x08, marker=False)) == 2
    assert run(p500, ike(ike_spi(1, 2), 0, 0x08, marker=False)) == DISPATCHER


def test_build_refuses_bad_indexes() -> None:
    table = SegmentTable(2).assign([1])
    for bad in (-1, 0xFFFF_FFFF, True):
        with pytest.raises(ValueError):
            build_program(table, {1: bad}, DISPATCHER)  # type: ignore[dict-item]


@st.composite
def datagrams(draw: st.DrawFn, bits: int, natt: bool) -> bytes:
    seg = st.integers(0, (1 << bits) - 1)
    kind = draw(st.sampled_from(["esp", "ike", "init", "keepalive", "raw"]
                                if natt else ["ike", "init", "raw"]))
    if kind == "esp":
        return esp(esp_spi(draw(seg), bits, draw(st.integers(0, 2**32 - 1))),
                   draw(st.integers(4, 40)))
    if kind in ("ike", "init"):
        spi_r = 0 if kind == "init" else ike_spi(draw(seg), bits, draw(st.integers(0, 2**63)))
        spi_i = draw(st.sampled_from([0, ike_spi(draw(seg), bits, draw(st.integers(0, 2**63)))]))
        size = draw(st.integers(20, 40))
        return ike(spi_i, spi_r, draw(st.integers(0, 255)), marker=natt, size=size)[:size]
    if kind == "keepalive":
        return b"\xff"
    return draw(st.binary(max_size=40))


@pytest.mark.fuzz
@fuzz_settings(300)
@given(data=st.data(), bits=st.integers(1, 10), members=st.integers(1, 6),
       moves=st.integers(0, 40), natt=st.booleans(), local=st.integers(0, 63))
def test_program_agrees_with_route_datagram(data: st.DataObject, bits: int, members: int,
                                            moves: int, natt: bool, local: int) -> None:
    table = scattered(bits, members, moves)
    sockets = {m: i + 1 for i, m in enumerate(table.members) if local >> (i % 6) & 1}
    program = build_program(table, sockets, DISPATCHER, natt=natt)
    assert program.overflow == 0
    for _ in range(10):
        dgram = data.draw(datagrams(bits, natt))
        assert run(program, dgram) == expected(natt, dgram, table, sockets), dgram.hex()


# -- real sockets -------------------------------------------------------------------------


def _drain(group: SteeringGroup, wait: float = 0.02) -> dict[int, list[bytes]]:
    time.sleep(wait)
    got: dict[int, list[bytes]] = collections.defaultdict(list)
    for i, s in enumerate(group.sockets):
        while s.fileno() != -1:
            try:
                got[i].append(s.recv(2048))
            except BlockingIOError:
                break
    return got


@pytest.fixture
def sender() -> socket.socket:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        yield s


def test_every_segment_lands_on_its_owner_and_takeover_repoints(sender: socket.socket) -> None:
    bits = 4
    table = SegmentTable(bits).assign([1, 2, 3, 4])  # member 4 lives on another host
    with SteeringGroup.open("127.0.0.1", 0, [1, 2, 3]) as group:
        assert group.steer(table).overflow == 0 and group.epoch == table.epoch
        for round_ in range(2):
            slots = group.slots()
            want: dict[int, list[bytes]] = collections.defaultdict(list)
            for seg in range(1 << bits):
                owner = table.owner(seg)
                for dgram in (esp(esp_spi(seg, bits, seg)),
                              ike(ike_spi(seg ^ 1, bits), ike_spi(seg, bits), 0x08)):
                    sender.sendto(dgram, group.address)
                    want[slots.get(owner or 0, DISPATCHER_SLOT)].append(dgram)
            for dgram in (ike(ike_spi(5, bits), 0, 0x08), b"\xff"):
                sender.sendto(dgram, group.address)
                want[DISPATCHER_SLOT].append(dgram)
            got = _drain(group)
            assert {k: sorted(v) for k, v in got.items() if v} == \
                {k: sorted(v) for k, v in want.items()}, round_
            if round_ == 0:
                # takeover: member 2 dies, its segments go to their backups
                before = table.segments_of(2)
                table.fail_over(2)
                group.steer(table)
                assert all(table.owner(s) != 2 for s in before)


def test_port_500_group(sender: socket.socket) -> None:
    table = SegmentTable(2).assign([1, 2])
    with SteeringGroup.open("127.0.0.1", 0, [1, 2], natt=False) as group:
        group.steer(table)
        established = ike(ike_spi(0, 2), ike_spi(3, 2), 0x08, marker=False)
        init = ike(ike_spi(2, 2), 0, 0x08, marker=False)
        sender.sendto(established, group.address)
        sender.sendto(init, group.address)
        got = _drain(group)
        assert got[group.slots()[2]] == [established] and got[DISPATCHER_SLOT] == [init]


def _spread(group: SteeringGroup, n: int = 24) -> collections.Counter[int]:
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in senders:
            s.sendto(b"x", group.address)
        return collections.Counter({k: len(v) for k, v in _drain(group).items() if v})
    finally:
        for s in senders:
            s.close()


def test_out_of_range_index_falls_back_to_the_hash() -> None:
    """Documented in docs/routing.md: not a drop, the kernel's hash selection."""
    with SteeringGroup.open("127.0.0.1", 0, [1, 2]) as group:
        group.attach(Program(((RET_K, 0, 0, 1),), 0, 1))
        assert _spread(group) == {1: 24}
        for index in (3, 0xFFFF_FFFF):
            group.attach(Program(((RET_K, 0, 0, index),), 0, 1))
            spread = _spread(group)
            assert sum(spread.values()) == 24 and len(spread) >= 2


def test_closing_a_socket_loses_its_queue_and_the_last_takes_its_index(
        sender: socket.socket) -> None:
    with SteeringGroup.open("127.0.0.1", 0, [1, 2]) as group:
        group.attach(Program(((RET_K, 0, 0, 1),), 0, 1))
        for _ in range(5):
            sender.sendto(b"queued", group.address)
        time.sleep(0.02)
        group.sockets[1].close()
        assert sum(len(v) for v in _drain(group).values()) == 0   # lost with the socket
        for _ in range(5):
            sender.sendto(b"after", group.address)
        assert _drain(group)[2] == [b"after"] * 5                  # slot 2 is index 1 now


def test_a_refused_program_names_the_reason() -> None:
    with SteeringGroup.open("127.0.0.1", 0, [1]) as group:
        bad = Program(((0x1234, 0, 0, 0),), 0, 1)   # no such opcode, no return
        with pytest.raises(SteeringUnavailable, match="rejected the classic BPF program"):
            group.attach(bad)
        assert group.program is None


def test_segments_of_a_member_not_alive_go_to_the_dispatcher(sender: socket.socket) -> None:
    """Between a member's death and the table that moves its segments (or a
    member whose socket nobody reads yet), its datagrams reach the
    dispatcher's socket, which relays them by the table."""
    bits = 2
    table = SegmentTable(bits).assign([1, 2])
    with SteeringGroup.open("127.0.0.1", 0, [1, 2]) as group:
        group.steer(table, alive={1})
        for seg in range(1 << bits):
            sender.sendto(esp(esp_spi(seg, bits, seg)), group.address)
        got = _drain(group)
        slots = group.slots()
        assert len(got[slots[1]]) == len(table.segments_of(1))
        assert not got.get(slots[2])
        assert len(got[DISPATCHER_SLOT]) == len(table.segments_of(2))
