"""ESP batches (``OutboundSA.seal_batch``, ``InboundSA.open_batch``) against the
per-packet path: the same bytes, sequence numbers, IVs, window and counters,
with refused packets in the middle of a burst; and scapy decrypts a batch.

Every test runs against the compiled byte primitive (one C call per burst) and
against the pure-Python fallback (a loop over the per-packet path).
"""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP

from common.esp import transforms as esp
from common.esp.replay import ReplayState
from common.esp.transforms import TRANSFORMS, InboundSA, OutboundSA
from tests.esp_impls import IMPLS, use_impl
from tests.fuzz import fuzz_settings
from tests.test_esp_scapy_oracle import OUTER, scapy_sa

SPI = 0x0C01_2345
MAX32 = 0xFFFF_FFFF


@pytest.fixture(autouse=True, params=IMPLS)
def esp_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_impl(request.param, monkeypatch)
    return str(request.param)


def v4(n: int) -> bytes:
    return bytes(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=1, dport=2) / os.urandom(n))


def v6(n: int) -> bytes:
    return bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::1") / UDP(sport=1, dport=2)
                 / os.urandom(n))


def outcome(x: object) -> object:
    """Comparable form of a result: the bytes, or the refusal's class and text."""
    return x if isinstance(x, bytes) else (type(x).__name__, str(x))


def per_packet_protect(sa: OutboundSA, inners: list[bytes]) -> list[object]:
    out: list[object] = []
    for inner in inners:
        try:
            out.append(sa.protect(inner))
        except (esp.MalformedMessage, esp.SequenceExhausted) as exc:
            out.append(outcome(exc))
    return out


def per_packet_unprotect(sa: InboundSA, packets: list[bytes]) -> list[object]:
    out: list[object] = []
    for packet in packets:
        try:
            out.append(sa.unprotect(packet))
        except (esp.ReplayError, esp.IntegrityError, esp.MalformedMessage) as exc:
            out.append(outcome(exc))
    return out


def out_state(sa: OutboundSA) -> tuple[object, ...]:
    return (sa.next_seq, sa.next_iv_counter, sa.octets, sa.packets, sa.rekey_requested,
            tuple(sa.events))


def in_state(sa: InboundSA) -> tuple[object, ...]:
    return (sa.window.export_state(), sa.packets, sa.octets)


CASES = [(t, esn) for t in sorted(TRANSFORMS) for esn in (False, True)]


