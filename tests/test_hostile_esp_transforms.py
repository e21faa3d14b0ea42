"""Hostile bytes against every ESP transform, on both paths: only the
common errors come out, the window moves only for authentic packets, and an
authentic packet with bytes flipped, cut or appended never decrypts."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import IntegrityError, MalformedMessage, ReplayError
from common.esp import transforms as esp
from common.esp.transforms import TRANSFORMS, InboundSA, OutboundSA
from tests.esp_impls import compiled
from tests.fuzz import fuzz_settings

pytestmark = pytest.mark.fuzz

SPI = 0x0E0E_0001
EXPECTED = (MalformedMessage, IntegrityError, ReplayError)


def _sas(transform: str, impl: str, esn: bool) -> tuple[OutboundSA, InboundSA]:
    saved = esp._compiled
    esp._compiled = compiled() if impl == "fast" else None
    try:
        km = os.urandom(TRANSFORMS[transform].keymat_size)
        return (OutboundSA(SPI, transform, km, sender_id=3, esn=esn),
                InboundSA(SPI, transform, km, esn=esn))
    finally:
        esp._compiled = saved


@pytest.mark.parametrize("impl", ["fast", "pure"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@fuzz_settings(15)
@given(data=st.binary(max_size=200), esn=st.booleans())
def test_random_bytes_raise_only_common_errors(transform: str, impl: str, data: bytes,
                                               esn: bool) -> None:
    _, inb = _sas(transform, impl, esn)
    with pytest.raises(EXPECTED):
        inb.unprotect(SPI.to_bytes(4, "big") + data)
    assert inb.window.highest == 0


@pytest.mark.parametrize("impl", ["fast", "pure"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@fuzz_settings(10)
@given(size=st.integers(0, 300), where=st.integers(8, 10_000), bit=st.integers(0, 7),
       cut=st.integers(1, 40), extra=st.binary(min_size=1, max_size=40))
def test_altered_authentic_packets_never_decrypt(transform: str, impl: str, size: int,
                                                 where: int, bit: int, cut: int,
                                                 extra: bytes) -> None:
    out, inb = _sas(transform, impl, False)
    packet = out.protect(b"\x45" + bytes(19) + os.urandom(size))
    flipped = bytearray(packet)
    flipped[where % len(packet) if where % len(packet) >= 8 else 8] ^= 1 << bit
    for bad in (bytes(flipped), packet[:-cut], packet + extra):
        with pytest.raises(EXPECTED):
            inb.unprotect(bad)
    assert inb.window.highest == 0
    assert inb.unprotect(packet)[:1] == b"\x45"
