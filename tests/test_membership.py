"""The membership machine (common/cluster/membership.py) in-process, with a
fake clock: failure detection, takeover planning, autobalance, fencing, and
Hypothesis over interleavings of HELLO, heartbeats, ticks and exits; the
placement functions (common/cluster/placement.py) it and the members use."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from common.cluster.events import Event, EventType
from common.cluster.membership import (
    MAX_CLAIMED_EPOCH,
    STARTUP_WAIT_S,
    Claim,
    Level,
    Membership,
    Outputs,
)
from common.cluster.placement import (
    AUTOBALANCE_STEP_S,
    JOIN_BATCH,
    PREPARE_S,
    donor_segments,
    heal_backups,
    least_loaded,
    member_loads,
    read_loads,
    segment_loads,
    spread_backups,
)
from common.cluster.segments import SegmentTable
from common.cluster.spi import segment_of_esp_spi
from common.cluster.wire import (
    Channel,
    Heartbeat,
    Notice,
    NoticeKind,
    TableUpdate,
    Timing,
    decode,
    encode,
)
from common.esp.iv import MAX_SENDER_ID
from tests.fuzz import fuzz_settings

#: exact in binary, so "dead after N missed heartbeats, not before" is exact too
INTERVAL = 0.125
DEAD_AFTER = 3
LIMIT = INTERVAL * DEAD_AFTER
DISPATCHER_PID = 4242


@dataclass
class Route:
    """What the dispatcher routes a child SA to (its ``RouteInfo``)."""

    member: int


def machine(expect: int = 3, bits: int = 4, hot_standby: bool = False) -> Membership:
    return Membership(bits, expect=expect, heartbeat_interval=INTERVAL, dead_after=DEAD_AFTER,
                      hot_standby=hot_standby, pid=DISPATCHER_PID)


class Cluster:
    """A machine, a fake clock and members that heartbeat when told."""

    def __init__(self, expect: int = 3, bits: int = 4, hot_standby: bool = False) -> None:
        self.m = machine(expect, bits, hot_standby)
        self.now = 0.0
        self.m.start(self.now)
        self.children: dict[int, Route] = {}

    def hello(self, member: int, pid: int | None = None) -> Outputs:
        return self.m.hello(member, pid if pid is not None else 100 + member, "host",
                            0xC0FFEE + member, self.now, self.children)

    def beat(self, *members: int) -> None:
        for member in members or self.m.alive():
            inc = self.m.members[member]
            self.m.heartbeat(member, inc.sender_id, self.now)

    def tick(self, dt: float = INTERVAL, beat: bool = True) -> Outputs:
        """``dt`` later; the live members heartbeat just before (``beat``)."""
        self.now += dt
        if beat:
            self.beat()
        return self.m.tick(self.now, self.children)

    def owners(self) -> dict[int, int | None]:
        return {s: self.m.table.owner(s) for s in range(self.m.table.segments)}


def events(out: Outputs, kind: EventType) -> list[Event]:
    return [e for e in out.events if e.type is kind]


def texts(out: Outputs) -> list[str]:
    return [line.text for line in out.logs]


def started(expect: int = 3, bits: int = 4) -> Cluster:
    c = Cluster(expect, bits)
    for m in range(1, expect + 1):
        c.hello(m)
    assert c.m.table.members == tuple(range(1, expect + 1))
    return c


# -- HELLO -------------------------------------------------------------------------------


def test_hello_answers_the_sender_id_and_token_then_the_table() -> None:
    c = Cluster(expect=2)
    c.children[0x1000] = Route(1)
    out = c.hello(1)
    assert [s.member for s in out.sends] == [1, 1]
    hb, table = out.sends[0].message, out.sends[1].message
    assert hb == Heartbeat(0, 1, DISPATCHER_PID, 0, token=0xC0FFEE + 1, loads={1: 1})
    assert isinstance(table, TableUpdate) and table.table.epoch == 0
    assert events(out, EventType.MEMBER_JOINED) == [
        Event(EventType.MEMBER_JOINED, member=1, sender_id=1)]
    assert texts(out) == ["member 1 joined (pid 101 on host), sender id 1"]
    assert not out.table_changed and not c.m.table.members


def test_the_table_is_assigned_when_the_expected_members_came() -> None:
    c = Cluster(expect=3, bits=4)
    c.hello(1)
    c.hello(2)
    out = c.hello(3)
    t = c.m.table
    assert t.members == (1, 2, 3)
    assert sorted(len(t.segments_of(m)) for m in (1, 2, 3)) == [5, 5, 6]
    # each member's segments are backed up by both others in turn
    for m in (1, 2, 3):
        assert {t.backup(s) for s in t.segments_of(m)} == {1, 2, 3} - {m}
    assert out.table_changed and len(out.moves) == 16
    assert texts(out)[-1] == f"segment table epoch {t.epoch}: {{1: 6, 2: 5, 3: 5}}"
    [moved] = events(out, EventType.SEGMENTS_MOVED)
    assert moved.reason == "assign" and moved.epoch == t.epoch and len(moved.segments) == 16
    updates = [s for s in out.sends if isinstance(s.message, TableUpdate)]
    assert sorted(s.member for s in updates) == [1, 2, 3]
    assert all(s.message.table == t for s in updates if isinstance(s.message, TableUpdate))


def test_hot_standby_gives_every_segment_to_the_first_member() -> None:
    c = Cluster(expect=2, hot_standby=True)
    c.hello(1)
    c.hello(2)
    t = c.m.table
    assert t.segments_of(1) == list(range(16)) and t.backups_of(2) == list(range(16))
    c.m.exited(1, 101)
    assert t.segments_of(2) == list(range(16))
    c.hello(1, pid=201)
    for _ in range(40):              # a returning member gets nothing back in hot standby
        c.tick()
    assert not t.segments_of(1) and 1 not in c.m.balancing


def test_the_startup_wait_starts_with_whoever_came() -> None:
    c = Cluster(expect=3)
    c.hello(1)
    c.hello(2)
    while c.now + INTERVAL <= STARTUP_WAIT_S:
        assert not c.tick().table_changed
    assert not c.m.table.members
    out = c.tick()
    assert out.table_changed and c.m.table.members == (1, 2)


def test_a_hello_for_a_live_member_is_refused_and_changes_nothing() -> None:
    c = started()
    before = (c.m.table.copy(), dict(c.m.members), c.m.next_sender_id)
    out = c.hello(2, pid=999)
    assert out.refused == "hello_member_alive" and not out.sends and not out.events
    assert (c.m.table, c.m.members, c.m.next_sender_id) == before
    again = c.m.answer(2, c.children)        # the same incarnation asking again
    hb = again.sends[0].message
    assert isinstance(hb, Heartbeat) and hb.sender_id == 2 and hb.token == 0xC0FFEE + 2
    assert isinstance(again.sends[1].message, TableUpdate)


# -- failure detection ------------------------------------------------------------------


def test_dead_after_dead_after_missed_heartbeats_not_before() -> None:
    c = started()
    c.tick()
    silent_since = c.now
    c.beat()
    for _ in range(DEAD_AFTER):       # 3 intervals without a heartbeat of member 2
        c.now += INTERVAL
        c.beat(1, 3)
        out = c.m.tick(c.now, c.children)
        assert c.m.members[2].alive and not events(out, EventType.MEMBER_DEAD)
        assert 2 in [s.member for s in out.sends]       # it still gets our heartbeat
    assert c.now - silent_since == LIMIT
    c.now += INTERVAL
    c.beat(1, 3)
    out = c.m.tick(c.now, c.children)
    assert not c.m.members[2].alive
    assert events(out, EventType.MEMBER_DEAD) == [
        Event(EventType.MEMBER_DEAD, member=2, reason=f"no heartbeat for {DEAD_AFTER} intervals")]
    assert f"member 2 declared dead (no heartbeat for {DEAD_AFTER} intervals)" in texts(out)
    assert c.m.members[1].alive and c.m.members[3].alive


def test_heartbeats_keep_a_member_alive_for_ever() -> None:
    c = started()
    for _ in range(1000):
        out = c.tick()
        assert not events(out, EventType.MEMBER_DEAD)
    assert c.m.alive() == [1, 2, 3]


def test_only_the_current_incarnations_heartbeat_counts() -> None:
    c = started()
    sender = c.m.members[2].sender_id
    for _ in range(DEAD_AFTER + 1):
        c.now += INTERVAL
        c.beat(1, 3)
        c.m.heartbeat(2, sender + 100, c.now)            # not its sender id
        c.m.heartbeat(2, sender, c.now - 10 * LIMIT)      # (last_seen: as given)
        c.m.tick(c.now, c.children)
    assert not c.m.members[2].alive


def test_our_heartbeats_carry_each_members_load() -> None:
    c = started()
    c.children.update({0x1000_0000: Route(1), 0x2000_0000: Route(1), 0x3000_0000: Route(3)})
    out = c.tick()
    beats = [s for s in out.sends if isinstance(s.message, Heartbeat)]
    assert sorted(s.member for s in beats) == [1, 2, 3]
    for s in beats:
        assert isinstance(s.message, Heartbeat)
        assert s.message.loads == {1: 2, 2: 0, 3: 1}
        assert s.message.sender_id == c.m.members[s.member].sender_id
        assert s.message.epoch_seen == c.m.table.epoch and s.message.token == 0


# -- takeover ----------------------------------------------------------------------------


def test_a_dead_members_segments_go_to_their_backups_and_get_new_backups() -> None:
    c = started(expect=3, bits=5)
    t = c.m.table
    before = t.copy()
    theirs = {s: before.backup(s) for s in before.segments_of(2)}
    out = c.m.exited(2, 102)
    assert texts(out)[:2] == ["member 2 (pid 102) exited: fenced",
                              "member 2 declared dead (process 102 exited)"]
    assert t.epoch == before.epoch + 1
    assert texts(out)[2] == f"segment table epoch {t.epoch}: {len(out.moves)} segments moved"
    for s, backup in theirs.items():
        assert t.owner(s) == backup                      # its backup has its replicas
    for s in range(t.segments):
        assert t.owner(s) in (1, 3) and t.backup(s) in (1, 3) and t.backup(s) != t.owner(s)
    # split among the survivors (spread backups), not dumped on one
    assert {s for s in theirs if t.owner(s) == 1} and {s for s in theirs if t.owner(s) == 3}
    takeovers = events(out, EventType.TAKEOVER)
    assert {e.member for e in takeovers} == {1, 3}
    for e in takeovers:
        assert e.dead == 2 and e.epoch == t.epoch
        assert set(e.segments) == {s for s, b in theirs.items() if b == e.member}
    [moved] = events(out, EventType.SEGMENTS_MOVED)
    assert moved.reason == "failover" and set(moved.segments) == {mv.segment for mv in out.moves}
    assert events(out, EventType.MEMBER_DEAD)[0].reason == "process 102 exited"
    updates = [s for s in out.sends if isinstance(s.message, TableUpdate)]
    assert sorted(s.member for s in updates) == [1, 3]


def test_a_sent_table_is_the_table_as_it_was_then() -> None:
    c = started(expect=3, bits=4)
    out = c.m.exited(2, 102)
    sent = next(s.message for s in out.sends if isinstance(s.message, TableUpdate))
    epoch = c.m.table.epoch
    c.hello(4)
    for _ in range(20):
        c.tick()
    assert c.m.table.epoch > epoch and sent.table.epoch == epoch


def test_the_last_member_dying_leaves_no_owner_and_its_return_restarts_the_table() -> None:
    c = started(expect=2)
    c.m.exited(1, 101)
    c.m.exited(2, 102)
    assert not c.m.table.members and set(c.owners().values()) == {None}
    c.now = STARTUP_WAIT_S + 1        # nobody alive after the startup wait: nothing to do
    assert not c.tick().table_changed
    c.hello(2, pid=202)
    out = c.tick()
    assert out.table_changed and set(c.owners().values()) == {2}


# -- fencing -------------------------------------------------------------------------------


def test_an_exit_fences_only_that_incarnation() -> None:
    c = started()
    assert not c.m.exited(2, 999).events and c.m.members[2].alive   # not its pid
    c.m.exited(2, 102)
    assert not c.m.members[2].alive
    assert not c.m.exited(2, 102).events                            # once


def test_a_dead_incarnations_heartbeats_never_give_it_segments() -> None:
    c = started()
    old = c.m.members[2]
    c.m.exited(2, 102)
    logged = []
    for _ in range(200):
        c.now += INTERVAL
        c.beat(1, 3)
        c.m.heartbeat(2, old.sender_id, c.now)
        logged += texts(c.m.heartbeat(2, old.sender_id, c.now, Channel.LIVE))
        c.m.tick(c.now, c.children)
        assert not old.alive and not c.m.table.segments_of(2)
        assert not c.m.table.backups_of(2) and 2 not in c.m.table.members
    assert logged == ["member 2 (pid 102) is back after being declared dead; its output is "
                      "ignored, and it is told to rejoin as a new incarnation"]


def test_a_new_incarnation_gets_a_new_sender_id() -> None:
    c = started()
    old = c.m.members[2].sender_id
    c.m.exited(2, 102)
    c.m.next_sender_id = old                  # even when its turn comes round again
    out = c.hello(2, pid=202)
    new = c.m.members[2].sender_id
    assert new != old and new not in {c.m.members[m].sender_id for m in (1, 3)}
    assert "(restarted)" in texts(out)[0]
    hb = out.sends[0].message
    assert isinstance(hb, Heartbeat) and hb.sender_id == new


def test_sender_ids_wrap_but_skip_every_id_a_live_incarnation_holds() -> None:
    c = Cluster(expect=1)
    c.m.next_sender_id = MAX_SENDER_ID - 1
    for m in (1, 2, 3):
        c.hello(m)
    ids = [c.m.members[m].sender_id for m in (1, 2, 3)]
    assert ids == [MAX_SENDER_ID - 1, MAX_SENDER_ID, 1]
    c.m.next_sender_id = MAX_SENDER_ID - 1    # held by 1, 2 (and 3 holds 1)
    c.hello(4)
    assert c.m.members[4].sender_id == 2
    assert len({i.sender_id for i in c.m.members.values()}) == 4


# -- autobalance ---------------------------------------------------------------------------


def test_a_joining_member_gets_its_share_gradually_after_being_a_backup_for_prepare_s() -> None:
    c = started(expect=3, bits=8)
    t = c.m.table
    share = t.segments // 4
    c.tick(1.0)
    out = c.hello(4)
    assert 4 in c.m.balancing and not t.segments_of(4) and not out.table_changed
    backup_since: dict[int, float] = {}
    owned = 0
    steps = 0
    balanced: list[Event] = []
    while 4 in c.m.balancing:
        steps += 1
        assert steps < 200
        before = t.copy()
        was_prepared = set(c.m.prepared)
        out = c.tick()
        for s in range(t.segments):
            if t.backup(s) == 4 and before.backup(s) != 4:
                backup_since[s] = c.now
            if t.owner(s) == 4 and before.owner(s) != 4:
                # handed over only after it had been the backup PREPARE_S
                assert before.backup(s) == 4 and c.now - backup_since[s] >= PREPARE_S
                assert t.backup(s) == before.owner(s)    # the old owner keeps a replica
        new = len(t.segments_of(4))
        assert owned <= new <= share
        # a batch at a time: at most JOIN_BATCH more segments prepared per step
        assert len(set(c.m.prepared) - was_prepared) <= JOIN_BATCH
        if new > owned:
            assert f"autobalance: member 4 now owns {new} segments (epoch {t.epoch})" \
                in texts(out)
            moved = events(out, EventType.SEGMENTS_MOVED)
            assert moved and moved[-1].reason == "autobalance" and moved[-1].member == 4
        owned = new
        balanced += [e for e in events(out, EventType.SEGMENTS_MOVED) if e.reason == "balanced"]
    assert len(t.segments_of(4)) == share
    assert balanced == [Event(EventType.SEGMENTS_MOVED, member=4, reason="balanced",
                              epoch=t.epoch)]
    assert c.now >= 1.0 + PREPARE_S + (share // JOIN_BATCH - 1) * AUTOBALANCE_STEP_S
    for m in (1, 2, 3):                       # (the donors: the members owning most)
        assert share - 2 <= len(t.segments_of(m)) <= share + 1


def test_autobalance_gives_segments_carrying_children_first() -> None:
    c = started(expect=3, bits=6)
    t = c.m.table
    # member 1 carries 24 children, in 6 of its segments; 2 and 3 none
    for s in t.segments_of(1)[:6]:
        for k in range(4):
            c.children[(s << 26) | k] = Route(1)
    c.tick(1.0)
    c.hello(4)
    c.tick(AUTOBALANCE_STEP_S)
    prepared = [s for s, (m, _) in c.m.prepared.items() if m == 4]
    carrying = {segment_of_esp_spi(spi, 6) for spi in c.children}
    # its fair share of children is 24 // 4 = 6: two segments of member 1 with 4 each, then
    # empty segments (by count) from whoever owns most
    assert len(set(prepared) & carrying) == 2 and len(prepared) == t.segments // 4


def test_a_death_while_a_joining_members_segments_are_handed_over() -> None:
    """Its share grows in the very step its prepared segments are handed over:
    those are not picked again as donor segments (a stale move that stopped
    the dispatcher's monitor, found by the interleavings below)."""
    c = started(expect=2, bits=4)
    c.tick(1.0)
    c.hello(3)
    c.tick(AUTOBALANCE_STEP_S)
    first = {s for s, (m, _) in c.m.prepared.items() if m == 3}
    assert len(first) == 16 // 3
    c.now += PREPARE_S
    c.beat(1, 3)                              # 2 is silent: dead in this tick
    out = c.m.tick(c.now, c.children)
    assert not c.m.members[2].alive
    assert first <= set(c.m.table.segments_of(3))       # handed over
    assert {s for s, (m, _) in c.m.prepared.items() if m == 3}.isdisjoint(first)
    assert [e.reason for e in events(out, EventType.SEGMENTS_MOVED)][-1] == "autobalance"
    while 3 in c.m.balancing:
        c.tick()
    assert len(c.m.table.segments_of(3)) == 16 // 2


def test_a_member_dying_while_it_joins_leaves_nothing_prepared() -> None:
    c = started(expect=3, bits=6)
    c.tick(1.0)
    c.hello(4)
    c.tick(AUTOBALANCE_STEP_S)
    assert c.m.prepared
    c.m.exited(4, 104)
    assert not c.m.prepared and 4 not in c.m.balancing
    assert 4 not in c.m.table.members


# -- placement -----------------------------------------------------------------------------


def test_read_loads_leaves_out_members_that_cannot_be() -> None:
    assert read_loads({1: 3, 64: 0, 65: 9, 0: 1}, 64) == ({1: 3, 64: 0}, 2)


def test_least_loaded_prefers_fewest_children_then_ourselves() -> None:
    t = SegmentTable(4).assign([1, 2, 3])
    assert least_loaded(t, {1: 5, 2: 1, 3: 1}, 3) == 3
    assert least_loaded(t, {1: 5, 2: 1, 3: 1}, 1) == 2
    assert least_loaded(t, {}, 2) == 2
    assert least_loaded(SegmentTable(4), {}, 1) is None


def test_member_and_segment_loads() -> None:
    assert member_loads([1, 1, 3], [1, 2, 3]) == {1: 2, 2: 0, 3: 1}
    assert segment_loads([0x0000_0001, 0x1000_0000, 0x1000_0001], 4) == {0: 1, 1: 2}


def test_heal_backups_gives_every_segment_a_live_backup() -> None:
    t = SegmentTable(4).assign([1, 2, 3])
    t.apply(spread_backups(t))
    assert heal_backups(t, {1, 2, 3}) == []
    moves = heal_backups(t, {1, 3})        # 2 is dead (not yet failed over)
    t.apply(moves)
    assert all(t.backup(s) in (1, 3) and t.backup(s) != t.owner(s)
               for s in range(16) if t.owner(s) != 2)


def test_donor_segments_skip_the_prepared_ones() -> None:
    t = SegmentTable(4).assign([1, 2])
    first = donor_segments(t, 3, 3, {}, {1, 2, 3}, {})
    again = donor_segments(t, 3, 3, {}, {1, 2, 3}, {s: (3, 0.0) for s in first})
    assert len(first) == 3 and not set(first) & set(again)


def test_loads_survive_the_wire() -> None:
    hb = Heartbeat(0, 1, 2, 3, loads={1: 2, 64: 0})
    assert decode(encode(hb, 5)) == (5, hb)


# -- timing keys, notices ----------------------------------------------------------------

TIMING = Timing.of(INTERVAL, DEAD_AFTER, 4, "load-sharing")


def test_a_member_with_other_timing_keys_is_refused_with_one_line() -> None:
    m = Membership(4, expect=1, heartbeat_interval=INTERVAL, dead_after=DEAD_AFTER,
                   timing=TIMING)
    for theirs, line in [
            (Timing.of(0.25, DEAD_AFTER, 4, "load-sharing"),
             "cluster.heartbeat_interval is 0.25 at member 1 but 0.125 at the dispatcher"),
            (Timing.of(INTERVAL, 5, 4, "load-sharing"),
             "cluster.dead_after is 5 at member 1 but 3 at the dispatcher"),
            (Timing.of(INTERVAL, DEAD_AFTER, 8, "load-sharing"),
             "cluster.segment_bits is 8 at member 1 but 4 at the dispatcher"),
            (Timing.of(INTERVAL, DEAD_AFTER, 4, "hot-standby"),
             "cluster.mode is hot-standby at member 1 but load-sharing at the dispatcher")]:
        out = m.hello(1, 101, "h", 7, 0.0, timing=theirs)
        assert out.refused == "hello_timing" and not out.sends and not m.members
        assert out.reply is not None and out.reply.kind is NoticeKind.REFUSED
        assert out.reply.text.startswith(line + ":"), out.reply.text
    out = m.hello(1, 101, "h", 7, 0.0, timing=TIMING)
    assert out.refused is None and m.is_alive(1)


def test_a_dead_incarnation_that_writes_is_told_to_rejoin_and_an_older_one_to_stop() -> None:
    c = started()
    old = c.m.members[2]
    c.m.exited(2, 102)
    out = c.m.heartbeat(2, old.sender_id, c.now, Channel.LIVE)
    assert out.reply == Notice(NoticeKind.DEAD, old.sender_id,
                               f"member 2 sender id {old.sender_id} was declared dead")
    # (on its heartbeat thread's connection: nothing, that thread does not listen)
    assert c.m.heartbeat(2, old.sender_id, c.now).reply is None
    c.hello(2, pid=202)
    new = c.m.members[2]
    out = c.m.heartbeat(2, old.sender_id, c.now, Channel.LIVE)
    assert out.reply is not None and out.reply.kind is NoticeKind.REPLACED
    assert f"pid 202 on host, sender id {new.sender_id}" in out.reply.text
    assert c.m.heartbeat(2, new.sender_id, c.now, Channel.LIVE).reply is None
    assert c.m.standing(4, 9) == Notice(NoticeKind.UNKNOWN, 9,
                                        "no incarnation of this member here")


# -- reattach: a new dispatcher rebuilds from what its members hold ---------------------------

WAIT = 2.0


def successor(expect: int = 3, bits: int = 4) -> Cluster:
    """A dispatcher started after one that died: it waits for reattach claims."""
    c = Cluster(expect, bits)
    c.m = Membership(bits, expect=expect, heartbeat_interval=INTERVAL, dead_after=DEAD_AFTER,
                     pid=DISPATCHER_PID + 1, reattach_wait=WAIT)
    c.m.start(c.now)
    return c


def claim(c: Cluster, member: int, sender_id: int, table: SegmentTable,
          token: int | None = None, pid: int | None = None) -> Outputs:
    return c.m.hello(member, pid or 100 + member, "host", 0, c.now, c.children,
                     claim=Claim(sender_id, token or 0xC0FFEE + member, table))


def old_cluster(bits: int = 4) -> Cluster:
    """The predecessor: three members, a few epochs of history."""
    old = started(bits=bits)
    old.tick(AUTOBALANCE_STEP_S)
    return old


def test_reattached_members_keep_their_sender_ids_and_segments_at_a_higher_epoch() -> None:
    old = old_cluster()
    table = old.m.table.copy()
    ids = {m: old.m.members[m].sender_id for m in (1, 2, 3)}
    c = successor()
    assert claim(c, 1, ids[1], table).sends == []          # held until the rebuild
    assert claim(c, 2, ids[2], table).sends == []
    out = claim(c, 3, ids[3], table)                       # expect reached: rebuilt now
    t = c.m.table
    assert not c.m.rebuilding and t.epoch == table.epoch + 1
    assert [t.owner(s) for s in range(16)] == [table.owner(s) for s in range(16)]
    assert [t.backup(s) for s in range(16)] == [table.backup(s) for s in range(16)]
    assert {m: c.m.members[m].sender_id for m in (1, 2, 3)} == ids
    assert c.m.alive() == [1, 2, 3]
    hbs = {s.member: s.message for s in out.sends if isinstance(s.message, Heartbeat)}
    assert {m: (hb.sender_id, hb.token) for m, hb in hbs.items()} == {
        m: (ids[m], 0xC0FFEE + m) for m in (1, 2, 3)}
    tables = [s.message for s in out.sends if isinstance(s.message, TableUpdate)]
    assert len(tables) == 3 and all(u.table == t for u in tables)
    assert "segment table rebuilt from 3 reattached members" in " ".join(texts(out))
    # a new member after the rebuild never gets a claimed sender id
    c.hello(4)
    assert c.m.members[4].sender_id not in ids.values()
    # the same incarnation reattaching again (its answer lost): the same answer
    again = claim(c, 1, ids[1], table)
    assert again.refused is None and [type(s.message) for s in again.sends] == [
        Heartbeat, TableUpdate]


def test_new_members_wait_for_the_rebuild_then_join_a_new_cluster() -> None:
    c = successor(expect=2)
    assert c.hello(1).refused == "hello_rebuilding" and not c.m.members
    out = c.hello(2)            # both expected members spoke: no reattach, a new cluster
    assert "no member reattached: a new cluster" in texts(out)
    assert c.m.alive() == [2] and not c.m.rebuilding
    c.hello(1)
    assert c.m.table.members == (2, 1) or c.m.table.members == (1, 2)


def test_the_window_ends_after_reattach_wait_without_the_expected_members() -> None:
    old = old_cluster()
    table = old.m.table.copy()
    c = successor(expect=3)
    claim(c, 1, old.m.members[1].sender_id, table)
    claim(c, 2, old.m.members[2].sender_id, table)
    assert c.hello(4).refused == "hello_rebuilding"
    while c.now + INTERVAL < WAIT:
        assert not c.tick(beat=False).table_changed and c.m.rebuilding
    out = c.tick(beat=False)
    # member 3 did not reattach: its segments went to their backups
    t = c.m.table
    assert not c.m.rebuilding and 3 not in t.members and t.epoch > table.epoch
    for s in table.segments_of(3):
        assert t.owner(s) == table.backup(s)
    assert events(out, EventType.MEMBER_DEAD) == [
        Event(EventType.MEMBER_DEAD, member=3, reason="did not reattach")]
    # its late claim: told it is dead, it rejoins as a new incarnation
    late = claim(c, 3, old.m.members[3].sender_id, table)
    assert late.refused == "reattach_late" and late.reply is not None
    assert late.reply.kind is NoticeKind.DEAD
    c.hello(3)
    assert c.m.members[3].sender_id not in {old.m.members[m].sender_id for m in (1, 2, 3)}
    assert 3 in c.m.balancing                  # its segments come back by autobalance
    assert c.hello(4).refused is None


def test_a_member_reporting_an_old_epoch_gets_the_newest_table() -> None:
    old = old_cluster()
    stale = old.m.table.copy()
    old.m.exited(3, 103)                       # the newest table: 3 failed over
    newest = old.m.table.copy()
    c = successor(expect=2)
    claim(c, 1, old.m.members[1].sender_id, stale)
    claim(c, 2, old.m.members[2].sender_id, newest)
    assert c.m.rebuilding            # (the stale table names member 3: it may still come)
    c.tick(WAIT, beat=False)
    t = c.m.table
    assert t.epoch == newest.epoch + 1 and t.members == newest.members
    assert [t.owner(s) for s in range(16)] == [newest.owner(s) for s in range(16)]


def test_a_sender_id_claimed_twice_goes_to_the_newer_table() -> None:
    old = old_cluster()
    stale = old.m.table.copy()
    old.m.exited(3, 103)
    newest = old.m.table.copy()
    c = successor(expect=3)
    sid = old.m.members[1].sender_id
    claim(c, 1, sid, stale)
    claim(c, 2, sid, newest)                 # the same sender id, a newer table
    claim(c, 3, old.m.members[3].sender_id, stale)
    assert c.m.members[2].alive and c.m.members[2].sender_id == sid
    assert not c.m.members[1].alive
    notice = c.m.heartbeat(1, sid, c.now, Channel.LIVE).reply
    assert notice is not None and notice.kind is NoticeKind.DEAD
    assert c.m.table.epoch > newest.epoch
    c.hello(1)                               # it rejoins as new: another sender id
    assert c.m.members[1].sender_id != sid
    ids = [i.sender_id for i in c.m.members.values() if i.alive]
    assert len(ids) == len(set(ids))


def test_two_claims_for_one_member_id_the_newer_table_wins() -> None:
    old = old_cluster()
    stale = old.m.table.copy()
    old.m.exited(3, 103)
    newest = old.m.table.copy()
    c = successor(expect=2)
    claim(c, 1, 5, newest, pid=501)
    out = claim(c, 1, 6, stale, token=77, pid=502)       # older table: refused, told to stop
    assert out.refused == "reattach_replaced" and out.reply is not None
    assert out.reply.kind is NoticeKind.REPLACED
    assert c.m.standing(1, 6) is not None and c.m.standing(1, 5) is None
    claim(c, 2, old.m.members[2].sender_id, newest)
    assert c.m.members[1].sender_id == 5 and c.m.members[1].pid == 501


def test_one_forged_table_cannot_outvote_the_others() -> None:
    old = old_cluster()
    real = old.m.table.copy()
    forged = SegmentTable(4)
    for _ in range(real.epoch + 100):
        forged.advance()
    forged.assign([3])                        # every segment to the stolen key's member
    c = successor()
    claim(c, 1, old.m.members[1].sender_id, real)
    claim(c, 3, old.m.members[3].sender_id, forged)
    claim(c, 2, old.m.members[2].sender_id, real)
    t = c.m.table
    assert [t.owner(s) for s in range(16)] == [real.owner(s) for s in range(16)]
    assert t.epoch > forged.epoch             # (the epoch still never goes back for anyone)


def test_a_bad_claim_is_refused_and_the_member_told_to_rejoin() -> None:
    c = successor()
    huge = SegmentTable(4)
    huge.restore(SegmentTable(4), MAX_CLAIMED_EPOCH + 1)
    for bad in (Claim(0, 1, SegmentTable(4)), Claim(5, 0, SegmentTable(4)),
                Claim(5, 1, SegmentTable(6)), Claim(5, 1, huge)):
        out = c.m.hello(1, 1, "h", 0, 0.0, claim=bad)
        assert out.refused == "reattach_bad_claim" and out.reply is not None
        assert out.reply.kind is NoticeKind.DEAD
    assert not c.m.claims


# -- interleavings -----------------------------------------------------------------------

MEMBERS = (1, 2, 3, 4)
DTS = (INTERVAL / 2, INTERVAL, AUTOBALANCE_STEP_S, 0.5, PREPARE_S, STARTUP_WAIT_S + 1)


class Interleavings(RuleBasedStateMachine):
    """HELLO, heartbeats (current and stale incarnations, both channels),
    ticks and exits in any order, with the machine's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.m = machine()
        self.now = 0.0
        self.next_pid = 1000
        self.children: dict[int, Route] = {}
        self.epoch = 0
        self.last_balance = float("-inf")
        #: when the machine started (a restarted dispatcher's startup wait)
        self.started = 0.0
        #: every incarnation ever: (member, sender id, pid)
        self.incarnations: list[tuple[int, int, int]] = []

    @initialize(expect=st.integers(1, 3), hot=st.booleans(), bits=st.sampled_from([2, 4, 6]))
    def setup(self, expect: int, hot: bool, bits: int) -> None:
        self.m = machine(expect, bits, hot)
        self.m.start(self.now)

    def _sent(self, out: Outputs) -> None:
        """What the machine says goes to live incarnations only, and the
        last table each one gets is the table as it is now."""
        last: dict[int, TableUpdate] = {}
        for send in out.sends:
            assert self.m.is_alive(send.member)
            if isinstance(send.message, TableUpdate):
                last[send.member] = send.message
            else:
                assert send.message.sender_id == self.m.members[send.member].sender_id
        if out.table_changed:
            assert set(last) == set(self.m.alive())
        for update in last.values():
            assert update.table == self.m.table

    @rule(member=st.sampled_from(MEMBERS))
    def hello(self, member: int) -> None:
        old = self.m.members.get(member)
        was_alive = old is not None and old.alive
        others = {i.sender_id for m, i in self.m.members.items() if i.alive and m != member}
        self.next_pid += 1
        out = self.m.hello(member, self.next_pid, "h", self.next_pid, self.now, self.children)
        if was_alive:
            assert out.refused == "hello_member_alive" and self.m.members[member] is old
            return
        new = self.m.members[member]
        assert new.alive and new.sender_id not in others
        assert old is None or new.sender_id != old.sender_id
        self.incarnations.append((member, new.sender_id, new.pid))
        self._sent(out)

    @rule(data=st.data(), live=st.booleans())
    def heartbeat(self, data: st.DataObject, live: bool) -> None:
        if not self.incarnations:
            return
        member, sender_id, _pid = data.draw(st.sampled_from(self.incarnations))
        inc = self.m.members[member]
        was = inc.alive
        out = self.m.heartbeat(member, sender_id, self.now, Channel.LIVE if live else
                               Channel.HEARTBEAT)
        assert inc.alive == was and self.m.members[member] is inc
        assert not out.sends and not out.table_changed

    @rule()
    def everyone_beats(self) -> None:
        for member in self.m.alive():
            self.m.heartbeat(member, self.m.members[member].sender_id, self.now)

    @rule(data=st.data())
    def exited(self, data: st.DataObject) -> None:
        if not self.incarnations:
            return
        member, sender_id, pid = data.draw(st.sampled_from(self.incarnations))
        inc = self.m.members[member]
        current = inc.sender_id == sender_id and inc.alive
        out = self.m.exited(member, pid)
        if current:
            assert not inc.alive and events(out, EventType.MEMBER_DEAD)
        else:                           # an older incarnation's pid, or fenced already
            assert not out.events and not out.sends and not out.table_changed
        self._sent(out)

    @rule(data=st.data())
    def dispatcher_restarts(self, data: st.DataObject) -> None:
        """The dispatcher dies; a new one (empty) collects the claims of the
        live members that reattach (each with the last table it got, which
        is the table as it is now) and rebuilds. Their sender ids are kept,
        the epoch goes up, the others are dead to it."""
        old = self.m
        comers = [m for m in old.alive() if data.draw(st.booleans())]
        new = Membership(old.table.segment_bits, expect=old.expect,
                         heartbeat_interval=INTERVAL, dead_after=DEAD_AFTER,
                         hot_standby=old.hot_standby, pid=DISPATCHER_PID + 1, reattach_wait=WAIT)
        new.start(self.now)
        self.m = new
        self.started = self.now
        late = []
        for member in comers:
            inc = old.members[member]
            was_rebuilding = new.rebuilding
            out = new.hello(member, inc.pid, "h", 0, self.now, self.children,
                            claim=Claim(inc.sender_id, inc.token, old.table.copy()))
            if not was_rebuilding:
                # the window closed when every member the table names came:
                # one it does not name is late, told it is dead (rejoin as new)
                assert member not in old.table.members
                assert out.refused == "reattach_late" and out.reply is not None
                assert out.reply.kind is NoticeKind.DEAD
                late.append(member)
                continue
            assert out.refused is None
            if not new.rebuilding:
                self._sent(out)
        if new.rebuilding:
            self.now += WAIT
            self._sent(new.tick(self.now, self.children))
        assert not new.rebuilding
        comers = [m for m in comers if m not in late]
        if comers:
            assert new.table.epoch > old.table.epoch
        else:
            self.epoch = 0              # nobody holds a table: a new cluster
        for member in comers:
            assert new.members[member].alive
            assert new.members[member].sender_id == old.members[member].sender_id
        assert new.alive() == sorted(comers)
        self.last_balance = new._last_balance
        self.children = {spi: r for spi, r in self.children.items() if r.member in comers}
        self.incarnations = [i for i in self.incarnations if i[0] in comers]

    @rule(spi=st.integers(0, 2**32 - 1))
    def child(self, spi: int) -> None:
        """A child SA routed to its segment's owner (as members announce them)."""
        owner = self.m.table.owner(segment_of_esp_spi(spi, self.m.table.segment_bits))
        if owner is not None:
            self.children[spi] = Route(owner)

    @rule(dt=st.sampled_from(DTS), beat=st.booleans())
    def tick(self, dt: float, beat: bool) -> None:
        """``dt`` later; the live members heartbeat just before (``beat``)."""
        self.now += dt
        if beat:
            self.everyone_beats()
        before = {m: i.last_seen for m, i in self.m.members.items() if i.alive}
        in_table = set(self.m.table.members)
        out = self.m.tick(self.now, self.children)
        for member, seen in before.items():
            # dead after dead_after missed heartbeats, not before
            assert self.m.members[member].alive == (self.now - seen <= LIMIT)
        self._sent(out)
        alive = self.m.alive()
        if alive and self.now - self.started > STARTUP_WAIT_S:
            assert self.m.table.members
        # (the machine heals backups every AUTOBALANCE_STEP_S while it has a table)
        healed = bool(self.m.table.members) and self.now - self.last_balance >= AUTOBALANCE_STEP_S
        if healed:
            self.last_balance = self.now
        if healed and not self.m.hot_standby:
            # what is prepared for a joining member has it as its backup
            for s, (m, _since) in self.m.prepared.items():
                assert self.m.table.backup(s) == m
        if healed and len(in_table & set(alive)) >= 2:
            # backups healed: every segment has one, never its owner
            for s in range(self.m.table.segments):
                assert self.m.table.backup(s) is not None

    @invariant()
    def epochs_never_go_back(self) -> None:
        assert self.m.table.epoch >= self.epoch
        self.epoch = self.m.table.epoch

    @invariant()
    def only_live_members_own_or_back_up(self) -> None:
        t, alive = self.m.table, set(self.m.alive())
        assert set(t.members) <= alive
        for s in range(t.segments):
            owner, backup = t.owner(s), t.backup(s)
            if t.members:
                # exactly one owner, alive, whenever the table has a live member
                assert owner in alive
            assert backup is None or (backup in alive and backup != owner)
            if len(t.members) >= 2 and not self.m.hot_standby and owner is not None:
                assert backup != owner

    @invariant()
    def live_incarnations_have_distinct_sender_ids(self) -> None:
        ids = [i.sender_id for i in self.m.members.values() if i.alive]
        assert len(ids) == len(set(ids))
        assert all(1 <= i <= MAX_SENDER_ID for i in ids)

    @invariant()
    def only_live_members_are_balanced(self) -> None:
        alive = set(self.m.alive())
        assert self.m.balancing <= alive
        assert {m for m, _ in self.m.prepared.values()} <= alive


@pytest.mark.fuzz
def test_interleavings_of_hello_heartbeat_tick_and_exit() -> None:
    run_state_machine_as_test(Interleavings, settings=fuzz_settings(300, stateful_step_count=40))


def test_log_levels_match_pythons() -> None:
    import logging

    assert (Level.INFO, Level.WARNING) == (logging.INFO, logging.WARNING)


def test_the_dispatchers_monitor_outlives_a_failing_tick() -> None:
    """The shell's barrier: a tick that raises is counted (bug.tick.<type>)
    and the next tick comes all the same."""
    import asyncio

    from tests.test_hostile_member import _rig

    async def go() -> None:
        d, _sent = _rig()
        calls: list[float] = []

        def failing(now: float, children: object) -> Outputs:
            calls.append(now)
            raise RuntimeError("a bug")

        d.membership.tick = failing  # type: ignore[assignment,method-assign]
        task = asyncio.ensure_future(d._monitor())
        try:
            await asyncio.sleep(d.config.cluster.heartbeat_interval * 6)
        finally:
            task.cancel()
            d.close()
        assert len(calls) >= 2
        assert d._refusals().counts["bug.tick.RuntimeError"] == len(calls)

    asyncio.run(go())


# -- terms: two dispatcher hosts, a deposed dispatcher is fenced ------------------------------


def term_claim(c: Cluster, member: int, sender_id: int, table: SegmentTable, term: int
               ) -> Outputs:
    return c.m.hello(member, 100 + member, "host", 0, c.now, c.children,
                     claim=Claim(sender_id, 0xC0FFEE + member, table, term))


def test_a_rebuild_takes_a_term_above_every_claimed_one_and_sends_it() -> None:
    old = old_cluster()
    table = old.m.table.copy()
    ids = {m: old.m.members[m].sender_id for m in (1, 2, 3)}
    c = successor()
    term_claim(c, 1, ids[1], table, 4)
    term_claim(c, 2, ids[2], table, 7)
    out = term_claim(c, 3, ids[3], table, 5)
    assert c.m.term == 8 and "dispatcher term 8" in texts(out)
    sent = [s.message for s in out.sends]
    assert sent and all(isinstance(m, Heartbeat | TableUpdate) and m.term == 8 for m in sent)
    c.tick(INTERVAL)
    assert all(s.message.term == 8 for s in c.m.tick(c.now).sends)
    # every notice carries it too (a member ignores DEAD/REPLACED of a lower term)
    assert c.m.standing(2, ids[2] + 1) is not None
    assert c.m.standing(2, ids[2] + 1).term == 8   # type: ignore[union-attr]


def test_a_member_reporting_a_newer_term_deposes_the_dispatcher_for_good() -> None:
    old = old_cluster()
    a = successor()
    table = old.m.table.copy()
    for m in (1, 2, 3):
        term_claim(a, m, old.m.members[m].sender_id, table, 1)
    assert a.m.term == 2 and not a.m.deposed
    epoch = a.m.table.epoch
    # member 1 went to the other host's dispatcher (term 3) and writes to us
    out = a.m.heartbeat(1, a.m.members[1].sender_id, a.now, Channel.LIVE, term=3)
    assert out.deposed and a.m.deposed
    assert any("another dispatcher is active" in t for t in texts(out))
    # from now on: no failover, no table, no sender id, no notice
    a.tick(10.0)
    assert a.m.tick(a.now).sends == [] and a.m.table.epoch == epoch
    assert a.m.exited(2, 102).sends == [] and a.m.table.epoch == epoch
    assert a.hello(4).refused == "deposed" and 4 not in a.m.members
    assert a.m.heartbeat(2, a.m.members[2].sender_id, a.now, Channel.LIVE).reply is None
    # (a claim with a lower term while rebuilding only raises ours: not deposed)
    b = successor()
    term_claim(b, 1, 1, table, 9)
    assert b.m.term == 9 and not b.m.deposed


def test_a_deposed_dispatcher_that_never_learnt_it_moves_nothing_members_accept() -> None:
    """A (term 2) loses its link; B rebuilds from the members' claims (term 3).
    A, back and still believing it is active, declares every member dead, fails
    their segments over and gives a new process a sender id: members that saw
    term 3 refuse each of those messages, and take B's."""
    from member.process import heartbeat_refusal, table_refusal

    old = old_cluster()
    a = successor()
    table0 = old.m.table.copy()
    for m in (1, 2, 3):
        term_claim(a, m, old.m.members[m].sender_id, table0, 1)
    assert a.m.term == 2
    held = a.m.table.copy()                    # what the members hold (term 2)
    ids = {m: a.m.members[m].sender_id for m in (1, 2, 3)}
    b = successor()
    for m in (1, 2, 3):
        out = term_claim(b, m, ids[m], held, 2)
    assert b.m.term == 3
    b_table = next(s.message for s in out.sends if isinstance(s.message, TableUpdate))
    seen = 3
    assert table_refusal(held, b_table.table, 4, term=b_table.term, seen=seen,
                         old_term=2) is None
    # A wakes up: its members are silent -> failover, and a new process joins A
    a.tick(1.0)
    moved = [s.message for s in a.m.tick(a.now).sends if isinstance(s.message, TableUpdate)]
    assert a.m.table.epoch > b_table.table.epoch or moved == []
    joined = a.hello(4)
    hb = next(s.message for s in joined.sends if isinstance(s.message, Heartbeat))
    for update in [*moved, *(s.message for s in joined.sends
                             if isinstance(s.message, TableUpdate))]:
        assert update.term == 2
        assert table_refusal(b_table.table, update.table, 4, term=update.term, seen=seen,
                             old_term=b_table.term) == "stale_term"
    assert heartbeat_refusal(hb, 0, seen) == "stale_term"
    # B's heartbeats pass; of one term, an epoch going back does not
    b_hb = Heartbeat(0, ids[1], DISPATCHER_PID + 1, b_table.table.epoch, term=3)
    assert heartbeat_refusal(b_hb, ids[1], seen) is None
    older = held.copy()
    assert table_refusal(b_table.table, older, 4, term=3, seen=3,
                         old_term=3) == "epoch_backwards"
    # a newer term's table is taken even at a lower epoch (its rebuild is newer)
    assert table_refusal(b_table.table, older, 4, term=4, seen=3, old_term=3) is None


def test_terms_travel_in_every_message_that_carries_one() -> None:
    table = SegmentTable(4)
    for msg in (Heartbeat(0, 3, 9, 4, term=7), TableUpdate(table, 7),
                Notice(NoticeKind.STANDBY, 3, "disp-b is the standby dispatcher", 7)):
        _, back = decode(encode(msg, 1))
        assert back == msg and back.term == 7
