"""SPI allocation with the segment number in the top bits.

Rules of this file:
- An ESP SPI (32 bits) or IKE SPI (64 bits) handed out by the cluster carries
  its segment in the top ``segment_bits`` bits; the rest is random from the
  injected ``RandomBytes``.  Routing is then a shift, with no per-SA state in
  the dispatcher (strongSwan ``plugins/ha/ha_kernel.c``, ``get_segment_spi``).
- Never a reserved SPI: ESP 0..255 (RFC 4303 §2.1), IKE 0 (RFC 7296 §3.1).
- Never an SPI that is still in use by this allocator (RFC 6027 §3.9).
- Members never collide: below the segment bits come ``slot_bits`` bits with
  the allocating member's slot. An IKE SA owner may place a child SA in a
  segment another member owns (load sharing); its SPIs there still differ from
  every SPI that member (or any other) allocates, by construction.
"""

from __future__ import annotations

from common.errors import LocalProtocolError
from common.rand import RandomBytes

DEFAULT_SEGMENT_BITS = 8
MAX_SEGMENT_BITS = 16
ESP_SPI_BITS = 32
IKE_SPI_BITS = 64
ESP_SPI_RESERVED_BELOW = 256
MAX_DRAWS = 64  # random draws before a segment is declared full


def _check_bits(segment_bits: int) -> int:
    if isinstance(segment_bits, bool) or not isinstance(segment_bits, int) \
            or not 0 <= segment_bits <= MAX_SEGMENT_BITS:
        raise ValueError(f"segment_bits must be an int in 0..{MAX_SEGMENT_BITS}, "
                         f"got {segment_bits!r}")
    return segment_bits


def segment_of_esp_spi(spi: int, segment_bits: int = DEFAULT_SEGMENT_BITS) -> int:
    """The segment an ESP SPI belongs to (the routing function's key)."""
    return (spi & 0xFFFF_FFFF) >> (ESP_SPI_BITS - segment_bits)


def segment_of_ike_spi(spi: int, segment_bits: int = DEFAULT_SEGMENT_BITS) -> int:
    """The segment an IKE SPI belongs to."""
    return (spi & 0xFFFF_FFFF_FFFF_FFFF) >> (IKE_SPI_BITS - segment_bits)


class SpiAllocator:
    """Allocates unique ESP and IKE SPIs inside a given segment."""

    __slots__ = ("_esp_used", "_ike_used", "_random", "_segment_bits", "_slot", "_slot_bits")

    def __init__(self, random: RandomBytes,
                 segment_bits: int = DEFAULT_SEGMENT_BITS, *, slot: int = 0,
                 slot_bits: int = 0) -> None:
        self._random = random
        self._segment_bits = _check_bits(segment_bits)
        if isinstance(slot_bits, bool) or not isinstance(slot_bits, int) \
                or not 0 <= slot_bits <= 8 or segment_bits + slot_bits > 16:
            raise ValueError(f"slot_bits must be an int in 0..8 with segment_bits + slot_bits "
                             f"<= 16, got {slot_bits!r}")
        if isinstance(slot, bool) or not isinstance(slot, int) \
                or not 0 <= slot < (1 << slot_bits):
            raise ValueError(f"slot must be an int in 0..{(1 << slot_bits) - 1}, got {slot!r}")
        self._slot = slot
        self._slot_bits = slot_bits
        self._esp_used: set[int] = set()
        self._ike_used: set[int] = set()

    @property
    def segment_bits(self) -> int:
        return self._segment_bits

    @property
    def segments(self) -> int:
        return 1 << self._segment_bits

    def allocate_esp(self, segment: int) -> int:
        spi = self._allocate(segment, ESP_SPI_BITS, ESP_SPI_RESERVED_BELOW, self._esp_used)
        return spi

    def allocate_ike(self, segment: int) -> int:
        return self._allocate(segment, IKE_SPI_BITS, 1, self._ike_used)

    def mark_used_esp(self, spi: int) -> None:
        """Record an SPI allocated elsewhere (e.g. a replica taken over)."""
        self._esp_used.add(spi)

    def mark_used_ike(self, spi: int) -> None:
        self._ike_used.add(spi)

    def release(self, spi: int) -> None:
        """Make ``spi`` available again (ESP or IKE; unknown SPIs are ignored)."""
        self._esp_used.discard(spi)
        self._ike_used.discard(spi)

    def in_use(self, spi: int) -> bool:
        return spi in self._esp_used or spi in self._ike_used

    def _allocate(self, segment: int, width: int, reserved_below: int,
                  used: set[int]) -> int:
        if isinstance(segment, bool) or not isinstance(segment, int) \
                or not 0 <= segment < self.segments:
            raise ValueError(f"segment must be an int in 0..{self.segments - 1}, "
                             f"got {segment!r}")
        random_bits = width - self._segment_bits - self._slot_bits
        prefix = ((segment << self._slot_bits) | self._slot) << random_bits
        low_mask = (1 << random_bits) - 1
        for _ in range(MAX_DRAWS):
            spi = prefix | (int.from_bytes(self._random(width // 8)) & low_mask)
            if spi >= reserved_below and spi not in used:
                used.add(spi)
                return spi
        raise LocalProtocolError(
            f"no free {width}-bit SPI found in segment {segment} after {MAX_DRAWS} draws")
