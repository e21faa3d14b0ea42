"""IV generator for counter-mode ESP ciphers: ``sender_id (16) || counter (48)``.

Rules of this file:
- AES-GCM (RFC 4106 §3.1) and AES-CTR (RFC 3686 §3.1) fail badly if an IV
  repeats under one key.  In a cluster several members may send under the same
  key over time (RFC 6027 §3.7.1), so each member *incarnation* gets its own
  16-bit sender id (RFC 6054 style); the 48-bit counter below it never repeats
  and never wraps.  Two generators with different sender ids therefore never
  produce the same 8-byte IV.
"""

from __future__ import annotations

import struct

from common.errors import SequenceExhausted

SENDER_ID_BITS = 16
COUNTER_BITS = 48
MAX_SENDER_ID = (1 << SENDER_ID_BITS) - 1
COUNTER_LIMIT = 1 << COUNTER_BITS  # first counter value that may not be used
IV_SIZE = 8
_IV = struct.Struct("!Q")


def check_sender_id(sender_id: int) -> int:
    if isinstance(sender_id, bool) or not isinstance(sender_id, int) \
            or not 0 <= sender_id <= MAX_SENDER_ID:
        raise ValueError(f"sender_id must be an int in 0..{MAX_SENDER_ID} (16 bits), "
                         f"got {sender_id!r}")
    return sender_id


class IvGenerator:
    """Hands out unique 8-byte IVs for one SA on one sender."""

    __slots__ = ("_counter", "_prefix", "_sender_id")

    def __init__(self, sender_id: int, initial_counter: int = 0) -> None:
        self._sender_id = check_sender_id(sender_id)
        if isinstance(initial_counter, bool) or not isinstance(initial_counter, int) \
                or not 0 <= initial_counter < COUNTER_LIMIT:
            raise ValueError(f"initial IV counter must be an int in 0..{COUNTER_LIMIT - 1} "
                             f"(48 bits), got {initial_counter!r}")
        self._prefix = sender_id << COUNTER_BITS
        self._counter = initial_counter

    @property
    def sender_id(self) -> int:
        return self._sender_id

    @property
    def counter(self) -> int:
        """The counter the next IV will carry (export it for a takeover)."""
        return self._counter

    @property
    def remaining(self) -> int:
        return COUNTER_LIMIT - self._counter

    def next_int(self) -> int:
        """The next IV as a 64-bit integer."""
        counter = self._counter
        if counter >= COUNTER_LIMIT:
            raise SequenceExhausted(f"IV counter of sender {self._sender_id} exhausted")
        self._counter = counter + 1
        return self._prefix | counter

    def next_iv(self) -> bytes:
        """The next IV as the 8 bytes sent on the wire."""
        return _IV.pack(self.next_int())

    def reserve(self, count: int) -> int:
        """Take ``count`` consecutive IVs at once; return the first as an integer.

        The SA's per-packet path uses this to stay a single addition; the block
        is gone from the generator whether or not all of it is used.
        """
        if count < 1:
            raise ValueError(f"reserve needs a positive count, got {count}")
        counter = self._counter
        if counter + count > COUNTER_LIMIT:
            raise SequenceExhausted(
                f"IV counter of sender {self._sender_id} cannot supply {count} more IVs "
                f"({COUNTER_LIMIT - counter} left)")
        self._counter = counter + count
        return self._prefix | counter

    def skip_to(self, counter: int) -> None:
        """Jump forward (takeover skip-ahead); going back would reuse IVs."""
        if counter < self._counter:
            raise ValueError(f"IV counter may only move forward: {counter} < {self._counter}")
        if counter > COUNTER_LIMIT:
            raise ValueError(f"IV counter beyond 48 bits: {counter}")
        self._counter = counter

    def __repr__(self) -> str:
        return f"IvGenerator(sender_id={self._sender_id}, counter={self._counter})"
