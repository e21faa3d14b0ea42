"""The SPI source the IKE core draws from: IKE SPIs only from the segments this
member owns (RFC 6027 §3.9), ESP SPIs from the segment of the member chosen to
carry the child SA (load sharing; by default our own segments)."""

from __future__ import annotations

from collections.abc import Callable

from common.cluster.spi import SpiAllocator


class SegmentSpis:
    """Adapts ``common.cluster.spi.SpiAllocator`` to the IKE core's ``SpiSource``."""

    __slots__ = ("_alloc", "_next", "esp_segment", "next_ike_segment", "segments")

    def __init__(self, allocator: SpiAllocator, segments: list[int], *,
                 esp_segment: Callable[[], int] | None = None) -> None:
        if not segments:
            raise ValueError("a member needs at least one segment to allocate SPIs from")
        self._alloc = allocator
        self.segments = list(segments)
        self._next = 0
        #: where the next child SA goes: a segment of the member chosen to carry it
        self.esp_segment = esp_segment
        #: the segment the dispatcher hashed the IKE_SA_INIT being handled into;
        #: our responder SPI must fall into it so that later messages find us.
        self.next_ike_segment: int | None = None

    def set_segments(self, segments: list[int]) -> None:
        if segments:
            self.segments = list(segments)

    def _own(self) -> int:
        seg = self.segments[self._next % len(self.segments)]
        self._next += 1
        return seg

    def allocate_ike(self, segment: int | None = None) -> bytes:
        """``segment``: keep this one if we own it (an IKE rekey of an SA that
        holds a virtual IP from that segment's partition, common/cluster/pools.py)."""
        seg = segment if segment is not None else self.next_ike_segment
        if seg is None or seg not in self.segments:
            seg = self._own()
        return self._alloc.allocate_ike(seg).to_bytes(8, "big")

    def allocate_esp(self) -> int:
        seg = self.esp_segment() if self.esp_segment is not None else self._own()
        return self._alloc.allocate_esp(seg)

    def release_esp(self, spi: int) -> None:
        self._alloc.release(spi)

    def mark_used_esp(self, spi: int) -> None:
        """An SPI we took over from another member: never hand it out again."""
        self._alloc.mark_used_esp(spi)

    def mark_used_ike(self, spi: bytes) -> None:
        self._alloc.mark_used_ike(int.from_bytes(spi, "big"))
