"""Hostile bytes into the dispatcher <-> member decoder (common/cluster/wire.py) and
the synch channel's (common/cluster/sync.py): whatever the bytes, ``decode`` and
``decode_sync`` return a message or raise ``MalformedMessage``, nothing else.
Every truncation of every message type's valid encoding, random bytes,
random bodies behind a valid head, and field-level mutations of valid
encodings; and the value ranges the formats define are checked at decode."""

from __future__ import annotations

import ipaddress
import math
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.cluster.events import Event, EventType
from common.cluster.segments import SegmentTable
from common.cluster.stats import (
    MAX_ENTRIES,
    MAX_KEY_BYTES,
    ConnectionCounts,
    EspTraffic,
    MemberStats,
    Replicas,
)
from common.cluster.sync import (
    SYNC_VERSION,
    Ack,
    BulkDone,
    ChildGone,
    ChildRecord,
    ChildState,
    EspCounter,
    EspCounters,
    IkeSaGone,
    IkeSaState,
    RekeyChild,
    Resync,
    SyncKind,
    SyncMessage,
    decode_sync,
    encode_sync,
)
from common.cluster.wire import (
    WIRE_VERSION,
    ChildClaim,
    ChildDelete,
    ChildPush,
    Control,
    ControlReq,
    Datagram,
    DatagramIn,
    DatagramOut,
    Events,
    Heartbeat,
    Hello,
    InnerIn,
    InnerOut,
    Message,
    MsgType,
    Notice,
    NoticeKind,
    RouteAdd,
    RouteDel,
    Status,
    StatusReq,
    Sync,
    TableUpdate,
    Timing,
    decode,
    encode,
)
from common.errors import MalformedMessage
from common.ike.constants import TsType
from common.ike.ts import TrafficSelector
from tests.fuzz import fuzz_settings

pytestmark = pytest.mark.fuzz

TS4 = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                      ipaddress.IPv4Address("10.0.0.0"), ipaddress.IPv4Address("10.0.0.255"))
TS6 = TrafficSelector(TsType.TS_IPV6_ADDR_RANGE, 6, 80, 80, ipaddress.IPv6Address("fd00::"),
                      ipaddress.IPv6Address("fd00::ff"))


def _table() -> SegmentTable:
    t = SegmentTable(4)
    t.assign([1, 2, 3])
    return t


WIRE: list[Message] = [
    DatagramIn([Datagram(500, b"\1\2\3\4", 500, b"abc"), Datagram(4500, bytes(16), 9, b"")]),
    DatagramOut([Datagram(4500, bytes(16), 1, b"x" * 10)]),
    InnerIn([b"\x45" * 20, b""]),
    InnerOut([b"a", b"bb"]),
    Heartbeat(1, 2, 3, 4, {2: 3, 0xFFFF: 2**32 - 1}),
    TableUpdate(_table()),
    ChildPush(1, 2, "c", 0x1234, 0x5678, "aes128gcm16", True, b"k" * 20, b"l" * 20, (TS4,),
              (TS6, TS4), b"\1\2\3\4", 4500, b"s" * 8),
    ChildDelete(1, 2),
    RouteAdd(1, 2, (TS4,), (TS6,)),
    RouteDel(5),
    Hello(1, 2, "host"),
    StatusReq(),
    Status(b"{}"),
    ControlReq(1, b"{}"),
    Control(1, b"{}"),
    Sync(1, 2, 3, b"xyz"),
    Events((Event(EventType.IKE_UP, member=1, conn="c"),)),
    Notice(NoticeKind.DEAD, 7, "member 1 sender id 7 was declared dead"),
    ChildClaim(0x1234, 0x5678, b"s" * 8, (TS4,), (TS6, TS4)),
    # (a reattach HELLO: timing keys and the table the member holds)
    Hello(1, 2, "host", sender_id=7, token=9, timing=Timing.of(0.05, 3, 2, "hot-standby"),
          table=_table()),
]

