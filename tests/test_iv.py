"""IV generator: sender_id (16 bits) || counter (48 bits), RFC 6027 §3.7.1."""

from __future__ import annotations

import pytest

from common.errors import SequenceExhausted
from common.esp.iv import COUNTER_LIMIT, IvGenerator


def test_iv_layout() -> None:
    gen = IvGenerator(sender_id=0xABCD, initial_counter=5)
    assert gen.next_iv() == bytes.fromhex("abcd 000000000005")
    assert gen.next_int() == 0xABCD_0000_0000_0006
    assert gen.counter == 7


def test_two_senders_never_share_an_iv() -> None:
    a, b = IvGenerator(1), IvGenerator(2)
    seen_a = {a.next_iv() for _ in range(5000)}
    seen_b = {b.next_iv() for _ in range(5000)}
    assert len(seen_a) == len(seen_b) == 5000
    assert not seen_a & seen_b
    # Even where counters meet, the prefix differs: the top 16 bits are the id.
    assert IvGenerator(1, 9).next_iv()[:2] != IvGenerator(2, 9).next_iv()[:2]


def test_counter_never_wraps() -> None:
    gen = IvGenerator(3, COUNTER_LIMIT - 2)
    gen.next_int()
    assert gen.next_int() == (3 << 48) | (COUNTER_LIMIT - 1)
    with pytest.raises(SequenceExhausted):
        gen.next_int()
    with pytest.raises(SequenceExhausted):
        gen.next_int()   # stays exhausted, never wraps to 0


def test_reserve_takes_a_block() -> None:
    gen = IvGenerator(1, 10)
    assert gen.reserve(100) == (1 << 48) | 10
    assert gen.counter == 110
    with pytest.raises(SequenceExhausted):
        IvGenerator(1, COUNTER_LIMIT - 5).reserve(6)
    with pytest.raises(ValueError, match="positive"):
        gen.reserve(0)


def test_skip_ahead_only_forward() -> None:
    gen = IvGenerator(1, 100)
    gen.skip_to(1000)             # a takeover resumes past the synced counter
    assert gen.next_int() & (COUNTER_LIMIT - 1) == 1000
    with pytest.raises(ValueError, match="forward"):
        gen.skip_to(10)


@pytest.mark.parametrize("sender_id", [-1, 1 << 16, True, "7"])
def test_bad_sender_id(sender_id: object) -> None:
    with pytest.raises(ValueError, match="sender_id"):
        IvGenerator(sender_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("counter", [-1, COUNTER_LIMIT])
def test_bad_initial_counter(counter: int) -> None:
    with pytest.raises(ValueError, match="48 bits"):
        IvGenerator(1, counter)
