"""The SPI source the IKE core draws from: SPIs only from the segments this
member owns (RFC 6027 §3.9), spread round-robin over them."""

from __future__ import annotations

from common.spi import SpiAllocator


class SegmentSpis:
    """Adapts ``common.spi.SpiAllocator`` to the IKE core's ``SpiSource``."""

    __slots__ = ("_alloc", "_next", "segments")

    def __init__(self, allocator: SpiAllocator, segments: list[int]) -> None:
        if not segments:
            raise ValueError("a member needs at least one segment to allocate SPIs from")
        self._alloc = allocator
        self.segments = list(segments)
        self._next = 0

    def _segment(self) -> int:
        seg = self.segments[self._next % len(self.segments)]
        self._next += 1
        return seg

    def allocate_ike(self) -> bytes:
        return self._alloc.allocate_ike(self._segment()).to_bytes(8, "big")

    def allocate_esp(self) -> int:
        return self._alloc.allocate_esp(self._segment())

    def allocate_esp_in(self, segment: int) -> int:
        """An ESP SPI in a given segment: a child placed on another member."""
        return self._alloc.allocate_esp(segment)

    def release_esp(self, spi: int) -> None:
        self._alloc.release(spi)