_CHILD = ChildRecord("c", 0x1000, 0x2000, "aes128gcm16", False, 0, 1, 5.0, (TS4,), (TS6,))
SYNC: list[SyncMessage] = [
    IkeSaState(b"a" * 8, b"b" * 8, True, 4, "pol", b"\1\2\3\4", 500, 4500, 20, 128, 5, 0, 19,
               b"d" * 32, b"", b"", b"e" * 20, b"f" * 20, b"p" * 32, b"q" * 32, 2, b"id", True,
               3, 4, 3, b"resp", b"g" * 32, 100.0, (_CHILD, _CHILD), False),
    IkeSaGone(b"a" * 8, b"b" * 8),
    ChildState(0x1000, 0x2000, "c", "aes128gcm16", False, b"k" * 20, b"l" * 20, (TS4,), (TS6,),
               bytes(16), 4500, b"s" * 8, 5, 64, 100, 0xFF),
    ChildGone(7),
    EspCounters((EspCounter(1, 2, 3, 4), EspCounter(5, 6, 7, 8))),
    Ack(3),
    Resync(),
    RekeyChild(b"a" * 8, 9),
    BulkDone(3),
]

WIRE_RAW = [encode(m, 7) for m in WIRE]
SYNC_RAW = [encode_sync(m) for m in SYNC]


def _only_malformed(fn: Callable[[bytes], object], data: bytes) -> None:
    try:
        fn(data)
    except MalformedMessage:
        pass


def test_every_message_type_is_covered_and_round_trips() -> None:
    assert {type(m).__name__ for m in WIRE} == {
        "DatagramIn", "DatagramOut", "InnerIn", "InnerOut", "Heartbeat", "TableUpdate",
        "ChildPush", "ChildDelete", "RouteAdd", "RouteDel", "Hello", "StatusReq", "Status",
        "Sync", "ControlReq", "Control", "Events", "Notice", "ChildClaim"}
    assert len({type(m) for m in WIRE}) == len(MsgType)
    assert len(SYNC) == len(SyncKind)
    for raw in WIRE_RAW:
        seq, back = decode(raw)
        assert seq == 7 and encode(back, seq) == raw
    for m, raw in zip(SYNC, SYNC_RAW, strict=True):
        assert decode_sync(raw) == m


@pytest.mark.parametrize("raw", WIRE_RAW, ids=[type(m).__name__ for m in WIRE])
def test_every_truncation_of_a_wire_message(raw: bytes) -> None:
    for n in range(len(raw)):
        _only_malformed(decode, raw[:n])


@pytest.mark.parametrize("raw", SYNC_RAW, ids=[type(m).__name__ for m in SYNC])
def test_every_truncation_of_a_sync_message(raw: bytes) -> None:
    for n in range(len(raw)):
        with pytest.raises(MalformedMessage):
            decode_sync(raw[:n])


@fuzz_settings(300)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _only_malformed(decode, data)
    _only_malformed(decode_sync, data)


@fuzz_settings(300)
@given(kind=st.integers(0, 255), body=st.binary(max_size=200))
def test_random_body_behind_a_valid_head(kind: int, body: bytes) -> None:
    _only_malformed(decode, struct.pack("!BBQ", WIRE_VERSION, kind, 1) + body)
    _only_malformed(decode_sync, bytes((SYNC_VERSION, kind)) + body)


