"""The event stream (common/cluster/events.py, docs/operations.md "Control API"):
the ring, the events' JSON and its hostile readings, the control command
``events``, the member -> dispatcher EVENTS message with its sender check,
the SA events a member produces (in process, two members back to back), and
real processes: a single gateway and a 3-member cluster against strongSwan."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.harness.procs import run_coro
from common.cluster.events import (
    MAX_LIMIT,
    MEMBER_EVENTS,
    Event,
    EventLog,
    EventType,
    clip,
)
from common.cluster.wire import (
    MAX_EVENT_BYTES,
    MAX_EVENTS,
    WIRE_VERSION,
    Events,
    MsgType,
    decode,
    encode,
)
from common.config import load_config
from common.errors import MalformedMessage
from dispatcher.control import answer
from member.worker import Member
from member.worker import control as member_control
from tests.fuzz import fuzz_settings
from tests.test_logs import PORTS, carry
from tests.test_peer import CONN, gateway_config, peer_config

ROOT = Path(__file__).resolve().parent.parent


def ev(kind: EventType = EventType.IKE_UP, **kw: Any) -> Event:
    return Event(kind, **kw)


# -- the ring -----------------------------------------------------------------------------


def test_ring_numbers_from_one_and_reads_from_a_sequence_number() -> None:
    log = EventLog(capacity=3)
    assert log.next_seq == 1
    assert log.since(1) == ([], 1, 0)
    for i in range(5):
        assert log.add(ev(member=i), 100.0 + i) == i + 1
    assert log.next_seq == 6
    got, nxt, dropped = log.since(1)
    assert [e.seq for e in got] == [3, 4, 5] and nxt == 6 and dropped == 2
    assert [e.event.member for e in got] == [2, 3, 4] and got[0].time == 102.0
    got, nxt, dropped = log.since(4)
    assert [e.seq for e in got] == [4, 5] and (nxt, dropped) == (6, 0)
    assert log.since(6) == ([], 6, 0)           # nothing new yet
    assert log.since(0)[2] == 2 and log.since(-5)[2] == 2   # as from 1


def test_ring_limit_pages_and_next_continues() -> None:
    log = EventLog(capacity=10)
    for i in range(7):
        log.add(ev(member=i), float(i))
    got, nxt, dropped = log.since(2, limit=3)
    assert [e.seq for e in got] == [2, 3, 4] and (nxt, dropped) == (5, 0)
    got, nxt, _ = log.since(nxt, limit=3)
    assert [e.seq for e in got] == [5, 6, 7] and nxt == 8
    assert log.since(1, limit=0)[0] == []


def test_a_reader_past_the_end_is_sent_back_to_the_end() -> None:
    """A reader of a gateway that restarted asks for more than there is."""
    log = EventLog()
    log.add(ev(), 1.0)
    got, nxt, dropped = log.since(500)
    assert (got, nxt, dropped) == ([], 2, 0)   # next < since: the stream began anew


def test_ring_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventLog(capacity=0)


def test_logged_json_is_flat_with_seq_and_time() -> None:
    log = EventLog()
    log.add(ev(EventType.TAKEOVER, member=2, dead=1, segments=(3, 4)), 12.3456789)
    (logged,), _, _ = log.since(1)
    assert logged.to_json() == {"seq": 1, "time": 12.345679, "type": "takeover", "member": 2,
                                "dead": 1, "segments": [3, 4]}


def test_clip_keeps_one_short_line() -> None:
    assert clip("a\nb") == "a" and clip("") == "" and len(clip("x" * 1000)) == 256


# -- JSON -------------------------------------------------------------------------------------

_TEXT = st.text(max_size=256)
_U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def events(draw: st.DrawFn) -> Event:
    return Event(draw(st.sampled_from(list(EventType))), member=draw(_U64),
                 conn=draw(_TEXT), ike_spi=draw(_TEXT), child_spi=draw(_TEXT),
                 new_spi=draw(_TEXT), peer=draw(_TEXT), child=draw(_TEXT),
                 address=draw(_TEXT), reason=draw(_TEXT), epoch=draw(_U64),
                 sender_id=draw(_U64), dead=draw(_U64),
                 segments=tuple(draw(st.lists(st.integers(0, 0xFFFF), max_size=40))))


@pytest.mark.fuzz
@fuzz_settings(200)
@given(events())
def test_event_json_round_trip(e: Event) -> None:
    obj = e.to_json()
    assert Event.from_json(obj) == e
    assert Event.from_json(json.loads(json.dumps(obj))) == e
    assert obj["type"] == e.type.value


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12)
_FIELDS = ["type", "member", "conn", "ike_spi", "child_spi", "new_spi", "peer", "child",
           "address", "reason", "epoch", "sender_id", "dead", "segments", "seq", "time", "x"]


@st.composite
def hostile_objects(draw: st.DrawFn) -> Any:
    """Mostly objects with the right keys and any values; also anything at all."""
    if draw(st.booleans()):
        return draw(_JSON)
    obj = draw(st.dictionaries(st.sampled_from(_FIELDS), _JSON | st.integers(-1, 1 << 70)
                               | st.text(max_size=300) | st.lists(st.integers(-2, 1 << 17)),
                               max_size=8))
    if draw(st.booleans()):
        obj["type"] = draw(st.sampled_from([t.value for t in EventType]))
    return obj


@pytest.mark.fuzz
@fuzz_settings(400)
@given(hostile_objects())
def test_from_json_takes_a_valid_event_or_raises_malformed(obj: Any) -> None:
    try:
        e = Event.from_json(obj)
    except MalformedMessage:
        return
    assert Event.from_json(e.to_json()) == e


@pytest.mark.parametrize("obj,what", [
    ([], "not an object"), ({"type": "nope"}, "unknown type"), ({}, "unknown type"),
    ({"type": "ike_up", "member": True}, "unsigned"), ({"type": "ike_up", "member": -1},
                                                       "unsigned"),
    ({"type": "ike_up", "member": 1 << 64}, "unsigned"), ({"type": "ike_up", "epoch": 1.0},
                                                          "unsigned"),
    ({"type": "ike_up", "conn": "x" * 257}, "short string"), ({"type": "ike_up", "peer": 5},
                                                              "short string"),
    ({"type": "takeover", "segments": [1, 1 << 16]}, "segment"),
    ({"type": "takeover", "segments": list(range(1025))}, "segment"),
    ({"type": "takeover", "segments": "1,2"}, "segment"),
    ({"type": "ike_up", "extra": 1}, "unknown field")])
def test_hostile_event_objects_are_malformed(obj: Any, what: str) -> None:
    with pytest.raises(MalformedMessage, match=what):
        Event.from_json(obj)


# -- the EVENTS message -------------------------------------------------------------------------

SOME = (ev(EventType.CHILD_UP, member=2, conn="c", child="gcm", child_spi="c0000100",
           ike_spi="0123456789abcdef", peer="198.18.0.1"),
        ev(EventType.IKE_DOWN, member=2, conn="c", reason="deleted by peer ünï"))


def _frame(body: bytes, seq: int = 0) -> bytes:
    return bytes([WIRE_VERSION, MsgType.EVENTS]) + seq.to_bytes(8, "big") + body


def _body(*blobs: bytes, count: int | None = None) -> bytes:
    out = bytes([len(blobs) if count is None else count])
    for b in blobs:
        out += len(b).to_bytes(2, "big") + b
    return out


def test_events_message_round_trips_and_is_plain_json() -> None:
    frame = encode(Events(SOME), 9)
    assert decode(frame) == (9, Events(SOME))
    assert decode(encode(Events(()), 0)) == (0, Events(()))
    assert frame[10] == 2                                  # head (10 bytes), count
    first = json.loads(frame[13:13 + int.from_bytes(frame[11:13], "big")])
    assert first == SOME[0].to_json()


def test_events_message_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        encode(Events((ev(),) * (MAX_EVENTS + 1)), 0)


@pytest.mark.parametrize("body,what", [
    (_body(count=MAX_EVENTS + 1), "at most"),
    (_body(b"x" * (MAX_EVENT_BYTES + 1)), "at most"),
    (_body(b"\xff\xfe"), "UTF-8 JSON"),
    (_body(b"{not json"), "UTF-8 JSON"),
    (_body(b"[" * 5000 + b"]" * 5000), "UTF-8 JSON"),    # nesting past the recursion limit
    (_body(b"1" * 5000), "UTF-8 JSON"),                   # an integer too long to convert
    (_body(b'{"type": "ike_up", "member": -1}'), "unsigned"),
    (_body(b'{"type": "nope"}'), "unknown type"),
    (_body(b"[]"), "not an object"),
    (_body(b'{"type": "ike_up"}', count=2), "bytes"),     # the second one is missing
    (_body(b'{"type": "ike_up"}') + b"\x00", "after"),
])
def test_hostile_events_messages_are_malformed(body: bytes, what: str) -> None:
    with pytest.raises(MalformedMessage, match=what):
        decode(_frame(body))


def test_every_truncation_of_an_events_message_is_malformed() -> None:
    frame = encode(Events(SOME), 1)
    for n in range(len(frame)):
        with pytest.raises(MalformedMessage):
            decode(frame[:n])


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.binary(max_size=600) | st.builds(lambda blobs: _body(*blobs),
                                           st.lists(st.binary(max_size=80), max_size=4)))
def test_random_events_bodies_only_ever_raise_malformed(body: bytes) -> None:
    try:
        _, msg = decode(_frame(body))
    except MalformedMessage:
        return
    assert isinstance(msg, Events) and len(msg.events) <= MAX_EVENTS


@pytest.mark.fuzz
@fuzz_settings(200)
@given(st.lists(events(), max_size=5), st.data())
def test_mutated_events_messages_only_ever_raise_malformed(evs: list[Event],
                                                           data: st.DataObject) -> None:
    frame = bytearray(encode(Events(tuple(evs)), 0))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(10, len(frame) - 1)) if len(frame) > 10 else 10
        if pos < len(frame):
            frame[pos] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(frame))
    except MalformedMessage:
        pass


# -- the dispatcher takes a member's own SA events only -----------------------------------------


def test_dispatcher_publishes_a_members_own_sa_events_only() -> None:
    from tests.test_hostile_member import _rig, _say

    async def go() -> None:
        d, sent = _rig()
        before = d.events.next_seq
        _say(d, 2, Events((ev(EventType.CHILD_UP, member=2, conn="c"),)))
        got, _, _ = d.events.since(before)
        assert [(e.event.type, e.event.member) for e in got] == [(EventType.CHILD_UP, 2)]
        # an event naming another member: refused, counted, not published
        _say(d, 2, Events((ev(EventType.IKE_UP, member=3),)))
        _say(d, 2, Events((ev(EventType.IKE_UP, member=0),)))
        assert d.drops["refused_event_not_own"] == 2
        # what only the dispatcher tells: refused
        for kind in set(EventType) - MEMBER_EVENTS:
            _say(d, 2, Events((ev(kind, member=2),)))
        assert d.drops["refused_event_type"] == len(set(EventType) - MEMBER_EVENTS)
        # in a batch, the good ones go on
        _say(d, 1, Events((ev(EventType.IKE_DOWN, member=1), ev(EventType.IKE_UP, member=2),
                           ev(EventType.LEASE_RELEASED, member=1, address="10.3.0.2"))))
        assert d.drops["refused_event_not_own"] == 3
        # not on the bulk channel
        _say(d, 2, Events((ev(member=2),)), channel="bulk")
        assert d.drops["refused_bulk_not_sync"] == 1
        # a dead member's events are not published
        d.members[3].incarnation.alive = False
        _say(d, 3, Events((ev(member=3),)))
        assert d.drops["dead_member"] == 1
        # nor are those of an unauthenticated sender
        d._from_member(b"live2", 0, Events((ev(member=2),)))
        assert d.drops["refused_unauthenticated"] == 1
        got, _, _ = d.events.since(before)
        assert [(e.event.type, e.event.member) for e in got] == [
            (EventType.CHILD_UP, 2), (EventType.IKE_DOWN, 1), (EventType.LEASE_RELEASED, 1)]
        # bad bytes on the wire: a counted drop, nothing published
        d._peer = 2
        try:
            d._member_frames([b"live2", _frame(_body(b'{"type": "ike_up", "member": "2"}'))])
            d._member_frames([b"live2", encode(Events((ev(EventType.IKE_UP, member=2),)), 5)])
        finally:
            d._peer = None
        assert d.drops["wire_malformed"] == 1
        assert d.events.since(before)[0][-1].event.type is EventType.IKE_UP
        assert not sent.udp

    run_coro(go())


def test_member_process_sends_its_events_in_batches() -> None:
    from member.process import MAX_EVENTS_QUEUED, MemberProcess

    async def go() -> None:
        config = load_config(gateway_config(PORTS, 9), "gw.toml")
        mp = MemberProcess(config, 2, "inproc://events-test")
        sent: list[Any] = []
        mp.send = sent.append  # type: ignore[method-assign]
        try:
            for i in range(MAX_EVENTS + 6):
                mp._event(ev(member=2, epoch=i))
            mp._send_events()
            assert [len(m.events) for m in sent] == [MAX_EVENTS, 6]
            assert all(isinstance(m, Events) for m in sent) and not mp.events_out
            for i in range(MAX_EVENTS_QUEUED + 3):   # the dispatcher unreachable for long
                mp._event(ev(member=2, epoch=i))
            assert len(mp.events_out) == MAX_EVENTS_QUEUED
            assert mp.events_out[0].epoch == 3    # the oldest went first
        finally:
            mp.sock.close(linger=0)
            mp.bulk.close(linger=0)

    run_coro(go())


# -- the control command ----------------------------------------------------------------------


class _Backend:
    def __init__(self, n: int = 0, capacity: int = MAX_LIMIT) -> None:
        self.events = EventLog(capacity)
        for i in range(n):
            self.events.add(ev(member=i), 1000.0 + i)

    def status(self) -> dict[str, Any]:
        return {}

    def connections(self) -> list[dict[str, Any]]:
        return []

    async def ask(self, req: dict[str, Any], *, one: bool = False) -> list[dict[str, Any]]:
        return []

    async def reload(self) -> dict[str, Any]:
        return {"ok": False, "error": "x"}


def _ask(backend: _Backend, req: Any) -> dict[str, Any]:
    data = req if isinstance(req, bytes) else json.dumps(req).encode()
    return run_coro(answer(backend, data))  # type: ignore[arg-type]


def test_events_command_answers_from_since_with_next_and_dropped() -> None:
    b = _Backend(5, capacity=4)
    now = _ask(b, {"cmd": "events"})   # no since: only what comes next
    assert now == {"ok": True, "events": [], "next": 6, "dropped": 0}
    all_ = _ask(b, {"cmd": "events", "since": 0})
    assert [e["seq"] for e in all_["events"]] == [2, 3, 4, 5]
    assert all_["next"] == 6 and all_["dropped"] == 1
    assert all_["events"][0] == {"seq": 2, "time": 1001.0, "type": "ike_up", "member": 1}
    page = _ask(b, {"cmd": "events", "since": 3, "limit": 2})
    assert [e["seq"] for e in page["events"]] == [3, 4] and page["next"] == 5
    b.events.add(ev(EventType.READY), 2000.0)
    new = _ask(b, {"cmd": "events", "since": now["next"]})
    assert [e["type"] for e in new["events"]] == ["ready"] and new["next"] == 7
    json.dumps(new)   # the answer is JSON as it stands


@pytest.mark.parametrize("req", [
    {"cmd": "events", "since": -1}, {"cmd": "events", "since": "1"},
    {"cmd": "events", "since": 1.5}, {"cmd": "events", "since": True},
    {"cmd": "events", "since": 1 << 60}, {"cmd": "events", "since": 10 ** 30},
    {"cmd": "events", "since": [1]}, {"cmd": "events", "since": {}},
    {"cmd": "events", "limit": 0}, {"cmd": "events", "limit": -3},
    {"cmd": "events", "limit": MAX_LIMIT + 1}, {"cmd": "events", "limit": 10 ** 12},
    {"cmd": "events", "limit": "all"}, {"cmd": "events", "limit": False}])
def test_hostile_events_requests_get_one_line_errors(req: dict[str, Any]) -> None:
    result = _ask(_Backend(3), req)
    assert result["ok"] is False and result["error"].startswith("events: ")
    assert "\n" not in result["error"] and len(result["error"]) < 200


@pytest.mark.fuzz
@fuzz_settings(200)
@given(st.dictionaries(st.sampled_from(["since", "limit", "x"]), _JSON | st.integers(),
                       max_size=3))
def test_any_events_request_is_answered_or_refused_in_one_line(extra: dict[str, Any]) -> None:
    try:
        data = json.dumps({"cmd": "events", **extra}).encode()
    except ValueError:
        return
    result = _ask(_Backend(20, capacity=8), data)
    if result["ok"]:
        assert set(result) == {"ok", "events", "next", "dropped"}
        assert len(result["events"]) <= 8
    else:
        assert "\n" not in result["error"]


# -- SA events from the member shell, in process ----------------------------------------------


def _pair(gw_text: str | None = None,
          peer_text: str | None = None) -> tuple[Member, Member, list[Event]]:
    got: list[Event] = []
    gw = Member(load_config(gw_text or gateway_config(PORTS, 9), "gw.toml"), member_id=7,
                publish=got.append)
    peer = Member(load_config(peer_text or peer_config(PORTS), "peer.toml"), member_id=1)
    return gw, peer, got


def _types(got: list[Event]) -> list[str]:
    return [e.type.value for e in got]


def test_sa_events_up_rekeyed_down_with_member_conn_spis_and_peer() -> None:
    gw, peer, got = _pair()
    ids = peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    (sa,) = gw.engine.by_id.values()
    ours = sa.spi_r.hex()   # the gateway answered
    assert _types(got) == ["ike_up", "child_up", "child_up"]
    assert got[0] == Event(EventType.IKE_UP, member=7, conn="c", ike_spi=ours, peer="127.0.0.2")
    spis = {c.name: f"{c.spi_in:08x}" for c in sa.children.values()}
    assert {e.child: e.child_spi for e in got[1:]} == spis
    assert all(e.ike_spi == ours and e.member == 7 and e.conn == "c" for e in got)

    del got[:]
    member_control(peer, {"cmd": "rekey", "child": "gcm"}, 1.0)
    carry(gw, peer, 1.0)
    rekeyed = next(e for e in got if e.type is EventType.CHILD_REKEYED)
    (new_gcm,) = (c for c in sa.children.values() if c.name == "gcm")
    assert (rekeyed.child, rekeyed.child_spi, rekeyed.new_spi) == (
        "gcm", spis["gcm"], f"{new_gcm.spi_in:08x}")
    assert "child_down" in _types(got)   # the old one, once replaced

    del got[:]
    member_control(peer, {"cmd": "rekey", "ike": str(ids[0])}, 2.0)
    carry(gw, peer, 2.0)
    (new_sa,) = gw.engine.by_id.values()
    assert _types(got)[:2] == ["ike_rekeyed", "ike_down"]
    assert (got[0].ike_spi, got[0].new_spi) == (ours, new_sa.spi_r.hex())
    assert got[1].ike_spi == ours

    del got[:]
    peer.engine.delete_ike(next(iter(peer.engine.by_id)), 3.0)
    carry(gw, peer, 3.0)
    assert sorted(_types(got)) == ["child_down", "child_down", "ike_down"]
    assert all(e.ike_spi == new_sa.spi_r.hex() and e.reason for e in got)


def test_failed_ike_sa_is_an_ike_failed_event_with_the_reason() -> None:
    gw, peer, got = _pair(peer_text=peer_config(PORTS, psk="a-wrong-psk-0123456789abcdef"))
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    (failed,) = got
    assert failed.type is EventType.IKE_FAILED and failed.peer == "127.0.0.2"
    assert "auth" in failed.reason.lower() and failed.member == 7


def test_an_ike_sa_init_with_no_common_proposal_is_an_ike_failed_event() -> None:
    """The responder keeps no SA for it (ike_id 0, no SPI), yet the attempt
    failed: IKE_FAILED names the connection, the peer and both proposals."""
    theirs = "aes256gcm16-prfsha384-ecp384"
    gw, peer, got = _pair(peer_text=peer_config(PORTS).replace(
        "aes128gcm16-prfsha256-ecp256", theirs))
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    (failed,) = got
    assert failed.type is EventType.IKE_FAILED and failed.ike_spi == ""
    assert (failed.member, failed.conn, failed.peer) == (7, "c", "127.0.0.2")
    assert failed.reason.startswith("no common proposal (NO_PROPOSAL_CHOSEN)")
    assert theirs in failed.reason and "aes128gcm16-prfsha256-ecp256" in failed.reason
    assert not gw.engine.by_id


def test_a_virtual_ip_is_released_once_when_its_ike_sa_goes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_pools import _request_vip

    _request_vip(monkeypatch)
    wide = replace(CONN, children=tuple(
        replace(c, remote_ts="10.91.0.0/16") if c.remote_ts == "10.91.1.0/24" else c
        for c in CONN.children))
    gw_text = gateway_config(PORTS, 9, conn=replace(wide, options={"pools": ["rw"]}),
                             pools={"rw": {"addrs": "10.91.0.0/23"}})
    gw, peer, got = _pair(gw_text, peer_config(PORTS, conn=wide))
    ids = peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    ((lease,),) = (sa.leases for sa in gw.engine.by_id.values())
    member_control(peer, {"cmd": "rekey", "ike": str(ids[0])}, 1.0)   # the lease follows
    carry(gw, peer, 1.0)
    assert EventType.LEASE_RELEASED.value not in _types(got)
    peer.engine.delete_ike(next(iter(peer.engine.by_id)), 2.0)
    carry(gw, peer, 2.0)
    released = [e for e in got if e.type is EventType.LEASE_RELEASED]
    assert [(e.address, e.conn, e.member) for e in released] == [(str(lease.address), "c", 7)]


def test_the_gateway_publishes_its_members_events() -> None:
    from dispatcher.gateway import Gateway

    gw = Gateway(load_config(gateway_config(PORTS, 9), "gw.toml"))
    publish = gw.member.sa_log.publish
    assert publish is not None
    publish(ev(member=1))
    assert [e.event.type for e in gw.events.since(1)[0]] == [EventType.IKE_UP]


# -- real processes ------------------------------------------------------------------------------


def stream(config: Path, since: int = 1) -> list[dict[str, Any]]:
    """Every event the gateway or cluster at ``config`` holds from ``since``."""
    from tests.cluster_util import ask

    out: list[dict[str, Any]] = []
    while True:
        got = ask(config, json.dumps({"cmd": "events", "since": since}).encode())
        assert got["ok"] is True, got
        out += got["events"]
        if not got["events"]:
            return out
        since = got["next"]


def wait_event(config: Path, what: str, match: Any, timeout: float = 10.0,
               diag: Any = lambda: "") -> dict[str, Any]:
    """The first event in the stream for which ``match(event)`` holds."""
    from tests.cluster_util import wait_for

    return wait_for(what, lambda: next((e for e in stream(config) if match(e)), None),
                    timeout=timeout, diag=lambda: f"{stream(config)}\n{diag()}")


@pytest.mark.interop
def test_single_gateway_events_against_strongswan(lab: Any, tmp_path: Path) -> None:
    from tests.interop_gw import OurProcess, gateway_toml
    from tests.lab.charon import Child, Conn, render_swanctl_conf

    ns_a, ns_b, _veth = lab.pair()
    lab.add_lo_addr(ns_a, "10.91.1.1")   # (charon routes its child's traffic from it)
    gw = OurProcess(lab, ns_b, gateway_toml(), tmp_path)
    cfg = gw.config
    wait_event(cfg, "READY", lambda e: e["type"] == "ready", diag=gw.log_text)
    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [
        Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16")])))
    charon.initiate(child="net-gcm", ike="a-b")
    ike = charon.ike_sa("a-b")
    assert ike is not None
    up = wait_event(cfg, "IKE_UP", lambda e: e["type"] == "ike_up")
    assert _spi(up["ike_spi"]) == _spi(ike["responder-spi"]) and up["peer"] == "198.18.0.1"
    assert up["conn"] == "a-b" and up["member"] == 1
    (kid,) = charon.child_sas()
    child_up = wait_event(cfg, "CHILD_UP", lambda e: e["type"] == "child_up")
    assert int(child_up["child_spi"], 16) == int(kid["spi-out"], 16)
    assert child_up["child"] == "net-gcm" and child_up["ike_spi"] == up["ike_spi"]

    new = charon.rekey_child("net-gcm")
    rekeyed = wait_event(cfg, "CHILD_REKEYED", lambda e: e["type"] == "child_rekeyed")
    assert int(rekeyed["new_spi"], 16) == int(new["spi-out"], 16)
    assert rekeyed["child_spi"] == child_up["child_spi"]
    new_ike = charon.rekey_ike("a-b")
    ike_rekeyed = wait_event(cfg, "IKE_REKEYED", lambda e: e["type"] == "ike_rekeyed")
    assert (_spi(ike_rekeyed["ike_spi"]), _spi(ike_rekeyed["new_spi"])) == (
        _spi(ike["responder-spi"]), _spi(new_ike["responder-spi"]))

    charon.terminate_ike("a-b")
    down = wait_event(cfg, "IKE_DOWN of the rekeyed SA", lambda e: e["type"] == "ike_down"
                      and _spi(e["ike_spi"]) == _spi(new_ike["responder-spi"]))
    assert down["reason"]
    seen = [e["type"] for e in stream(cfg)]
    assert seen[0] == "ready" and "child_down" in seen[seen.index("ike_rekeyed"):]
    seqs = [e["seq"] for e in stream(cfg)]
    assert seqs == list(range(1, len(seqs) + 1))

    # the CLI: one line each; JSON lines with --json
    text = subprocess.run(
        [*_cli(), "events", "--config", str(cfg)], capture_output=True, text=True,
        timeout=30, cwd=ROOT, check=True).stdout
    assert "ike_rekeyed" in text and len(text.splitlines()) == len(seqs)
    lines = subprocess.run(
        [*_cli(), "events", "--config", str(cfg), "--json", "--since", str(seqs[-2])],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=True).stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == seqs[-2:]


def _spi(text: str) -> int:
    return int(text.replace(":", ""), 16)


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "dispatcher.cli"]


@pytest.mark.interop
@pytest.mark.slow
def test_cluster_events_name_the_member_that_owns_the_sa(lab: Any, tmp_path: Path) -> None:
    from tests.cluster_util import DEAD_AFTER, sas, status, wait_for
    from tests.interop_gw import OurProcess, gateway_toml
    from tests.lab.charon import Child, Conn, render_swanctl_conf

    ns_a, ns_b, _veth = lab.pair()
    for addr in ("10.91.1.1", "10.91.11.1"):
        lab.add_lo_addr(ns_a, addr)
    children = [("net-gcm", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),
                ("net-ctr", "10.91.12.0/24", "10.91.11.0/24", "aes128ctr-sha256")]
    gw = OurProcess(lab, ns_b, gateway_toml(
        children=children, extra=f"members = 3\ndead_after = {DEAD_AFTER}"), tmp_path)
    cfg = gw.config
    wait_event(cfg, "READY", lambda e: e["type"] == "ready", timeout=15, diag=gw.log_text)
    wait_for("3 members with segments", lambda: sum(
        m["alive"] and m["segments"] > 0 for m in status(cfg)["members"]) == 3,
        timeout=15, diag=lambda: gw.log_text()[-3000:])
    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [
        Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16"),
        Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24", esp_proposals="aes128ctr-sha256")])))
    charon.initiate(child="net-gcm", ike="a-b")
    charon.initiate(child="net-ctr", ike="a-b")
    ike = charon.ike_sa("a-b")
    assert ike is not None
    up = wait_event(cfg, "IKE_UP", lambda e: e["type"] == "ike_up", diag=gw.log_text)
    owner = {s["member"] for m in sas(cfg)["members"] for s in m["ike_sas"]
             if s["state"] == "ESTABLISHED" and _spi(s["spi_r"]) == _spi(ike["responder-spi"])}
    assert owner == {up["member"]} and _spi(up["ike_spi"]) == _spi(ike["responder-spi"])

    def two_up() -> list[dict[str, Any]] | None:
        kids = [e for e in stream(cfg) if e["type"] == "child_up"]
        return kids if len(kids) == 2 else None

    kids = wait_for("two CHILD_UP", two_up, timeout=10)
    # the IKE SA's owner negotiated both (it places them; ``sas`` shows the carriers)
    assert {k["member"] for k in kids} == {up["member"]}
    assert {int(k["child_spi"], 16) for k in kids} == {
        int(c["spi-out"], 16) for c in charon.child_sas()}
    new = charon.rekey_child("net-ctr")
    rekeyed = wait_event(cfg, "CHILD_REKEYED", lambda e: e["type"] == "child_rekeyed")
    assert rekeyed["member"] == up["member"]
    assert int(rekeyed["new_spi"], 16) == int(new["spi-out"], 16)
    charon.terminate_ike("a-b")
    down = wait_event(cfg, "IKE_DOWN", lambda e: e["type"] == "ike_down")
    assert down["member"] == up["member"] and down["ike_spi"] == up["ike_spi"]
    ready = [e for e in stream(cfg) if e["type"] == "ready"]
    assert len(ready) == 1 and ready[0]["seq"] == 1 and "member" not in ready[0]
    assert not any(k.startswith("refused_event") for k in status(cfg)["dispatcher"]["drops"])
