"""RFC 4303 §3.4.3 anti-replay window, as a fixed bitmap.

Rules of this file:
- The window is one Python int masked to ``size`` bits, never a set: bit ``i``
  says that sequence number ``highest - i`` was received.
- Three steps, so the SA can authenticate in between (strongSwan
  ``libipsec/esp_packet.c``): ``check`` (raises ``ReplayError``), then the
  caller authenticates, then ``record``.  A forged packet never moves the window.
- Sequence numbers here are the full values: 32-bit without ESN, 64-bit with
  ESN; ``infer_esn`` turns the 32 bits on the wire into the 64-bit value.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ReplayError

DEFAULT_WINDOW_SIZE = 1024
MIN_WINDOW_SIZE = 32
MAX_WINDOW_SIZE = 65536
_LOW32 = 0xFFFF_FFFF
_SUBSPACE = 1 << 32


@dataclass(frozen=True, slots=True)
class ReplayState:
    """What a backup member needs to continue the window (synced, RFC 6027 §3.5)."""

    size: int
    highest: int
    bitmap: int


class ReplayWindow:
    """A sliding window of ``size`` sequence numbers ending at ``highest``."""

    # ``highest`` is a plain attribute (read it, never write it): the SA's hot
    # path compares against it to skip ``check`` for the usual in-order packet.
    __slots__ = ("_bitmap", "_mask", "_size", "highest")

    def __init__(self, size: int = DEFAULT_WINDOW_SIZE) -> None:
        if (isinstance(size, bool) or not isinstance(size, int)
                or not MIN_WINDOW_SIZE <= size <= MAX_WINDOW_SIZE):
            raise ValueError(
                f"replay window size must be an int in {MIN_WINDOW_SIZE}..{MAX_WINDOW_SIZE}, "
                f"got {size!r}")
        self._size = size
        self._mask = (1 << size) - 1
        #: The highest authenticated sequence number recorded (0 = none yet).
        self.highest = 0
        # Sequence number 0 is never sent (RFC 4303 §3.3.3 starts at 1): mark it
        # as seen so the empty window refuses it like any duplicate.
        self._bitmap = 1

    @property
    def size(self) -> int:
        return self._size

    def check(self, seq: int) -> None:
        """Raise ``ReplayError`` if ``seq`` is a duplicate or left of the window."""
        diff = self.highest - seq
        if diff < 0:
            return
        if diff >= self._size:
            raise ReplayError(
                f"sequence number {seq} is left of the window (highest {self.highest}, "
                f"size {self._size})")
        if (self._bitmap >> diff) & 1:
            raise ReplayError(f"sequence number {seq} was already received")

    def record(self, seq: int) -> None:
        """Mark ``seq`` as received; call only after the packet authenticated."""
        diff = seq - self.highest
        if diff > 0:
            if diff >= self._size:
                self._bitmap = 1
            else:
                self._bitmap = ((self._bitmap << diff) | 1) & self._mask
            self.highest = seq
        elif -diff < self._size:
            self._bitmap |= 1 << -diff

    def infer_esn(self, seq_low32: int, highest: int | None = None) -> int:
        """The 64-bit sequence number for the low 32 bits seen on the wire.

        RFC 4303 Appendix A2.2: the high half is guessed from the window's top
        ``T = Th:Tl`` and size ``W``; the guess is confirmed by the ICV, which
        covers the high half (RFC 4303 §2.2.1, RFC 4106 §5).  ``highest``
        stands in for the window's top (a batch guesses ahead with it).
        """
        top = self.highest if highest is None else highest
        th = top >> 32
        tl = top & _LOW32
        bottom = tl - self._size + 1
        if bottom >= 0:
            # Case A: the window lies within one subspace.
            seqh = th if seq_low32 >= bottom else th + 1
        else:
            # Case B: the window spans two subspaces.
            seqh = th - 1 if seq_low32 >= bottom + _SUBSPACE and th > 0 else th
        return (seqh << 32) | seq_low32

    def export_state(self) -> ReplayState:
        return ReplayState(self._size, self.highest, self._bitmap)

    def import_state(self, state: ReplayState) -> None:
        """Continue from a state exported by another member's window."""
        if state.size != self._size:
            raise ValueError(
                f"replay state is for a window of {state.size}, this one has {self._size}")
        if state.highest < 0 or state.highest >= 1 << 64:
            raise ValueError(f"replay state highest out of 64 bits: {state.highest}")
        if state.bitmap < 0 or state.bitmap > self._mask:
            raise ValueError(f"replay state bitmap wider than {self._size} bits")
        self.highest = state.highest
        # Keep the invariant that sequence number 0 is never acceptable.
        self._bitmap = state.bitmap | (1 if state.highest == 0 else 0)

    @classmethod
    def from_state(cls, state: ReplayState) -> ReplayWindow:
        window = cls(state.size)
        window.import_state(state)
        return window

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self._size}, highest={self.highest})"
