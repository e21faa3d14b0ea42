"""The segment table (common/cluster/segments.py): assignment, failover, join, wire."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.cluster.segments import SegmentMove, SegmentTable, TableMode
from common.errors import LocalProtocolError, MalformedMessage


def rows(t: SegmentTable) -> list[tuple[int | None, int | None]]:
    return [(t.owner(s), t.backup(s)) for s in range(t.segments)]


def check_invariants(t: SegmentTable) -> None:
    live = set(t.members)
    for s in range(t.segments):
        owner, backup = t.owner(s), t.backup(s)
        if live:
            assert owner in live                    # exactly one live owner
        assert backup is None or (backup in live and backup != owner)
        assert t.row_epoch(s) <= t.epoch
    assert sorted(s for m in live for s in t.segments_of(m)) == list(range(t.segments)) \
        or not live


def test_assign_round_robin_with_ring_backups() -> None:
    t = SegmentTable(2).assign([1, 2, 3])
    assert rows(t) == [(1, 2), (2, 3), (3, 1), (1, 2)]
    assert t.epoch == 1
    assert t.segments_of(1) == [0, 3]
    assert t.backups_of(1) == [2]
    assert t.members == (1, 2, 3)


def test_assign_one_member_has_no_backup() -> None:
    t = SegmentTable(3).assign([7])
    assert rows(t) == [(7, None)] * 8


@pytest.mark.parametrize("bad", [[], [0], [1, 1], [70000], [True]])
def test_assign_rejects_bad_members(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        SegmentTable(2).assign(bad)


def test_unassigned_table_has_no_owners() -> None:
    t = SegmentTable(1)
    assert rows(t) == [(None, None), (None, None)]
    with pytest.raises(ValueError):
        t.owner(2)


def test_fail_over_moves_segments_to_backups_and_refills_backups() -> None:
    t = SegmentTable(2).assign([1, 2, 3])
    moves = t.fail_over(2)
    # Segment 1 (2, 3) -> owner 3; segment 0 (1, 2) keeps owner 1, needs a backup.
    assert moves == [SegmentMove(1, 2, 3, 1), SegmentMove(0, 1, 1, 3), SegmentMove(3, 1, 1, 3)]
    assert rows(t) == [(1, 3), (3, 1), (3, 1), (1, 3)]
    assert t.epoch == 2
    assert 2 not in t.members
    assert t.fail_over(2) == []        # not a member any more: no change
    assert t.epoch == 2


def test_fail_over_of_last_backup_leaves_no_backup() -> None:
    t = SegmentTable(2).assign([1, 2])
    t.fail_over(1)
    assert rows(t) == [(2, None)] * 4
    t.fail_over(2)
    assert rows(t) == [(None, None)] * 4
    assert t.join(5) == [SegmentMove(s, None, 5, None) for s in range(4)]


def test_hot_standby_fails_over_in_standby_order() -> None:
    t = SegmentTable(2).hot_standby(1, [4, 3, 2])
    assert rows(t) == [(1, 4)] * 4
    assert t.mode is TableMode.HOT_STANDBY
    t.fail_over(1)
    assert rows(t) == [(4, 3)] * 4
    # A joining member becomes a standby; it is not given segments.
    assert t.join(9) == []
    t.fail_over(3)
    assert rows(t) == [(4, 2)] * 4


def test_join_gives_a_fair_share_back_and_then_nothing() -> None:
    t = SegmentTable(4).assign([1, 2, 3])
    t.fail_over(3)
    plan = t.join(3)
    assert plan
    before = t.copy()
    t.apply(plan)
    assert t.epoch == before.epoch + 1
    assert t.join(3) == []
    owned = [len(t.segments_of(m)) for m in (1, 2, 3)]
    backed = [len(t.backups_of(m)) for m in (1, 2, 3)]
    assert max(owned) - min(owned) <= 1
    assert max(backed) - min(backed) <= 1
    check_invariants(t)


def test_join_plan_is_gradual() -> None:
    t = SegmentTable(6).assign([1, 2])
    full = t.join(3)
    batches = 0
    while batch := t.join_plan(3, 5):
        assert len(batch) <= 5
        epoch = t.epoch
        t.apply(batch)
        assert t.epoch == epoch + 1
        batches += 1
    assert batches >= len(full) // 5
    assert len(t.segments_of(3)) in (21, 22)
    check_invariants(t)


def test_join_of_second_member_gives_backups_first() -> None:
    t = SegmentTable(2).assign([1])
    plan = t.join_plan(2, 4)
    assert plan == [SegmentMove(s, 1, 1, 2) for s in range(4)]


def test_moved_segment_keeps_state_holders_as_backup() -> None:
    t = SegmentTable(1).assign([1])
    t.apply(t.join(2))
    for s in t.segments_of(2):
        assert t.backup(s) == 1            # the old owner has the state


def test_apply_refuses_stale_and_bad_moves_without_change() -> None:
    t = SegmentTable(2).assign([1, 2])
    snapshot = t.copy()
    with pytest.raises(LocalProtocolError, match="stale"):
        t.apply([SegmentMove(0, 1, 3, None), SegmentMove(1, 1, 3, None)])
    with pytest.raises(LocalProtocolError, match="same member"):
        t.apply([SegmentMove(0, 1, 2, 2)])
    assert t == snapshot
    t.apply([])
    assert t == snapshot                   # no change, no epoch bump


def test_diff_is_the_moves_between_tables() -> None:
    a = SegmentTable(3).assign([1, 2, 3])
    b = a.copy()
    moves = b.fail_over(1)
    assert sorted(a.diff(b), key=lambda m: m.segment) == sorted(moves, key=lambda m: m.segment)
    a.apply(a.diff(b))
    assert rows(a) == rows(b)
    assert a.diff(a) == []
    with pytest.raises(ValueError):
        a.diff(SegmentTable(4))


def test_encode_decode_round_trip() -> None:
    t = SegmentTable(4).assign([1, 2, 3])
    t.fail_over(2)
    data = t.encode()
    assert data[0] == 1                                   # version
    u = SegmentTable.decode(data)
    assert u == t
    assert SegmentTable.decode(SegmentTable(0).encode()) == SegmentTable(0)
    h = SegmentTable(1).hot_standby(3, [1])
    assert SegmentTable.decode(h.encode()) == h


def test_every_truncation_and_extension_is_malformed() -> None:
    data = SegmentTable(3).assign([1, 2]).encode()
    for n in range(len(data)):
        with pytest.raises(MalformedMessage):
            SegmentTable.decode(data[:n])
    with pytest.raises(MalformedMessage):
        SegmentTable.decode(data + b"\x00")


@pytest.mark.parametrize("offset, value", [
    (0, 2),          # version
    (1, 17),         # segment bits
    (2, 5),          # mode
    (3, 1),          # reserved
])
def test_bad_heads_are_malformed(offset: int, value: int) -> None:
    data = bytearray(SegmentTable(2).assign([1, 2]).encode())
    data[offset] = value
    with pytest.raises(MalformedMessage):
        SegmentTable.decode(bytes(data))


def test_bad_rows_are_malformed() -> None:
    good = SegmentTable(1).assign([1, 2]).encode()
    rows_at = 14 + 2 * 2
    for owner, backup in [(9, 0), (1, 1), (0, 2), (1, 9)]:
        data = bytearray(good)
        data[rows_at:rows_at + 4] = owner.to_bytes(2, "big") + backup.to_bytes(2, "big")
        with pytest.raises(MalformedMessage):
            SegmentTable.decode(bytes(data))
    data = bytearray(good)
    data[rows_at + 4:rows_at + 12] = (99).to_bytes(8, "big")      # row epoch > epoch
    with pytest.raises(MalformedMessage):
        SegmentTable.decode(bytes(data))
    data = bytearray(good)
    data[14:16] = data[16:18]                                      # duplicate member
    with pytest.raises(MalformedMessage):
        SegmentTable.decode(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    try:
        SegmentTable.decode(data)
    except MalformedMessage:
        pass


# -- Hypothesis: sequences of membership events keep the invariants -----------------

member_ids = st.integers(min_value=1, max_value=8)
events = st.lists(st.tuples(st.sampled_from(["fail", "join", "join_step"]), member_ids),
                  max_size=25)


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(min_value=0, max_value=5),
       start=st.lists(member_ids, min_size=1, max_size=5, unique=True),
       hot=st.booleans(), script=events)
def test_invariants_hold_over_any_event_sequence(
        bits: int, start: list[int], hot: bool, script: list[tuple[str, int]]) -> None:
    t = SegmentTable(bits)
    if hot:
        t.hot_standby(start[0], start[1:])
    else:
        t.assign(start)
    check_invariants(t)
    for action, member in script:
        before = t.copy()
        epoch = t.epoch
        if action == "fail":
            moves = t.fail_over(member)
            assert member not in t.members
            assert t.segments_of(member) == [] and t.backups_of(member) == []
        else:
            moves = t.join(member) if action == "join" else t.join_plan(member, 3)
            assert t == before                      # planning changes nothing
            t.apply(moves)
        check_invariants(t)
        named = {mv.segment for mv in moves}
        changed = {s for s in range(t.segments)
                   if (t.owner(s), t.backup(s)) != (before.owner(s), before.backup(s))}
        assert changed <= named                     # only the named segments moved
        changed_members = t.members != before.members
        assert t.epoch == (epoch + 1 if moves or changed_members else epoch)
        for s in range(t.segments):
            assert t.row_epoch(s) == (t.epoch if s in named else before.row_epoch(s))
        assert SegmentTable.decode(t.encode()) == t
        # A failover gives every segment it touched a backup when one can exist.
        if len(t.members) >= 2 and action == "fail":
            assert all(t.backup(s) is not None for s in named)
