"""Bounds-checked reader and writer over bytes (aioquic ``buffer.py`` style).

Every ``pull_*`` raises ``MalformedMessage`` when the data runs out, so parsers
built on this never leak ``IndexError`` or ``struct.error``.
"""

from __future__ import annotations

import struct

from common.errors import MalformedMessage

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class Reader:
    """Reads big-endian integers and byte strings from a buffer, bounds-checked."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview, start: int = 0,
                 end: int | None = None) -> None:
        self._data = memoryview(data)
        self._end = len(self._data) if end is None else end
        if not 0 <= start <= self._end <= len(self._data):
            raise MalformedMessage("reader bounds outside the buffer")
        self._pos = start

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def eof(self) -> bool:
        return self._pos >= self._end

    def _need(self, n: int) -> int:
        pos = self._pos
        if n < 0 or pos + n > self._end:
            raise MalformedMessage(
                f"truncated: need {n} bytes at offset {pos}, have {self._end - pos}")
        self._pos = pos + n
        return pos

    def pull_uint8(self) -> int:
        pos = self._need(1)
        return self._data[pos]

    def pull_uint16(self) -> int:
        pos = self._need(2)
        return int(_U16.unpack_from(self._data, pos)[0])

    def pull_uint32(self) -> int:
        pos = self._need(4)
        return int(_U32.unpack_from(self._data, pos)[0])

    def pull_uint64(self) -> int:
        pos = self._need(8)
        return int(_U64.unpack_from(self._data, pos)[0])

    def pull_bytes(self, n: int) -> bytes:
        pos = self._need(n)
        return bytes(self._data[pos:pos + n])

    def pull_view(self, n: int) -> memoryview:
        """Like ``pull_bytes`` but without a copy."""
        pos = self._need(n)
        return self._data[pos:pos + n]

    def pull_rest(self) -> bytes:
        return self.pull_bytes(self.remaining)

    def sub_reader(self, n: int) -> Reader:
        """A reader over the next ``n`` bytes; this reader skips past them."""
        pos = self._need(n)
        return Reader(self._data, pos, pos + n)


class Writer:
    """Appends big-endian integers and byte strings to a growing buffer."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def data(self) -> bytes:
        return bytes(self._buf)

    def push_uint8(self, v: int) -> None:
        if not 0 <= v <= 0xFF:
            raise ValueError(f"uint8 out of range: {v}")
        self._buf.append(v)

    def push_uint16(self, v: int) -> None:
        self._buf += _U16.pack(v)

    def push_uint32(self, v: int) -> None:
        self._buf += _U32.pack(v)

    def push_uint64(self, v: int) -> None:
        self._buf += _U64.pack(v)

    def push_bytes(self, b: bytes | bytearray | memoryview) -> None:
        self._buf += b

    def patch_uint16(self, offset: int, v: int) -> None:
        """Overwrite a 16-bit length field written earlier."""
        _U16.pack_into(self._buf, offset, v)

    def patch_uint32(self, offset: int, v: int) -> None:
        _U32.pack_into(self._buf, offset, v)
