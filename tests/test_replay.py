"""RFC 4303 §3.4.3 anti-replay window and Appendix A2.2 ESN inference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ReplayError
from common.esp.replay import ReplayState, ReplayWindow


def accept(window: ReplayWindow, seq: int) -> bool:
    """check → (authenticated) → record, as the SA does."""
    try:
        window.check(seq)
    except ReplayError:
        return False
    window.record(seq)
    return True


def test_duplicates_and_left_of_window_refused() -> None:
    w = ReplayWindow(32)
    assert accept(w, 1) and accept(w, 3) and accept(w, 2)
    assert not accept(w, 2)
    assert accept(w, 100)
    assert w.highest == 100
    assert accept(w, 69)           # 100 - 31: the window's left edge
    assert not accept(w, 68)       # left of the window
    assert not accept(w, 0)        # sequence number 0 is never valid


def test_check_does_not_record() -> None:
    w = ReplayWindow()
    w.check(5)
    w.check(5)                      # not recorded: a forged packet moves nothing
    assert w.highest == 0
    w.record(5)
    with pytest.raises(ReplayError, match="already"):
        w.check(5)


def test_big_jump_clears_window() -> None:
    w = ReplayWindow(64)
    for seq in range(1, 65):
        w.record(seq)
    w.record(10_000)
    assert accept(w, 10_000 - 63)
    with pytest.raises(ReplayError, match="left of the window"):
        w.check(10_000 - 64)


class SetModel:
    """The reference: a set of everything accepted and the highest value."""

    def __init__(self, size: int) -> None:
        self.size, self.seen, self.highest = size, {0}, 0

    def accept(self, seq: int) -> bool:
        if seq in self.seen or seq <= self.highest - self.size:
            return False
        self.seen.add(seq)
        self.highest = max(self.highest, seq)
        return True


@settings(max_examples=300, deadline=None)
@given(size=st.sampled_from([32, 64, 100, 1024]),
       seqs=st.lists(st.integers(min_value=0, max_value=3000), max_size=400))
def test_window_matches_set_model(size: int, seqs: list[int]) -> None:
    window, model = ReplayWindow(size), SetModel(size)
    for seq in seqs:
        assert accept(window, seq) == model.accept(seq), seq
        assert window.highest == model.highest


@settings(max_examples=100, deadline=None)
@given(seqs=st.lists(st.integers(min_value=1, max_value=500), max_size=200))
def test_export_import_round_trip(seqs: list[int]) -> None:
    a = ReplayWindow(64)
    for seq in seqs:
        accept(a, seq)
    b = ReplayWindow.from_state(a.export_state())
    for seq in range(1, 600):
        assert accept(ReplayWindow.from_state(a.export_state()), seq) == accept(
            ReplayWindow.from_state(b.export_state()), seq)


def test_import_validates() -> None:
    w = ReplayWindow(64)
    with pytest.raises(ValueError, match="window of 32"):
        w.import_state(ReplayState(32, 5, 1))
    with pytest.raises(ValueError, match="bitmap wider"):
        w.import_state(ReplayState(64, 5, 1 << 64))
    with pytest.raises(ValueError, match="64 bits"):
        w.import_state(ReplayState(64, -1, 1))


@pytest.mark.parametrize("size", [31, 0, -5, 65537, 1.5, True, "1024"])
def test_bad_window_size(size: object) -> None:
    with pytest.raises(ValueError, match="replay window size"):
        ReplayWindow(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [32, 64, 1024, 4096, 65536])
def test_allowed_window_sizes(size: int) -> None:
    w = ReplayWindow(size)
    w.record(size + 10)
    assert accept(w, 11) and not accept(w, 10)


# RFC 4303 Appendix A2.2: infer the high 32 bits from the window's top T.
def _at(highest: int, size: int = 64) -> ReplayWindow:
    w = ReplayWindow(size)
    w.record(highest)
    return w


def test_esn_case_a_same_and_next_subspace() -> None:
    w = _at((5 << 32) | 1000)                # window 937..1000 in subspace 5
    assert w.infer_esn(990) == (5 << 32) | 990
    assert w.infer_esn(5000) == (5 << 32) | 5000
    assert w.infer_esn(100) == (6 << 32) | 100   # below the window: wrapped ahead


def test_esn_case_b_window_spans_the_boundary() -> None:
    w = _at((1 << 32) | 10)                  # window reaches back into subspace 0
    assert w.infer_esn(0xFFFF_FFF0) == 0xFFFF_FFF0             # previous subspace
    assert w.infer_esn(5) == (1 << 32) | 5
    assert w.infer_esn(20) == (1 << 32) | 20
    assert _at(10).infer_esn(0xFFFF_FFF0) == 0xFFFF_FFF0      # no subspace -1


def test_esn_across_the_2_32_boundary_with_the_window() -> None:
    w = ReplayWindow(64)
    seq = 0xFFFF_FFF0
    w.record(seq)
    for low in [*range(0xFFFF_FFF1, 0x1_0000_0000), *range(0, 20)]:
        full = w.infer_esn(low)
        assert full == (seq & ~0xFFFF_FFFF) + low + (1 << 32 if low < 0x8000_0000 else 0)
        w.check(full)
        w.record(full)
    assert w.highest == (1 << 32) | 19
    late = w.infer_esn(0xFFFF_FFF8)          # a late packet from before the wrap
    assert late == 0xFFFF_FFF8
    with pytest.raises(ReplayError):
        w.check(late)
