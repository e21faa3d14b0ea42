"""The supervisor learns of a member's exit at once (dispatcher/supervisor.py
``_watch_exit``: the member's pidfd in the event loop), not after missed
heartbeats: with ``dead_after`` so large that heartbeats cannot declare
anyone dead within the test, a kill -9 of a member is still followed by
MEMBER_DEAD (the process's exit as the reason) and TAKEOVER of its
segments, and its next incarnation joins with a new IV sender id. The
supervisor holds one pidfd per running member and no more: none is left
over from an incarnation that ended, over several kill/restart cycles, and
its other descriptors do not grow either. Without pidfds (``use_pidfd``
False, as on Linux < 5.3) the poll sees the same exits."""

from __future__ import annotations

import itertools
import os
import signal
import sys
from pathlib import Path

import pytest

from bench.harness.net import free_udp_ports
from common.cluster.events import Event, EventType
from tests.cluster_util import (
    ChildSpec,
    ConnSpec,
    Proc,
    Procs,
    event_is,
    gateway_toml,
    status,
    wait_assigned,
)

GW = "127.0.0.1"
#: 1000 heartbeats of 50 ms: 50 s, far beyond the waits below
DEAD_AFTER = 1000
#: a member's next incarnation starts 0.1 s after an exit (not 0.5, 1, 2, ...)
LAUNCH = """
import sys
from dispatcher import cli, supervisor
supervisor.Supervisor.use_pidfd = sys.argv[3] == "pidfd"
supervisor.Supervisor.new_backoff = lambda self: supervisor.Backoff(
    initial_s=0.1, max_s=0.1, give_up_after=100)
sys.exit(cli.main(["run", "--config", sys.argv[2]]))
"""
#: what /proc/PID/fd shows for a pidfd
PIDFD = "anon_inode:[pidfd]"


def start_cluster(procs: Procs, tmp_path: Path, *, members: int, watch: str,
                  dead_after: int = DEAD_AFTER) -> Proc:
    """A cluster on loopback (free ports), its supervisor watching exits
    with pidfds (``watch`` "pidfd") or by polling only ("poll")."""
    port, nat, inside, inside_bind = free_udp_ports(4, (GW,))
    config = tmp_path / "cluster.toml"
    conns = (ConnSpec("c1", "gw.test", "peer.test",
                      (ChildSpec("net", "10.70.2.0/24", "10.70.1.0/24"),)),)
    config.write_text(gateway_toml(address=GW, ports=(port, nat),
                                   inside=f"udp:127.0.0.1:{inside}",
                                   inside_bind=f"127.0.0.1:{inside_bind}",
                                   members=members, conns=conns,
                                   extra={"dead_after": dead_after}))
    disp = procs.start("cluster", [sys.executable, "-c", LAUNCH, "--config", str(config),
                                   watch])
    wait_assigned(disp, members, timeout=30)
    return disp


def member_row(disp: Proc, member: int) -> dict[str, object]:
    rows = [m for m in status(disp.config_path)["members"] if m["id"] == member]
    assert rows, status(disp.config_path)
    row: dict[str, object] = rows[0]
    return row


def fds(pid: int) -> list[str]:
    """What the process's descriptors point at."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue
    return out


def kill_and_rejoin(disp: Proc, member: int) -> tuple[Event, Event, Event]:
    """kill -9 the member; its MEMBER_DEAD, the TAKEOVER of its segments and
    its next incarnation's MEMBER_JOINED, once that one has its segments back
    (SEGMENTS_MOVED "balanced"), so that the next kill moves segments too."""
    row = member_row(disp, member)
    pid, sender_id = row["pid"], row["sender_id"]
    assert isinstance(pid, int)
    seen = status(disp.config_path)["dispatcher"]["counters"].get("exits_seen", 0)
    mark = disp.mark()
    os.kill(pid, signal.SIGKILL)
    dead = disp.wait_event(event_is(EventType.MEMBER_DEAD, member=member), 5.0, since=mark,
                           what=f"member {member} dead after kill -9 of pid {pid}")
    # (the dispatcher's own pidfd of the member saw the exit, besides the
    # supervisor's: whichever came first fenced it)
    assert status(disp.config_path)["dispatcher"]["counters"].get("exits_seen", 0) > seen
    takeover = disp.wait_event(event_is(EventType.TAKEOVER, dead=member), 5.0, since=mark,
                               what=f"the takeover of member {member}'s segments")
    joined = disp.wait_event(event_is(EventType.MEMBER_JOINED, member=member), 20.0,
                             since=mark, what=f"member {member} back")
    disp.wait_event(lambda e: (e.type is EventType.SEGMENTS_MOVED and e.reason == "balanced"
                               and e.member == member), 20.0, since=mark,
                    what=f"member {member} balanced in again")
    assert dead.reason == f"process {pid} exited", dead
    assert takeover.segments and takeover.member not in (0, member), takeover
    assert joined.sender_id not in (0, sender_id), (joined, sender_id)
    assert member_row(disp, member)["pid"] != pid
    return dead, takeover, joined


@pytest.mark.slow
def test_kill_9_is_seen_at_once_and_no_pidfd_is_left_over(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        disp = start_cluster(procs, tmp_path, members=3, watch="pidfd")
        assert sum(1 for f in fds(disp.pid) if f == PIDFD) == 3, fds(disp.pid)
        senders = {member_row(disp, 2)["sender_id"]}
        counts = []
        for _ in range(4):
            _, _, joined = kill_and_rejoin(disp, 2)
            senders.add(joined.sender_id)
            now = fds(disp.pid)
            # one pidfd per running member: the ended incarnation's is closed
            assert sum(1 for f in now if f == PIDFD) == 3, now
            counts.append(len(now))
        assert len(senders) == 5, senders
        # (the first cycle may open what the supervisor opens once; a pipe of
        # the ended incarnation's stderr closes when its reader thread sees
        # EOF, which may come a moment later: one fd of slack, never growth)
        assert counts[-1] <= counts[1] + 1 and counts[-1] <= max(counts[:2]) + 1, counts
        assert not all(b > a for a, b in itertools.pairwise(counts[1:])), counts
        assert "Traceback" not in disp.log_text()
    finally:
        procs.close()


@pytest.mark.slow
def test_without_pidfds_the_poll_sees_the_exit(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        disp = start_cluster(procs, tmp_path, members=3, watch="poll")
        assert not any(f == PIDFD for f in fds(disp.pid))
        kill_and_rejoin(disp, 3)
        assert not any(f == PIDFD for f in fds(disp.pid))
        log = disp.log_text()
        assert log.count("member exits are seen by polling every 0.2 s") == 1, log
        assert "Traceback" not in log
    finally:
        procs.close()