def _mutate(raw: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(raw)
    for pos, value in edits:
        b[pos % len(b)] = value
    return bytes(b)


_EDITS = st.lists(st.tuples(st.integers(0, 1 << 16),
                            st.one_of(st.sampled_from([0, 1, 4, 6, 16, 0x7F, 0xFF]),
                                      st.integers(0, 255))), min_size=1, max_size=4)


@fuzz_settings(300)
@given(i=st.integers(0, len(WIRE_RAW) - 1), edits=_EDITS)
def test_field_mutations_of_wire_messages(i: int, edits: list[tuple[int, int]]) -> None:
    _only_malformed(decode, _mutate(WIRE_RAW[i], edits))


@fuzz_settings(300)
@given(i=st.integers(0, len(SYNC_RAW) - 1), edits=_EDITS)
def test_field_mutations_of_sync_messages(i: int, edits: list[tuple[int, int]]) -> None:
    _only_malformed(decode_sync, _mutate(SYNC_RAW[i], edits))


@fuzz_settings(200)
@given(i=st.integers(0, len(SYNC_RAW) - 1), extra=st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_malformed(i: int, extra: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_sync(SYNC_RAW[i] + extra)


# -- value ranges at decode ---------------------------------------------------------------


def test_an_empty_selector_range_is_malformed() -> None:
    empty = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                            ipaddress.IPv4Address("10.0.0.9"), ipaddress.IPv4Address("10.0.0.1"))
    with pytest.raises(MalformedMessage, match="empty"):
        decode(encode(RouteAdd(1, 2, (empty,), (TS4,)), 0))
    with pytest.raises(MalformedMessage, match="empty"):
        decode_sync(encode_sync(ChildState(0x1000, 0x2000, "c", "aes128gcm16", False, b"k" * 20,
                                           b"l" * 20, (TS4,), (empty,), bytes(4), 4500, b"",
                                           1, 64, 0, 0)))


def test_heartbeat_loads_of_member_0_or_twice_the_same_member_are_malformed() -> None:
    raw = encode(Heartbeat(0, 1, 2, 3, loads={5: 1, 6: 2}), 0)
    # after the frame head (10 bytes), member id, sender id, pid and epoch (16):
    # u8 count, then (u16 member, u32 load) each
    first, second = 10 + 16 + 1, 10 + 16 + 1 + 6
    assert decode(raw)[1] == Heartbeat(0, 1, 2, 3, loads={5: 1, 6: 2})
    zero = bytearray(raw)
    zero[first:first + 2] = b"\0\0"
    with pytest.raises(MalformedMessage, match="member id 0"):
        decode(bytes(zero))
    twice = bytearray(raw)
    twice[second:second + 2] = b"\0\5"
    with pytest.raises(MalformedMessage, match="two loads of member 5"):
        decode(bytes(twice))
    more = bytearray(raw)
    more[first - 1] = 0xFF                       # a count the bytes do not hold
    with pytest.raises(MalformedMessage):
        decode(bytes(more))


@fuzz_settings(200)
@given(loads=st.dictionaries(st.integers(1, 0xFFFF), st.integers(0, 2**32 - 1), max_size=64),
       edits=_EDITS)
def test_heartbeat_loads_round_trip_and_mutations_only_raise_malformed(
        loads: dict[int, int], edits: list[tuple[int, int]]) -> None:
    hb = Heartbeat(0, 1, 2, 3, token=4, loads=loads)
    raw = encode(hb, 0)
    assert decode(raw) == (0, hb)
    _only_malformed(decode, _mutate(raw, edits))


def test_an_opaque_port_range_is_kept() -> None:
    opaque = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 17, 65535, 0,
                             ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.1"))
    _, msg = decode(encode(RouteAdd(1, 2, (opaque,), (TS4,)), 0))
    assert isinstance(msg, RouteAdd) and msg.local_ts == (opaque,)


def test_a_child_push_with_an_ike_spi_of_another_length_is_malformed() -> None:
    bad = ChildPush(1, 2, "c", 0x1234, 0x5678, "aes128gcm16", False, b"k" * 20, b"l" * 20,
                    (TS4,), (TS4,), b"\1\2\3\4", 4500, b"s" * 5)
    with pytest.raises(MalformedMessage, match="IKE SPI"):
        decode(encode(bad, 0))


@pytest.mark.parametrize("rekey_in", [math.nan, math.inf, -math.inf, -2.0])
def test_a_replica_timer_must_be_finite(rekey_in: float) -> None:
    ike = SYNC[0]
    assert isinstance(ike, IkeSaState)
    from dataclasses import replace

    with pytest.raises(MalformedMessage, match="timer"):
        decode_sync(encode_sync(replace(ike, rekey_in=rekey_in)))
    child = replace(_CHILD, rekey_in=rekey_in)
    with pytest.raises(MalformedMessage, match="timer"):
        decode_sync(encode_sync(replace(ike, children=(child,))))


def test_a_replay_window_or_bitmap_too_wide_is_malformed() -> None:
    from dataclasses import replace

    cs = SYNC[2]
    assert isinstance(cs, ChildState)
    with pytest.raises(MalformedMessage, match="replay window"):
        decode_sync(encode_sync(replace(cs, replay_size=1 << 20, replay_bitmap=0)))
    with pytest.raises(MalformedMessage, match="bitmap"):
        decode_sync(encode_sync(replace(cs, replay_size=32, replay_bitmap=1 << 40)))
    with pytest.raises(MalformedMessage, match="IKE SPI"):
        decode_sync(encode_sync(replace(cs, ike_spi=b"abc")))
    with pytest.raises(MalformedMessage, match="IKE SPI"):
        decode_sync(encode_sync(RekeyChild(b"abc", 9)))


# -- a member's stats in its heartbeat (common/cluster/stats.py) ----------------------------

_STATS = MemberStats(
    ike_sas=2, half_open_ike_sas=1, child_sas=4, esp=EspTraffic(1, 2, 3, 4), sync_gaps=5,
    replicas=Replicas(6, 7, 8), counters={"ike_in": 9}, drops={"esp_replay": 10},
    refused={"bug.esp.KeyError": 11}, sync={"sync_out": 12}, pools={"rw": 13},
    connections=ConnectionCounts({"branch": 14}, {"net": 15}))
_STATS_RAW = encode(Heartbeat(3, 4, 5, 6, stats=_STATS), 7)
#: where the first map (counters: one name) starts: head, the heartbeat's fixed
#: part, its empty counters, token, term, the stats flag, the stats' 11 u64
_FIRST_MAP = 10 + 16 + 1 + 8 + 8 + 1 + 88


def test_member_stats_round_trip_and_every_truncation_is_malformed() -> None:
    _, back = decode(_STATS_RAW)
    assert isinstance(back, Heartbeat) and back.stats == _STATS
    for n in range(len(_STATS_RAW)):
        with pytest.raises(MalformedMessage):
            decode(_STATS_RAW[:n])
    with pytest.raises(MalformedMessage):
        decode(_STATS_RAW + b"\x00")


@fuzz_settings(300)
@given(edits=_EDITS)
def test_field_mutations_of_member_stats(edits: list[tuple[int, int]]) -> None:
    _only_malformed(decode, _mutate(_STATS_RAW, edits))


def _with_first_map(entries: bytes) -> bytes:
    """``_STATS_RAW`` with its first map replaced by ``entries`` (count included)."""
    raw = bytearray(_STATS_RAW)
    assert raw[_FIRST_MAP] == 1 and raw[_FIRST_MAP + 1] == len("ike_in")
    end = _FIRST_MAP + 1 + 1 + len("ike_in") + 8
    return bytes(raw[:_FIRST_MAP]) + entries + bytes(raw[end:])


def _entry(name: bytes, value: int = 1) -> bytes:
    return bytes([len(name)]) + name + value.to_bytes(8, "big")


@pytest.mark.parametrize("entries,error", [
    (b"\x01" + _entry(b""), "name of 0 bytes"),
    (b"\x01" + _entry(b"x" * (MAX_KEY_BYTES + 1)), f"name of {MAX_KEY_BYTES + 1} bytes"),
    (b"\x01" + _entry(b"\xff\xfe"), "not UTF-8"),
    (b"\x01" + _entry(b"esc\x1b[31m"), "not printable"),
    (b"\x02" + _entry(b"dup") + _entry(b"dup"), "twice"),
    (b"\xff" + _entry(b"a"), "cannot fit"),
], ids=["empty", "too long", "not UTF-8", "control character", "duplicate", "count"])
def test_bad_names_in_member_stats_are_malformed(entries: bytes, error: str) -> None:
    assert decode(_with_first_map(b"\x01" + _entry(b"ike_in", 9)))[1] == decode(_STATS_RAW)[1]
    with pytest.raises(MalformedMessage, match=error):
        decode(_with_first_map(entries))


def test_more_names_than_the_stats_may_hold_are_malformed() -> None:
    head = _STATS_RAW[:_FIRST_MAP]
    full = b"\xff" + b"".join(_entry(f"{i:03}".encode()) for i in range(255))
    # three full maps: over MAX_ENTRIES before the third is read
    assert 3 * 255 > MAX_ENTRIES >= 2 * 255
    with pytest.raises(MalformedMessage, match=f"more than {MAX_ENTRIES}"):
        decode(head + full * 3 + b"\x00" * 4)
    # two are fine
    _, msg = decode(head + full * 2 + b"\x00" * 5)
    assert isinstance(msg, Heartbeat) and msg.stats is not None
    assert len(msg.stats.counters) == len(msg.stats.drops) == 255


_names = st.text(min_size=0, max_size=200)
_values = st.integers(-(2**65), 2**65)
_maps = st.dictionaries(_names, _values, max_size=300)


@fuzz_settings(100)
@given(maps=st.lists(_maps, min_size=7, max_size=7), numbers=st.lists(_values, min_size=11,
                                                                        max_size=11))
def test_bounded_member_stats_always_encode(maps: list[dict[str, int]],
                                            numbers: list[int]) -> None:
    stats = MemberStats(numbers[0], numbers[1], numbers[2], EspTraffic(*numbers[3:7]),
                        numbers[7], Replicas(*numbers[8:11]), *maps[:5],
                        ConnectionCounts(maps[5], maps[6])).bounded()
    _, back = decode(encode(Heartbeat(1, 1, 1, 1, stats=stats), 0))
    assert isinstance(back, Heartbeat) and back.stats == stats
