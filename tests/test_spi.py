"""SPI allocation with the segment in the top bits."""

from __future__ import annotations

import pytest

from common.cluster.spi import SpiAllocator, segment_of_esp_spi, segment_of_ike_spi
from common.errors import LocalProtocolError
from common.rand import deterministic_random


def test_esp_spis_carry_their_segment_and_are_unique() -> None:
    alloc = SpiAllocator(deterministic_random(1))
    spis = [alloc.allocate_esp(segment) for segment in range(256) for _ in range(20)]
    assert len(set(spis)) == len(spis)
    for i, spi in enumerate(spis):
        assert 256 <= spi <= 0xFFFF_FFFF
        assert segment_of_esp_spi(spi) == i // 20


def test_ike_spis_carry_their_segment() -> None:
    alloc = SpiAllocator(deterministic_random(2), segment_bits=4)
    for segment in range(16):
        spi = alloc.allocate_ike(segment)
        assert 0 < spi < 1 << 64
        assert segment_of_ike_spi(spi, 4) == segment


def test_never_reserved_never_in_use() -> None:
    # A source that first yields zeros (reserved), then repeats: segment 0 of
    # an ESP SPI with zero random bits is < 256 and must be skipped.
    draws = iter([bytes(4), bytes(4), bytes.fromhex("00001234"), bytes.fromhex("00001234"),
                  bytes.fromhex("00005678")])
    alloc = SpiAllocator(lambda n: next(draws), segment_bits=8)
    assert alloc.allocate_esp(0) == 0x1234
    assert alloc.allocate_esp(0) == 0x5678          # 0x1234 is in use
    alloc.release(0x1234)
    assert not alloc.in_use(0x1234)
    ike = SpiAllocator(lambda n: bytes(n), segment_bits=8)
    with pytest.raises(LocalProtocolError, match="no free"):
        ike.allocate_ike(0)                          # only ever draws SPI 0


def test_release_makes_an_spi_available_again() -> None:
    alloc = SpiAllocator(lambda n: b"\xab" * n)
    spi = alloc.allocate_esp(3)
    with pytest.raises(LocalProtocolError):
        alloc.allocate_esp(3)
    alloc.release(spi)
    assert alloc.allocate_esp(3) == spi


def test_routing_function_is_a_shift() -> None:
    assert segment_of_esp_spi(0xC1234567) == 0xC1
    assert segment_of_esp_spi(0xC1234567, 4) == 0xC
    assert segment_of_ike_spi(0xFE00_0000_0000_0001) == 0xFE
    assert segment_of_esp_spi(0x12345678, 0) == 0


@pytest.mark.parametrize("kwargs", [{"segment_bits": -1}, {"segment_bits": 17}])
def test_bad_segment_bits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="segment_bits"):
        SpiAllocator(deterministic_random(0), **kwargs)


@pytest.mark.parametrize("segment", [-1, 256, True])
def test_bad_segment(segment: int) -> None:
    with pytest.raises(ValueError, match="segment must be"):
        SpiAllocator(deterministic_random(0)).allocate_esp(segment)


def test_slots_keep_members_apart_inside_one_segment() -> None:
    """Two members allocating in the same segment (a child placed on another
    member's segment) can never draw the same SPI: their slot bits differ."""
    from common.cluster.spi import SpiAllocator, segment_of_esp_spi, segment_of_ike_spi
    from common.rand import deterministic_random

    a = SpiAllocator(deterministic_random(1), 8, slot=1, slot_bits=6)
    b = SpiAllocator(deterministic_random(1), 8, slot=2, slot_bits=6)  # same random stream
    spis_a = {a.allocate_esp(7) for _ in range(500)}
    spis_b = {b.allocate_esp(7) for _ in range(500)}
    assert not spis_a & spis_b
    assert {segment_of_esp_spi(s, 8) for s in spis_a | spis_b} == {7}
    assert {(s >> 18) & 0x3F for s in spis_a} == {1}
    ike = a.allocate_ike(200)
    assert segment_of_ike_spi(ike, 8) == 200 and (ike >> 50) & 0x3F == 1


def test_slot_arguments_are_checked() -> None:
    import pytest

    from common.cluster.spi import SpiAllocator
    from common.rand import deterministic_random

    with pytest.raises(ValueError, match="slot must be"):
        SpiAllocator(deterministic_random(1), 8, slot=64, slot_bits=6)
    with pytest.raises(ValueError, match="slot_bits"):
        SpiAllocator(deterministic_random(1), 12, slot=0, slot_bits=6)
