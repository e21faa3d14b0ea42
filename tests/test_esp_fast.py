"""The compiled ESP primitive (common/esp/_esp_fast.c) against the pure-Python reference.

For the same keys, sequence numbers and IVs both paths must produce byte-identical
ESP, each must unprotect the other's output, and both must refuse bad bytes with
the same error type.  tests/test_esp.py and the scapy oracle run against both too.
Skipped when the extension is not built; FAILS then under
IPSEC_CLUSTER_REQUIRE_INTEROP=1 (CI), so CI proves the fast path.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import IntegrityError, MalformedMessage, ReplayError, SequenceExhausted
from common.esp import transforms as esp
from common.esp.transforms import TRANSFORMS, InboundSA, OutboundSA
from tests.esp_impls import compiled

SPI = 0x0B0B_0001
ALL = sorted(TRANSFORMS)
ROOT = Path(__file__).resolve().parent.parent


def build(impl: str, cls: type, *args: object, **kwargs: object) -> object:
    """An SA of ``cls`` on the ``impl`` path ("fast" or "pure")."""
    saved = esp._compiled
    esp._compiled = compiled() if impl == "fast" else None
    try:
        return cls(*args, **kwargs)
    finally:
        esp._compiled = saved


def outs(transform: str, km: bytes, **kw: object) -> tuple[OutboundSA, OutboundSA]:
    fast = build("fast", OutboundSA, SPI, transform, km, 0x0A0B, **kw)
    pure = build("pure", OutboundSA, SPI, transform, km, 0x0A0B, **kw)
    assert isinstance(fast, OutboundSA) and isinstance(pure, OutboundSA)
    assert fast._fast is not None and pure._fast is None
    return fast, pure


def ins(transform: str, km: bytes, **kw: object) -> tuple[InboundSA, InboundSA]:
    fast = build("fast", InboundSA, SPI, transform, km, **kw)
    pure = build("pure", InboundSA, SPI, transform, km, **kw)
    assert isinstance(fast, InboundSA) and isinstance(pure, InboundSA)
    assert fast._fast is not None and pure._fast is None
    return fast, pure


def inner(version: int, n: int) -> bytes:
    """``n`` bytes starting with the IP version nibble (all the SA looks at)."""
    return bytes([version << 4 | 5]) + os.urandom(n - 1)


def raised(fn: object, *args: object) -> type[Exception] | None:
    try:
        fn(*args)  # type: ignore[operator]
    except Exception as exc:
        return type(exc)
    return None


@pytest.fixture(autouse=True)
def _needs_extension() -> None:
    compiled()


def test_default_path_is_the_compiled_one() -> None:
    # What SAs use when nobody chooses: the scapy oracle and test_esp.py also
    # run this path (and the pure one).
    if os.environ.get(esp.PURE_ESP_ENV) == "1":
        pytest.skip(f"{esp.PURE_ESP_ENV}=1 in this run")
    assert esp.FAST_PATH
    assert OutboundSA(SPI, "aes128gcm16", bytes(20), sender_id=1)._fast is not None
    assert InboundSA(SPI, "aes128gcm16", bytes(20))._fast is not None


@pytest.mark.parametrize(("env", "expected"), [("1", "False"), ("0", "True")])
def test_env_var_forces_the_pure_path(env: str, expected: str) -> None:
    code = ("from common.esp.transforms import FAST_PATH, OutboundSA\n"
            "sa = OutboundSA(0x100, 'aes128gcm16', bytes(20), sender_id=1)\n"
            "print(FAST_PATH, sa._fast is not None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True,
                            env={**os.environ, esp.PURE_ESP_ENV: env})
    assert result.stdout.split() == [expected, expected]


@pytest.mark.parametrize("transform", ALL)
@pytest.mark.parametrize("esn", [False, True])
def test_identical_bytes_and_cross_unprotect_for_every_size(transform: str, esn: bool) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    # With ESN start just below 2^32 so the high half (AAD / ICV input) is 1.
    start = 0xFFFF_FF00 if esn else 1
    fast_out, pure_out = outs(transform, km, esn=esn, initial_seq=start, initial_iv_counter=5)
    fast_in, pure_in = ins(transform, km, esn=esn, replay_window=4096)
    for n in range(1, 1501):
        packet = inner(4 if n % 2 else 6, n)
        a, b = fast_out.protect(packet), pure_out.protect(packet)
        assert a == b, n
        # Each side unprotects the other's output (and its own, via the other SA).
        assert fast_in.unprotect(b) == packet, n
        assert pure_in.unprotect(a) == packet, n
    for sa in (fast_out, pure_out):
        assert sa.next_seq == start + 1500 and sa.packets == 1500
    assert fast_out.octets == pure_out.octets == fast_in.octets == pure_in.octets
    assert fast_in.export_window() == pure_in.export_window()


@pytest.mark.parametrize("transform", ALL)
@pytest.mark.parametrize("esn", [False, True])
def test_every_altered_bit_fails_alike(transform: str, esn: bool) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    fast_out, _ = outs(transform, km, esn=esn)
    fast_in, pure_in = ins(transform, km, esn=esn)
    packet = fast_out.protect(inner(4, 61))
    for i in range(len(packet)):
        for bit in range(8):
            forged = bytearray(packet)
            forged[i] ^= 1 << bit
            got = raised(fast_in.unprotect, bytes(forged))
            assert got is raised(pure_in.unprotect, bytes(forged)), (i, bit)
            if i < 4:
                assert got is MalformedMessage
            elif i < 8:
                assert got in (IntegrityError, ReplayError)
            else:
                assert got is IntegrityError
    assert fast_in.window.highest == pure_in.window.highest == 0
    assert fast_in.unprotect(packet) == pure_in.unprotect(packet)


@pytest.mark.parametrize("transform", ALL)
@pytest.mark.parametrize("esn", [False, True])
def test_every_truncation_fails_alike(transform: str, esn: bool) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    fast_out, _ = outs(transform, km, esn=esn)
    fast_in, pure_in = ins(transform, km, esn=esn)
    for packet in (fast_out.protect(inner(4, 20)), fast_out.protect(inner(6, 103))):
        for cut in range(len(packet)):
            got = raised(fast_in.unprotect, packet[:cut])
            assert got in (MalformedMessage, IntegrityError), cut
            assert got is raised(pure_in.unprotect, packet[:cut]), cut
            # Appended bytes break the ICV (CBC: the block size first), never memory.
            extra = cut % 7 + 1
            cbc = TRANSFORMS[transform].cipher == "cbc"
            assert raised(fast_in.unprotect, packet + bytes(extra)) is (
                MalformedMessage if cbc else IntegrityError)
        for sa in (fast_in, pure_in):
            assert raised(sa.unprotect, packet + bytes(16)) is IntegrityError
        assert fast_in.unprotect(packet) == pure_in.unprotect(packet)


@pytest.mark.parametrize("transform", ALL)
def test_authentic_bad_trailers_are_recorded_then_refused(transform: str) -> None:
    # A peer with the keys sending a bad trailer: both paths record the number
    # (it authenticated) and raise MalformedMessage; long padding is accepted.
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    v4 = inner(4, 20)
    bad = [v4 + b"\x01\x03\x02\x04", v4 + b"\x02\x04", v4 + b"\x01\x02\x02\x29",
           inner(6, 40) + b"\x01\x02\x02\x04", b"\x50" + bytes(19) + b"\x00\x04",
           b"\x01\x02", b"\x00\x04", v4 + b"\x00\x3b"]
    fast_in, pure_in = ins(transform, km)
    for seq, plain in enumerate(bad, start=1):
        packet = _forge(transform, km, plain, seq)
        for sa in (fast_in, pure_in):
            with pytest.raises(MalformedMessage, match="ESP"):
                sa.unprotect(packet)
            assert sa.window.highest == seq
            assert sa.packets == 0
    pad = 250 if TRANSFORMS[transform].cipher == "cbc" else 254   # CBC: whole blocks
    long_pad = v4 + bytes(range(1, pad + 1)) + bytes([pad, 4])
    fast_in, pure_in = ins(transform, km)
    assert fast_in.unprotect(_forge(transform, km, long_pad, 1)) == v4
    assert pure_in.unprotect(_forge(transform, km, long_pad, 1)) == v4


def _forge(transform: str, km: bytes, plain: bytes, seq: int) -> bytes:
    """An authentic ESP packet whose decrypted payload is ``plain``."""
    from tests.test_esp import forge_authentic
    return forge_authentic(transform, km, plain, seq, SPI)


@pytest.mark.parametrize("transform", ALL)
def test_limits_events_and_refusals_alike(transform: str) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    fast, pure = outs(transform, km, initial_seq=0xFFFF_FFFF - 4, rekey_margin=2)
    for _ in range(5):
        packet = inner(6, 40)
        assert fast.protect(packet) == pure.protect(packet)
    assert fast.events == pure.events and fast.rekey_requested and pure.rekey_requested
    for sa in (fast, pure):
        # Exhausted: a non-IP packet is still "malformed" first, then the limit.
        with pytest.raises(MalformedMessage):
            sa.protect(b"\x10")
        with pytest.raises(MalformedMessage):
            sa.protect(b"")
        with pytest.raises(SequenceExhausted):
            sa.protect(inner(4, 40))
    assert fast.next_seq == pure.next_seq and fast.octets == pure.octets


@pytest.mark.parametrize("impl", ["fast", "pure"])
@pytest.mark.parametrize("data", [b"", b"\x00", b"\x50" + bytes(20), b"\xff" * 3])
def test_non_ip_refused_without_spending_a_number(impl: str, data: bytes) -> None:
    sa = build(impl, OutboundSA, SPI, "aes256ctr-sha256", bytes(68), 1)
    assert isinstance(sa, OutboundSA)
    with pytest.raises(MalformedMessage):
        sa.protect(data)
    assert sa.next_seq == 1 and sa.octets == 0


def test_buffer_inputs_accepted() -> None:
    km = os.urandom(20)
    fast, pure = outs("aes128gcm16", km)
    fast_in, _ = ins("aes128gcm16", km)
    packet = inner(4, 50)
    esp_bytes = fast.protect(bytearray(packet))
    assert esp_bytes == pure.protect(bytearray(packet))
    assert fast_in.unprotect(bytearray(esp_bytes)) == packet


def test_primitive_argument_checks() -> None:
    cls = compiled()
    for kind, key, salt, integ, digest in [
            ("gcm", bytes(15), bytes(4), b"", ""), ("gcm", bytes(16), bytes(3), b"", ""),
            ("gcm", bytes(16), bytes(4), bytes(32), "sha256"),
            ("ctr", bytes(16), bytes(4), bytes(31), "sha256"),
            ("ctr", bytes(16), bytes(4), b"", ""),
            ("chacha20poly1305", bytes(16), bytes(4), b"", ""),
            ("chacha20poly1305", bytes(32), b"", b"", ""),
            ("cbc", bytes(16), bytes(4), bytes(20), "sha1"),    # CBC has no salt
            ("cbc", bytes(16), b"", bytes(32), "sha1"),         # SHA-1 key is 20 bytes
            ("cbc", bytes(16), b"", bytes(20), "md5"),
            ("ecb", bytes(16), b"", bytes(20), "sha1")]:
        with pytest.raises(ValueError, match="SaCipher needs"):
            cls(kind, key, salt, integ, digest, SPI, False)
    with pytest.raises(ValueError, match="32-bit spi"):
        cls("gcm", bytes(16), bytes(4), b"", "", 1 << 32, False)
    sa = cls("gcm", bytes(16), bytes(4), b"", "", SPI, False)
    with pytest.raises(TypeError):
        sa.seal(1, 1)  # type: ignore[call-arg]
    with pytest.raises(OverflowError):
        sa.seal(-1, 1, inner(4, 20))
    with pytest.raises(OverflowError):
        sa.open(sa.seal(1, 1, inner(4, 20)), 1 << 32)
    with pytest.raises(TypeError):
        cls.__new__(cls).seal(1, 1, inner(4, 20))      # never initialised
    with pytest.raises(TypeError):
        sa.__init__("gcm", bytes(16), bytes(4), b"", "", SPI, False)   # keys are set once
    with pytest.raises(MalformedMessage, match="too short"):
        sa.peek(bytes(33))
    with pytest.raises(MalformedMessage, match="too short"):
        sa.open(bytes(33), 0)


def test_no_key_material_leaks() -> None:
    key = bytes(range(0x40, 0x60))
    km = key + b"SALT"
    sa = compiled()("gcm", key, b"SALT", b"", "", SPI, False)
    assert key.hex() not in repr(sa) and "SALT" not in repr(sa)
    assert not [name for name in dir(sa) if not name.startswith("__")
                and name not in ("seal", "peek", "open", "seal_batch", "open_batch")]
    with pytest.raises(TypeError):
        pickle.dumps(sa)
    for sa_obj in (*outs("aes256gcm16", km), *ins("aes256gcm16", km)):
        assert key.hex() not in repr(sa_obj) and "SALT" not in repr(sa_obj)