@pytest.mark.parametrize(("transform", "esn"), CASES)
def test_seal_batch_is_protect_n_times(transform: str, esn: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Small IV blocks and a soft limit inside the burst: the batch crosses
    # checkpoints and must take the same IVs and sequence numbers.
    monkeypatch.setattr(esp, "IV_BLOCK", 3)
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    first = ((2 << 32) + 5) if esn else 5
    kwargs = {"esn": esn, "initial_seq": first, "rekey_margin": 0}
    if esn:
        kwargs["initial_iv_counter"] = 5
    if not esn:
        kwargs["rekey_margin"] = MAX32 - 12   # soft limit at seq 12
    ref = OutboundSA(SPI, transform, km, 0x0101, **kwargs)  # type: ignore[arg-type]
    bat = OutboundSA(SPI, transform, km, 0x0101, **kwargs)  # type: ignore[arg-type]
    inners = [v4(0), v6(3), b"", v4(50), b"\x12\x00", v4(1300), v6(1), v4(7), b"\x00",
              v4(2), v6(200), v4(9), v4(10), v4(11)]
    for burst in (inners, inners[3:], [], inners[:1]):
        expected = per_packet_protect(ref, burst)
        got = bat.seal_batch(burst)
        assert [outcome(x) for x in got] == expected
        assert out_state(bat) == out_state(ref)
    assert ref.rekey_requested == (not esn)


@pytest.mark.parametrize("transform", ["aes128gcm16", "aes128cbc-sha1", "aes128ctr-sha256"])
def test_seal_batch_runs_out_like_protect(transform: str) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    ref = OutboundSA(SPI, transform, km, 7, initial_seq=MAX32 - 4, rekey_margin=2)
    bat = OutboundSA(SPI, transform, km, 7, initial_seq=MAX32 - 4, rekey_margin=2)
    burst = [v4(i) for i in range(4)] + [b""] + [v4(i) for i in range(4)]
    expected = per_packet_protect(ref, burst)
    got = bat.seal_batch(burst)
    assert [outcome(x) for x in got] == expected
    assert [type(x).__name__ for x in got].count("SequenceExhausted") == 3
    assert out_state(bat) == out_state(ref)


def stream(transform: str, esn: bool, first: int, n: int) -> tuple[bytes, list[bytes]]:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    out = OutboundSA(SPI, transform, km, 3, esn=esn, initial_seq=first,
                     initial_iv_counter=1)
    return km, [out.protect(v4(i * 7 % 300) if i % 3 else v6(i)) for i in range(n)]


def receivers(transform: str, km: bytes, esn: bool, top: int) -> tuple[InboundSA, InboundSA]:
    pair = (InboundSA(SPI, transform, km, replay_window=64, esn=esn),
            InboundSA(SPI, transform, km, replay_window=64, esn=esn))
    if top:
        for sa in pair:
            sa.import_window(ReplayState(64, top, 1))
    return pair


def flip_last(packet: bytes) -> bytes:
    return packet[:-1] + bytes([packet[-1] ^ 1])


@pytest.mark.parametrize(("transform", "esn"), CASES)
def test_open_batch_is_unprotect_n_times(transform: str, esn: bool) -> None:
    base = (5 << 32) - 20 if esn else 100   # ESN: the burst crosses a subspace
    km, pkts = stream(transform, esn, base + 1, 120)
    ref, bat = receivers(transform, km, esn, base)
    foreign = struct.pack("!I", SPI + 1) + pkts[5][4:]
    burst = [pkts[0], pkts[2], pkts[1], pkts[1],              # reorder, replay in the burst
             flip_last(pkts[3]), pkts[3],                      # forged first, then genuine
             pkts[4][:20], foreign, pkts[4],                   # truncated, foreign SPI
             *pkts[6:30], pkts[2]]
    later = [pkts[0], *pkts[100:120], pkts[40], flip_last(pkts[119]), pkts[31]]
    for b in (burst, [], later):
        expected = per_packet_unprotect(ref, b)
        got = bat.open_batch(b)
        assert [outcome(x) for x in got] == expected
        assert in_state(bat) == in_state(ref)
    assert ref.window.highest == base + 120
    # Again, later: every packet is refused (with ESN the oldest ones now
    # infer into the next subspace and fail their ICV, RFC 4303 Appendix A).
    kinds = {type(x).__name__ for x in bat.open_batch(burst)}
    assert kinds == ({"MalformedMessage", "IntegrityError"} if esn
                     else {"ReplayError", "MalformedMessage"})
    assert in_state(bat) == in_state(ref)


@pytest.mark.parametrize("transform", ["aes256gcm16", "chacha20poly1305", "aes128cbc-sha256"])
def test_open_batch_esn_guess_ahead_is_corrected(transform: str) -> None:
    """A forged packet whose low half would start the next 2^32 subspace must
    not move the high half the rest of the burst is opened under."""
    top = (3 << 32) | 0x8000_0000
    km, pkts = stream(transform, True, top + 1, 3)
    ref, bat = receivers(transform, km, True, top)
    forged = pkts[0][:4] + struct.pack("!I", 0x10) + pkts[0][8:]
    burst = [forged, *pkts]
    expected = per_packet_unprotect(ref, burst)
    got = bat.open_batch(burst)
    assert [outcome(x) for x in got] == expected
    assert expected[0][0] == "IntegrityError"  # type: ignore[index]
    assert all(isinstance(x, bytes) for x in got[1:])
    assert in_state(bat) == in_state(ref)


def test_open_batch_bad_trailer_is_recorded_and_refused() -> None:
    """Authentic but not padding 1, 2, ... + next header: refused as
    MalformedMessage, but the number is recorded (as unprotect does)."""
    km = os.urandom(20)
    gcm = AESGCM(km[:16])
    header = struct.pack("!IIQ", SPI, 1, 99)
    bad = header + gcm.encrypt(km[16:] + struct.pack("!Q", 99), v4(2) + b"\x00\x29", header[:8])
    ref, bat = receivers("aes128gcm16", km, False, 0)
    out = OutboundSA(SPI, "aes128gcm16", km, 3, initial_seq=2)
    burst = [bad, out.protect(v4(5)), bad]
    expected = per_packet_unprotect(ref, burst)
    assert [outcome(x) for x in bat.open_batch(burst)] == expected
    assert [x[0] if isinstance(x, tuple) else "ok" for x in expected] == [
        "MalformedMessage", "ok", "ReplayError"]
    assert in_state(bat) == in_state(ref)


@pytest.mark.parametrize(("transform", "esn"), CASES)
def test_scapy_decrypts_a_sealed_batch(transform: str, esn: bool) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    seq_high = 3 if esn else 0
    out = OutboundSA(SPI, transform, km, sender_id=0x0101, esn=esn,
                     initial_seq=(seq_high << 32) + 7)
    sa = scapy_sa(transform, km, esn, seq_high)
    inners = [v4(0), v6(1), v4(2), v4(3), v6(50), v4(200), v4(1300)]
    for inner, packet in zip(inners, out.seal_batch(inners), strict=True):
        assert isinstance(packet, bytes)
        outer = IP(bytes(OUTER.copy() / ESP(packet)))
        assert bytes(sa.decrypt(outer)) == inner


# A burst: each slot picks a packet of the stream (repeats and reordering
# allowed) and maybe damages it (flip one byte, or cut it short).
SLOT = st.tuples(st.integers(0, 39), st.sampled_from(["", "flip", "cut"]),
                 st.integers(0, 2000))


@pytest.mark.fuzz
@fuzz_settings(25)
@given(transform=st.sampled_from(sorted(TRANSFORMS)), esn=st.booleans(),
       bursts=st.lists(st.lists(SLOT, max_size=16), min_size=1, max_size=4))
def test_fuzz_open_batch_equals_unprotect(transform: str, esn: bool,
                                          bursts: list[list[tuple[int, str, int]]]) -> None:
    base = (1 << 32) - 20 if esn else 0
    km, pkts = stream(transform, esn, base + 1, 40)
    ref, bat = receivers(transform, km, esn, base)
    for slots in bursts:
        burst = []
        for index, damage, where in slots:
            packet = pkts[index]
            if damage == "flip":
                at = where % len(packet)
                packet = packet[:at] + bytes([packet[at] ^ 0x80]) + packet[at + 1:]
            elif damage == "cut":
                packet = packet[:where % len(packet)]
            burst.append(packet)
        expected = per_packet_unprotect(ref, burst)
        assert [outcome(x) for x in bat.open_batch(burst)] == expected
        assert in_state(bat) == in_state(ref)


def test_compiled_batch_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled primitive's own argument checks (in both runs of the
    impl fixture: this test is about the compiled one)."""
    use_impl("fast", monkeypatch)
    sa = OutboundSA(SPI, "aes128gcm16", bytes(20), 1)._fast
    assert sa is not None
    packet = sa.seal(1, 1, v4(4))
    with pytest.raises(ValueError, match="differ in length"):
        sa.open_batch([packet], [0, 0])
    with pytest.raises(OverflowError):
        sa.open_batch([packet], [1 << 32])
    with pytest.raises(TypeError):
        sa.open_batch([packet, 5], None)
    with pytest.raises(TypeError):
        sa.seal_batch(1, 1, [v4(1), "text"])
    assert sa.seal_batch(1, 1, []) == [] and sa.open_batch((), None) == []
    [(seq, inner)] = sa.open_batch([packet], None)
    assert (seq, inner) == (1, sa.open(packet, 0))
