"""Hostile dispatcher messages fed to a member in-process: a ``MemberProcess``
(its ``Member`` and ``Replicator``) behind a recorded ``send``, no sockets
used. Unknown transforms, keys of the wrong length, reserved SPIs, bad
selectors, a child in a segment not ours, forged and malformed replicas then
their takeover, tables going back in time, heartbeats changing our sender id,
the 32-byte IKE datagram, and exceptions nobody foresaw (injected): nothing
raises out of the handler, the refusal counters move by reason, the state is
unchanged. The gateway and the dispatcher's members loop are the same kind
of barrier; member/refusals.py rate-limits what they log."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from bench.harness import configs
from bench.harness.procs import run_coro
from common.cluster.segments import SegmentMove, SegmentTable
from common.cluster.stats import MemberStats, StatusReport
from common.cluster.sync import (
    Ack,
    ChildRecord,
    ChildState,
    EspCounter,
    EspCounters,
    IkeSaState,
    SyncMessage,
    decode_sync,
    encode_sync,
)
from common.cluster.wire import (
    Channel,
    ChildPush,
    Datagram,
    DatagramIn,
    Heartbeat,
    Hello,
    InnerIn,
    Message,
    Notice,
    NoticeKind,
    Sync,
    TableUpdate,
    encode,
)
from common.config import load_config
from common.ike.constants import TsType
from common.ike.context import ChildState as ChildSaState
from common.ike.context import IkeState
from common.ike.sa import IkeSa
from common.ike.ts import TrafficSelector
from member.process import EXIT_REFUSED, EXIT_REJOIN, EXIT_REPLACED, MemberProcess
from member.refusals import Refusals
from tests.fuzz import fuzz_settings

CONFIG = configs.dumps(configs.gateway_config(
    {"address": "198.18.0.2", "inside": "udp:127.0.0.1:9", "members": 3, "log_level": "warning"},
    [configs.Conn("c", "gw.test", "peer.test",
                  (configs.Child("net", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),),
                  proposals="aes128gcm16-prfsha256-x25519")],
    psk="hostile-member-input-psk-0123456789", start_action=None))
ME, OTHER, THIRD = 1, 2, 3
BITS = 8
#: with assign([1, 2, 3]): segment s is owned by member s % 3 + 1, backed up by the next
OWN_SEGMENT, BACKED_UP_SEGMENT, FOREIGN_SEGMENT = 0, 2, 1
SENDER_ID = 5
#: the 32-byte IKE_SA_INIT whose only payload is SK
ATTACK = bytes.fromhex("0102030405060708" "0000000000000000" "2e202208" "00000000"
                       "00000020" "00000004")
TS4 = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                      ipaddress.IPv4Address("10.91.1.0"), ipaddress.IPv4Address("10.91.1.255"))
TS4_OURS = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                           ipaddress.IPv4Address("10.91.2.0"),
                           ipaddress.IPv4Address("10.91.2.255"))


def esp_spi(segment: int, low: int = 0x1234) -> int:
    return (segment << (32 - BITS)) | low


def ike_spi(segment: int, low: int = 0x42) -> bytes:
    return ((segment << (64 - BITS)) | low).to_bytes(8, "big")


def table() -> SegmentTable:
    t = SegmentTable(BITS)
    t.assign([ME, OTHER, THIRD])
    return t


class Rig:
    """A member process in a running loop, ``send`` recorded."""

    def __init__(self, mp: MemberProcess) -> None:
        self.mp = mp
        self.sent: list[Message] = []
        mp.send = self.sent.append  # type: ignore[method-assign]
        mp.send_bulk = self.sent.append  # type: ignore[method-assign]

    @property
    def refused(self) -> dict[str, int]:
        return dict(self.mp.refusals.counts)

    def bugs(self) -> dict[str, int]:
        return {k: v for k, v in self.refused.items() if k.startswith("bug.")}

    def frame(self, msg: Message, seq: int = 0) -> None:
        self.mp._frame(encode(msg, seq))

    def sync(self, src: int, msg: SyncMessage, seq: int = 0, channel: str = "live") -> None:
        env = Sync(ME, src, seq, encode_sync(msg))
        if channel == "live":
            self.frame(env)
        else:
            self.mp._bulk_frame(encode(env, seq))

    def acks(self) -> list[int]:
        out = []
        for m in self.sent:
            if isinstance(m, Sync):
                inner = decode_sync(m.payload)
                if isinstance(inner, Ack):
                    out.append(inner.seq)
        return out

    def state(self) -> tuple[Any, ...]:
        m, rep = self.mp.member, self.mp.replicator
        assert m is not None and rep is not None
        return (set(m.by_spi), set(rep.child_replicas), set(rep.ike_replicas),
                set(m.engine.sas), self.mp.table.epoch if self.mp.table else None,
                self.mp.sender_id)


def run_in_loop(body: Callable[[Rig], None]) -> Rig:
    async def go() -> Rig:
        mp = MemberProcess(load_config(CONFIG, "hostile.toml"), ME, "ipc:///nonexistent")
        mp.loop = asyncio.get_running_loop()
        rig = Rig(mp)
        rig.frame(Heartbeat(0, SENDER_ID, 1, 0, {}))
        rig.frame(TableUpdate(table()))
        try:
            body(rig)
        finally:
            mp._timer.cancel()
            mp.sock.close(linger=0)
            mp.bulk.close(linger=0)
        return rig
    return run_coro(go())


def push(segment: int = OWN_SEGMENT, **kw: Any) -> ChildPush:
    base = ChildPush(esp_spi(segment), 1, "net", esp_spi(segment), 0xC0FFEE00, "aes128gcm16",
                     False, b"i" * 20, b"o" * 20, (TS4_OURS,), (TS4,), b"\xc6\x12\x00\x01",
                     4500, ike_spi(OWN_SEGMENT))
    return replace(base, **kw)


def child_state(segment: int = BACKED_UP_SEGMENT, **kw: Any) -> ChildState:
    base = ChildState(esp_spi(segment), 0xC0FFEE01, "net", "aes128gcm16", False, b"i" * 20,
                      b"o" * 20, (TS4_OURS,), (TS4,), b"\xc6\x12\x00\x01", 4500,
                      ike_spi(BACKED_UP_SEGMENT), 100, 64, 90, 0xFF)
    return replace(base, **kw)


def ike_state(segment: int = BACKED_UP_SEGMENT, **kw: Any) -> IkeSaState:
    """A replica the member can adopt (aes128gcm16-prfsha256-x25519)."""
    child = ChildRecord("net", esp_spi(segment), 0xC0FFEE01, "aes128gcm16", False, 0,
                        ChildSaState.INSTALLED.value, -1.0, (TS4_OURS,), (TS4,))
    base = IkeSaState(b"\x11" * 8, ike_spi(segment), False, IkeState.ESTABLISHED.value, "c",
                      b"\xc6\x12\x00\x01", 4500, 4500, 20, 128, 5, 0, 31, b"d" * 32, b"", b"",
                      b"e" * 20, b"f" * 20, b"p" * 32, b"q" * 32, 2, b"peer.test", False, 2, 2,
                      1, b"resp", b"g" * 32, 100.0, (child,), False)
    return replace(base, **kw)


# -- CHILD_PUSH ---------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "reason"), [
    ({"transform": "des-md5"}, "push_unknown_transform"),
    ({"transform": ""}, "push_unknown_transform"),
    ({"keymat_in": b"short"}, "push_bad_key_length"),
    ({"keymat_out": b"x" * 52}, "push_bad_key_length"),
    ({"spi_out": 255}, "push_bad_spi"),
    ({"spi_in": 7, "child_id": 7}, "push_bad_spi"),
    ({"local_ts": ()}, "push_bad_selectors"),
    ({"remote_port": 0}, "push_bad_remote"),
])
def test_a_bad_child_push_is_refused_and_nothing_is_installed(change: dict[str, Any],
                                                              reason: str) -> None:
    def body(rig: Rig) -> None:
        before = rig.state()
        rig.frame(push(**change))
        assert rig.state() == before
        rig.frame(push(BACKED_UP_SEGMENT, **change))   # nor kept as a replica
        assert rig.state() == before

    rig = run_in_loop(body)
    if reason == "push_bad_spi" and "spi_in" in change:
        # SPI 7 lies in segment 0 (ours) and is refused before the segment is looked at
        assert rig.refused.get(reason) == 2
    else:
        assert rig.refused.get(reason) == 2, rig.refused
    assert not rig.bugs()


def test_a_push_for_a_segment_neither_owned_nor_backed_up_is_refused() -> None:
    def body(rig: Rig) -> None:
        before = rig.state()
        rig.frame(push(FOREIGN_SEGMENT))
        assert rig.state() == before
        rig.frame(push())   # the same child in our segment: carried
        m = rig.mp.member
        assert m is not None and esp_spi(OWN_SEGMENT) in m.by_spi

    rig = run_in_loop(body)
    assert rig.refused == {"push_not_ours": 1}


def test_an_empty_selector_range_is_a_malformed_frame() -> None:
    empty = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                            ipaddress.IPv4Address("10.0.0.9"), ipaddress.IPv4Address("10.0.0.1"))

    def body(rig: Rig) -> None:
        before = rig.state()
        rig.frame(push(remote_ts=(empty,)))
        assert rig.state() == before

    rig = run_in_loop(body)
    assert rig.refused == {"wire_malformed": 1}


_TRANSFORMS = st.sampled_from(["aes128gcm16", "aes256gcm16", "aes128ctr-sha256", "x", ""])
_KEYS = st.sampled_from([0, 1, 20, 36, 52, 68, 300]).map(lambda n: b"k" * n)
_SPIS = st.one_of(st.integers(0, 300), st.integers(0, 0xFFFF_FFFF))


@pytest.mark.fuzz
@fuzz_settings(100)
@given(transform=_TRANSFORMS, k_in=_KEYS, k_out=_KEYS, spi_in=_SPIS, spi_out=_SPIS,
       port=st.integers(0, 0xFFFF), n_ts=st.integers(0, 2), ike=st.sampled_from([0, 8]))
def test_random_child_pushes_never_reach_the_barrier(transform: str, k_in: bytes,
                                                     k_out: bytes, spi_in: int, spi_out: int,
                                                     port: int, n_ts: int, ike: int) -> None:
    """Validation is complete: whatever the fields, a push is installed, kept
    or refused by reason, never an exception caught by the barrier."""
    def body(rig: Rig) -> None:
        rig.frame(push(transform=transform, keymat_in=k_in, keymat_out=k_out, spi_in=spi_in,
                       child_id=spi_in, spi_out=spi_out, remote_port=port,
                       local_ts=(TS4_OURS,) * n_ts, ike_spi=b"s" * ike))

    rig = run_in_loop(body)
    assert not rig.bugs(), rig.refused


# -- replicas (SYNC) and their takeover ----------------------------------------------------


def test_a_forged_replica_is_neither_stored_nor_acked() -> None:
    def body(rig: Rig) -> None:
        before = rig.state()
        # member 2 speaks for an IKE SA and a child of member 3's segment
        rig.sync(OTHER, ike_state(), seq=0)
        rig.sync(OTHER, child_state(), seq=1)
        assert rig.state() == before
        assert rig.acks() == []
        # the owner itself: stored and acknowledged
        rig.sync(THIRD, ike_state(), seq=0)
        rig.sync(THIRD, child_state(), seq=1)
        assert rig.acks() == [0]
        rep = rig.mp.replicator
        assert rep is not None
        assert set(rep.ike_replicas) == {ike_spi(BACKED_UP_SEGMENT)}
        assert set(rep.child_replicas) == {esp_spi(BACKED_UP_SEGMENT)}

    rig = run_in_loop(body)
    assert rig.refused == {"sync_not_owner": 2}


@pytest.mark.parametrize(("msg", "reason"), [
    (ike_state(encr=12, key_bits=128), "sync_ike_unknown_suite"),
    (ike_state(sk_ei=b"e" * 19), "sync_ike_bad_key_length"),
    (ike_state(policy="nope"), "sync_ike_unknown_policy"),
    (ike_state(state=IkeState.HALF_OPEN.value), "sync_ike_bad_state"),
    (ike_state(state=99), "sync_ike_bad_state"),
    (ike_state(local_port=1234), "sync_ike_bad_address"),
    (ike_state(peer_id_type=200), "sync_ike_bad_identity"),
    (ike_state(rekey_in=1e12), "sync_ike_bad_timer"),
    (ike_state(children=(ChildRecord("net", 7, 0xC0FFEE01, "aes128gcm16", False, 0, 1, -1.0,
                                     (TS4_OURS,), (TS4,)),)), "sync_ike_bad_child"),
    (ike_state(children=(ChildRecord("net", esp_spi(2), 0xC0FFEE01, "rot13", False, 0, 1,
                                     -1.0, (TS4_OURS,), (TS4,)),)), "sync_ike_bad_child"),
    (child_state(transform="rot13"), "sync_child_unknown_transform"),
    (child_state(keymat_out=b"o" * 19), "sync_child_bad_key_length"),
    (child_state(out_seq=0), "sync_child_bad_seq"),
    (child_state(out_seq=1 << 40), "sync_child_bad_seq"),
    (child_state(replay_size=0, replay_bitmap=0), "sync_child_bad_window"),
])
def test_a_replica_with_a_field_out_of_range_is_refused(msg: SyncMessage, reason: str) -> None:
    def body(rig: Rig) -> None:
        before = rig.state()
        rig.sync(THIRD, msg)
        assert rig.state() == before
        assert rig.acks() == []

    rig = run_in_loop(body)
    assert rig.refused == {reason: 1}


_IKE_FIELDS = st.fixed_dictionaries({
    "state": st.integers(0, 12), "encr": st.sampled_from([12, 13, 20, 28, 99]),
    "key_bits": st.sampled_from([0, 128, 192, 256]), "prf": st.sampled_from([0, 2, 5, 6, 7]),
    "integ": st.sampled_from([0, 2, 12, 13]), "dh": st.sampled_from([0, 14, 19, 31, 99]),
    "sk_d": st.sampled_from([b"", b"d" * 32, b"d" * 48]),
    "sk_ei": st.sampled_from([b"e" * 16, b"e" * 20, b"e" * 36]),
    "local_port": st.sampled_from([0, 500, 4500, 9999]), "peer_id_type": st.integers(0, 20),
    "send_next": st.integers(0, (1 << 32) - 1), "response_id": st.integers(-1, (1 << 32) - 1),
    "rekey_in": st.one_of(st.just(-1.0), st.floats(0, 1e10)),
})
_CHILD_FIELDS = st.fixed_dictionaries({
    "transform": _TRANSFORMS, "keymat_in": _KEYS, "out_seq": st.integers(0, (1 << 64) - 1),
    "replay_size": st.sampled_from([0, 32, 64, 1024, 65536]),
    "replay_highest": st.integers(0, (1 << 64) - 1), "esn": st.booleans(),
})


@pytest.mark.fuzz
@fuzz_settings(60)
@given(ike=_IKE_FIELDS, child=_CHILD_FIELDS)
def test_random_replicas_then_their_takeover_never_reach_the_barrier(
        ike: dict[str, Any], child: dict[str, Any]) -> None:
    """Every replica the owner sends is stored (and adopted at the takeover)
    or refused by reason: validation, not the barrier, stands between a
    replica and the engine."""
    def body(rig: Rig) -> None:
        rig.sync(THIRD, ike_state(**ike), seq=0)
        rig.sync(THIRD, child_state(**child), seq=1)
        rep, m = rig.mp.replicator, rig.mp.member
        assert rep is not None and m is not None
        stored = (set(rep.ike_replicas), set(rep.child_replicas))
        assert bool(rig.acks()) == bool(stored[0])
        t = table()
        t.fail_over(THIRD)
        rig.frame(TableUpdate(t))
        assert set(m.engine.sas) >= stored[0] and set(m.by_spi) == stored[1]

    rig = run_in_loop(body)
    assert not rig.bugs(), rig.refused


def test_esp_counters_from_a_non_owner_or_out_of_range_leave_the_replica() -> None:
    def body(rig: Rig) -> None:
        rig.sync(THIRD, child_state(), seq=0)
        rep = rig.mp.replicator
        assert rep is not None
        kept = rep.child_replicas[esp_spi(BACKED_UP_SEGMENT)]
        rig.sync(OTHER, EspCounters((EspCounter(esp_spi(BACKED_UP_SEGMENT), 500, 400, 1),)))
        rig.sync(THIRD, EspCounters((EspCounter(esp_spi(BACKED_UP_SEGMENT), 1 << 50, 400, 1),)),
                 seq=1)
        assert rep.child_replicas[esp_spi(BACKED_UP_SEGMENT)] == kept

    rig = run_in_loop(body)
    assert rig.refused == {"sync_bad_counters": 2}


def test_the_takeover_of_bad_replicas_refuses_them_and_adopts_the_rest() -> None:
    """Replicas stored by an older version (or corrupted in memory): the
    takeover checks each one again; one bad replica, or one whose adoption
    raises, never stops the others."""
    def body(rig: Rig) -> None:
        rep, m = rig.mp.replicator, rig.mp.member
        assert rep is not None and m is not None
        good_ike = ike_state()
        rig.sync(THIRD, good_ike, seq=0)
        rig.sync(THIRD, child_state(), seq=1)
        bad_key = ike_spi(BACKED_UP_SEGMENT, 0x99)
        rep.ike_replicas[bad_key] = ike_state(spi_r=bad_key, sk_d=b"")
        rep.child_replicas[esp_spi(BACKED_UP_SEGMENT, 0x99)] = child_state(
            spi_in=esp_spi(BACKED_UP_SEGMENT, 0x99), transform="rot13")
        raising_key = ike_spi(BACKED_UP_SEGMENT, 0x77)
        rep.ike_replicas[raising_key] = ike_state(spi_r=raising_key)
        real_adopt = m.engine.adopt

        def adopt(sa: IkeSa, now: float, **kw: Any) -> Any:
            if sa.spi_r == raising_key:
                raise RuntimeError("nobody foresaw this")
            return real_adopt(sa, now, **kw)

        m.engine.adopt = adopt  # type: ignore[method-assign]
        t = table()
        t.fail_over(THIRD)
        rig.frame(TableUpdate(t))
        assert set(m.engine.sas) >= {ike_spi(BACKED_UP_SEGMENT)}
        assert bad_key not in m.engine.sas and raising_key not in m.engine.sas
        assert set(m.by_spi) == {esp_spi(BACKED_UP_SEGMENT)}
        assert not rep.ike_replicas and not rep.child_replicas

    rig = run_in_loop(body)
    assert rig.refused == {"takeover_ike_bad_key_length": 1,
                           "takeover_child_unknown_transform": 1,
                           "bug.takeover_ike.RuntimeError": 1}, rig.refused


def test_a_bulk_replica_that_overtakes_its_table_waits_for_it() -> None:
    """The bulk channel is its own connection: a new owner's state can arrive
    before the TABLE that made it the owner. It is kept and checked again
    when the table comes, then stored (or refused)."""
    def body(rig: Rig) -> None:
        rep = rig.mp.replicator
        assert rep is not None
        # member 2 is about to own segment 2 (still member 3's in our table)
        rig.sync(OTHER, ike_state(), channel="bulk")
        rig.sync(OTHER, child_state(), channel="bulk", seq=1)
        assert not rep.ike_replicas and len(rep.parked) == 2
        t = table()
        t.apply([SegmentMove(BACKED_UP_SEGMENT, THIRD, OTHER, ME)])
        rig.frame(TableUpdate(t))
        assert set(rep.ike_replicas) == {ike_spi(BACKED_UP_SEGMENT)}
        assert set(rep.child_replicas) == {esp_spi(BACKED_UP_SEGMENT)}
        assert not rep.parked
        # what is still not from the owner after the table is refused
        rig.sync(THIRD, ike_state(spi_r=ike_spi(BACKED_UP_SEGMENT, 0x55)), channel="bulk",
                 seq=2)
        rig.frame(TableUpdate(t))

    rig = run_in_loop(body)
    assert rig.refused == {"sync_not_owner": 1}


# -- TABLE, HEARTBEAT -----------------------------------------------------------------------


def test_a_table_going_back_in_time_or_of_other_segment_bits_is_refused() -> None:
    def body(rig: Rig) -> None:
        newer = table()
        newer.fail_over(THIRD)
        rig.frame(TableUpdate(newer))
        before = rig.state()
        rig.frame(TableUpdate(table()))                 # an old epoch, replayed
        other = SegmentTable(BITS + 1)
        other.assign([ME, OTHER])
        other.fail_over(OTHER)
        other.fail_over(ME)
        rig.frame(TableUpdate(other))
        assert rig.state() == before

    rig = run_in_loop(body)
    assert rig.refused == {"table_epoch_backwards": 1, "table_bad_segment_bits": 1}


def test_a_heartbeat_cannot_change_our_sender_id_and_bad_loads_are_left_out() -> None:
    def body(rig: Rig) -> None:
        before = rig.state()
        rig.frame(Heartbeat(0, SENDER_ID + 1, 1, 0, {}))
        rig.frame(Heartbeat(3, SENDER_ID, 1, 0, {}))
        rig.frame(Heartbeat(0, SENDER_ID, 1, 0, {2: 4, 65: 1, 99: 1, 0xFFFF: 1}))
        assert rig.state() == before
        assert rig.mp.loads == {2: 4}

    rig = run_in_loop(body)
    assert rig.refused == {"heartbeat_sender_id_changed": 1, "heartbeat_not_from_dispatcher": 1,
                           "heartbeat_bad_load": 1}


# -- datagrams, inner packets, timers: the barrier ------------------------------------------


def test_the_32_byte_ike_datagram_does_not_stop_the_batch() -> None:
    def body(rig: Rig) -> None:
        peer = b"\xc6\x12\x00\x01"
        rig.frame(DatagramIn([Datagram(500, peer, 500, ATTACK),
                              Datagram(4500, peer, 4500, bytes(4) + ATTACK),
                              Datagram(500, peer, 500, ATTACK)]))
        m = rig.mp.member
        assert m is not None and m.counters["ike_in"] == 3
        assert m.spis.next_ike_segment is None

    rig = run_in_loop(body)
    # refused by the barrier (bug.ike.*) or dropped by the engine itself: counted
    m = rig.mp.member
    assert m is not None
    assert sum(rig.bugs().values()) + sum(m.engine.drops.values()) >= 3


def test_an_exception_in_any_handler_is_counted_and_logged_once_with_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ipsec_cluster.member")

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("nobody foresaw this")

    def body(rig: Rig) -> None:
        m = rig.mp.member
        assert m is not None
        rig.frame(push())
        spi = esp_spi(OWN_SEGMENT)
        m.handle_esp_batch = boom  # type: ignore[method-assign]
        m.handle_inner_batch = boom  # type: ignore[method-assign]
        m.handle_timer = boom  # type: ignore[method-assign]
        esp = spi.to_bytes(4, "big") + bytes(40)
        for _ in range(50):
            rig.frame(DatagramIn([Datagram(4500, b"\xc6\x12\x00\x01", 4500, esp)] * 2))
            rig.frame(InnerIn([b"\x45" + bytes(19)]))
        rig.mp._fire()
        assert rig.mp._timer._handle is not None   # re-armed after the failure
        rig.mp.flush = boom  # type: ignore[method-assign]
        rig.frame(Heartbeat(0, SENDER_ID, 1, 0, {}))

    rig = run_in_loop(body)
    # (the barrier of the ESP and cleartext paths is the burst: one compiled
    # call per SA per burst, so a failure loses that burst and counts once)
    assert rig.bugs() == {"bug.esp.RuntimeError": 50, "bug.inner.RuntimeError": 50,
                          "bug.timer.RuntimeError": 1, "bug.heartbeat.RuntimeError": 1}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4, [r.getMessage() for r in errors]
    assert sum(1 for r in errors if r.exc_info) == 4
    # the counts travel to the dispatcher in the member's heartbeat
    assert rig.mp.stats().refused["bug.esp.RuntimeError"] == 50


def test_the_heartbeat_task_outlives_a_failing_tick() -> None:
    async def go() -> int:
        mp = MemberProcess(load_config(CONFIG, "hostile.toml"), ME, "ipc:///nonexistent")
        mp.loop = asyncio.get_running_loop()
        mp.config = replace(mp.config, cluster=replace(mp.config.cluster,
                                                       heartbeat_interval=0.01))

        def boom() -> MemberStats:
            raise RuntimeError("stats")

        mp.stats = boom  # type: ignore[method-assign]
        mp.sender_id = 7   # joined: every tick sends a heartbeat (with the stats)
        task = asyncio.ensure_future(mp.heartbeats())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while mp.refusals.counts["bug.heartbeat.RuntimeError"] < 3 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        alive = not task.done()
        mp.stop()
        task.cancel()
        mp.sock.close(linger=0)
        mp.bulk.close(linger=0)
        assert alive
        return mp.refusals.counts["bug.heartbeat.RuntimeError"]

    assert run_coro(go()) >= 3   # three ticks failed, the task went on


# -- notices, reattach, the orphan bound ------------------------------------------------------


class Exited(Exception):
    pass


def _exits(rig: Rig) -> list[tuple[int, str]]:
    """``_exit`` recorded (and the handling stopped) instead of the process ended."""
    calls: list[tuple[int, str]] = []

    def fake(status: int, line: str) -> None:
        calls.append((status, line))
        raise Exited

    rig.mp._exit = fake  # type: ignore[method-assign]
    return calls


def test_notices_end_the_incarnation_with_the_status_its_supervisor_reads() -> None:
    def body(rig: Rig) -> None:
        calls = _exits(rig)
        # not ours (another incarnation's sender id): counted, nothing else
        rig.frame(Notice(NoticeKind.DEAD, SENDER_ID + 1, "x"))
        assert rig.refused.get("notice_not_ours") == 1 and not calls
        for kind, status in ((NoticeKind.DEAD, EXIT_REJOIN),
                             (NoticeKind.REPLACED, EXIT_REPLACED),
                             (NoticeKind.REFUSED, EXIT_REFUSED)):
            rig.mp._frame(encode(Notice(kind, SENDER_ID if kind is not NoticeKind.REFUSED
                                        else 0, "why"), 0))
            assert calls[-1][0] == status and "why" in calls[-1][1]
        assert not rig.bugs() or set(rig.bugs()) == {"bug.notice.Exited"}
        # UNKNOWN: ask to be kept (a reattach HELLO: sender id, token, table)
        rig.sent.clear()
        rig.frame(Notice(NoticeKind.UNKNOWN, SENDER_ID, ""))
        hellos = [m for m in rig.sent if isinstance(m, Hello)]
        assert len(hellos) == 1
        h = hellos[0]
        assert (h.channel, h.sender_id, h.table) == (Channel.LIVE, SENDER_ID, table())
        assert h.timing is not None and h.timing.dead_after == rig.mp.config.cluster.dead_after
        rig.frame(Notice(NoticeKind.UNKNOWN, SENDER_ID, ""))   # at most once an interval
        assert len([m for m in rig.sent if isinstance(m, Hello)]) == 1
    run_in_loop(body)


def test_silence_makes_a_member_reattach_then_stop_after_orphan_after() -> None:
    def body(rig: Rig) -> None:
        calls = _exits(rig)
        mp = rig.mp
        assert mp.loop is not None
        c = mp.config.cluster
        rig.sent.clear()
        mp._heartbeat_tick()                    # just heard the dispatcher: a heartbeat
        assert not any(isinstance(m, Hello) for m in rig.sent)
        mp.heard = mp.loop.time() - (c.dead_after + 1) * c.heartbeat_interval
        mp._heartbeat_tick()
        assert [m.sender_id for m in rig.sent if isinstance(m, Hello)] == [SENDER_ID]
        # the answer (our token): the channels open anew; the same dispatcher
        # (its pid): no child claimed again
        rig.sent.clear()
        mp.token = 0x70CE
        attached = mp.attached
        rig.frame(Heartbeat(0, SENDER_ID, 1, 0, {}, token=0x70CE))
        assert mp.reattaching == 0.0 and mp.attached == attached + 1
        assert [m.channel for m in rig.sent if isinstance(m, Hello)] == [Channel.BULK]
        # another's token: not an answer to us
        rig.frame(Heartbeat(0, SENDER_ID, 1, 0, {}, token=0xBAD))
        assert mp.attached == attached + 1
        mp.heard = mp.loop.time() - c.orphan_after - 1
        with pytest.raises(Exited):
            mp._heartbeat_tick()
        assert calls[-1][0] == EXIT_REJOIN and "cluster.orphan_after" in calls[-1][1]
    run_in_loop(body)


# -- the rate limit ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock_log(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Refusals, Clock]]:
    caplog.set_level(logging.DEBUG, "test.refusals")
    clock = Clock()
    yield Refusals(logging.getLogger("test.refusals"), clock=clock), clock


def test_refusals_log_once_per_reason_and_source_per_interval(
        clock_log: tuple[Refusals, Clock], caplog: pytest.LogCaptureFixture) -> None:
    r, clock = clock_log
    for _ in range(100):
        r.refuse("push_bad_spi", "dispatcher", "detail")
    r.refuse("push_bad_spi", "elsewhere")
    assert len(caplog.records) == 2
    clock.now = 10.0
    r.refuse("push_bad_spi", "dispatcher")
    assert "(and 99 more in 10 s)" in caplog.records[-1].getMessage()
    assert r.counts == {"push_bad_spi": 102}


def test_a_flood_from_many_sources_is_bounded_per_reason(
        clock_log: tuple[Refusals, Clock], caplog: pytest.LogCaptureFixture) -> None:
    r, _ = clock_log
    for i in range(1000):
        r.failed("ike", ValueError("x"), f"10.0.{i >> 8}.{i & 255}")
    assert r.counts == {"bug.ike.ValueError": 1000}
    assert len(caplog.records) == 10
    assert sum(1 for rec in caplog.records if rec.exc_info) == 1   # one traceback per reason


def test_reasons_are_bounded(clock_log: tuple[Refusals, Clock]) -> None:
    r, _ = clock_log
    for i in range(200):
        r.refuse(f"reason_{i}")
    assert len(r.counts) == 65 and r.counts["other"] == 136


# -- the gateway and the dispatcher ------------------------------------------------------------


def test_the_single_gateway_counts_what_fails_and_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    from dispatcher.gateway import Gateway

    caplog.set_level(logging.WARNING, "ipsec_cluster.gateway")
    gw = Gateway(load_config(CONFIG, "hostile.toml"))
    for _ in range(20):
        gw.datagram(500, ATTACK, ("198.18.0.9", 500))
        gw.datagram(4500, bytes(4) + ATTACK, ("198.18.0.9", 4500))
    counted = sum(gw.refusals.counts.values()) + sum(gw.member.engine.drops.values())
    assert counted >= 40

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("nobody foresaw this")

    gw.member.handle_ike = boom  # type: ignore[method-assign]
    gw.member.handle_inner = boom  # type: ignore[method-assign]
    gw.member.handle_timer = boom  # type: ignore[method-assign]
    for _ in range(20):
        gw.datagram(500, ATTACK, ("198.18.0.9", 500))
        gw.inner(b"\x45" + bytes(19))
    gw._fire()
    assert gw.refusals.counts["bug.ike.RuntimeError"] == 20
    assert gw.refusals.counts["bug.inner.RuntimeError"] == 20
    assert gw.refusals.counts["bug.timer.RuntimeError"] == 1
    assert sum(1 for r in caplog.records if r.exc_info) <= 4   # not one per datagram


def test_the_dispatcher_counts_a_failing_member_message_in_status_and_metrics() -> None:
    from dispatcher.cluster import Dispatcher
    from dispatcher.metrics import ClusterCollector
    from dispatcher.views import print_status

    async def go() -> dict[str, Any]:
        d = Dispatcher(load_config(CONFIG, "hostile.toml"), "ipc:///nonexistent")
        try:
            def boom(*_a: Any, **_k: Any) -> None:
                raise RuntimeError("nobody foresaw this")

            d._from_member = boom  # type: ignore[method-assign]
            for _ in range(5):
                d._member_frames([b"member-1", encode(Heartbeat(1, 1, 1, 0, {}), 0)])
            d._member_frames([b"member-1", b"junk"])
            d._member_frames([b"one"])
            st = d.status()
            families = {f.name: f for f in ClusterCollector(d).collect()}
            refused = families["ipsec_cluster_refused"]
            st["samples"] = {(s.labels["process"], s.labels["reason"]): s.value
                             for s in refused.samples if s.name.endswith("_total")}
            return st
        finally:
            d.router.close(linger=0)

    st = run_coro(go())
    assert st["dispatcher"]["refused"] == {"bug.heartbeat.RuntimeError": 5,
                                           "wire_malformed": 1, "wire_frames": 1}
    assert st["samples"][("dispatcher", "bug.heartbeat.RuntimeError")] == 5.0
    console = Console(record=True, width=300)
    print_status(StatusReport.from_json({**st, "members": [_member_row()]}), console)
    text = console.export_text()
    assert "refused: bug.heartbeat.RuntimeError=5" in text
    assert "push_bad_spi=3" in text


def _member_row() -> dict[str, Any]:
    return {"id": 1, "pid": 1, "host": "h", "alive": True, "segments": 1,
            "backup_segments": 1, "ike_sas": 0, "child_sas": 0, "packets_in": 0,
            "bytes_in": 0, "packets_out": 0, "bytes_out": 0, "drops": {},
            "refused": {"push_bad_spi": 3}, "replication": {}}
