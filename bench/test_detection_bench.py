"""How fast a 3-member cluster on one host learns that a member died
(docs/failover.md "Timings"), with the supervisor watching its members'
exits through pidfds (the default) and with the 0.2 s poll only
(``Supervisor.use_pidfd`` False: what it did before, and what it does where
pidfd_open(2) is missing), both with the default heartbeats (50 ms,
``dead_after`` 3), so the poll races the heartbeats as it did before.

Run: .venv/bin/pytest bench/test_detection_bench.py -q -s
     (DETECTION_BENCH_KILLS=N kills per mode, default 8)

Per kill -9 of a member (no SAs: the chain, not the SA count): detect = the
dispatcher's MEMBER_DEAD event minus the kill (both wall clock, one host);
takeover = its TAKEOVER event of the dead member's segments minus the kill
(the table handing them to their backups); adopted = the last of the
members' "took over" log lines after the kill minus the kill (log
timestamps: 1 ms resolution); which detector fired (the event's reason).
After each kill the member's next incarnation joins and is balanced in
before the next kill.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.harness.control import ControlClient
from common.cluster.events import EventType
from tests.cluster_util import Procs
from tests.test_supervisor_exit import member_row, start_cluster

KILLS = int(os.environ.get("DETECTION_BENCH_KILLS", "8"))
TOOK_OVER = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \[member \d+\] \S+ "
                       r"WARNING member \d+ took over \d+ segments", re.M)
RESULTS: dict[str, dict[str, Any]] = {}


def _log_times(text: str) -> list[float]:
    return [time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            for m in TOOK_OVER.finditer(text)]


def _one_kill(disp: Any, member: int) -> dict[str, Any]:
    pid = member_row(disp, member)["pid"]
    assert isinstance(pid, int)
    mark = disp.mark()
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    disp.wait_event(lambda e: e.type is EventType.SEGMENTS_MOVED and e.reason == "balanced"
                    and e.member == member, 30.0, since=mark, what="balanced in again")
    with ControlClient(config=disp.config_path) as control:
        logged = control.events(mark).events
    dead = next(x for x in logged if x.event.type is EventType.MEMBER_DEAD
                and x.event.member == member)
    take = next(x for x in logged if x.event.type is EventType.TAKEOVER
                and x.event.dead == member)
    adopted = [t for t in _log_times(disp.log_text()) if t_kill - 0.002 <= t < t_kill + 2.0]
    return {"detect_ms": (dead.time - t_kill) * 1e3, "takeover_ms": (take.time - t_kill) * 1e3,
            "adopted_ms": (max(adopted) - t_kill) * 1e3 if adopted else None,
            "by": "exit" if dead.event.reason.startswith("process ") else "heartbeats"}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"kills": len(runs), "by": dict(Counter(r["by"] for r in runs))}
    for key in ("detect_ms", "takeover_ms", "adopted_ms"):
        vals = [r[key] for r in runs if r[key] is not None]
        if vals:
            out[key] = {"median": round(statistics.median(vals), 1),
                        "min": round(min(vals), 1), "max": round(max(vals), 1)}
    return out


@pytest.mark.parametrize("watch", ["poll", "pidfd"])
def test_detection_of_a_kill_9_on_one_host(tmp_path: Path, watch: str) -> None:
    procs = Procs(tmp_path)
    try:
        disp = start_cluster(procs, tmp_path, members=3, watch=watch, dead_after=3)
        runs = [_one_kill(disp, 1 + i % 3) for i in range(KILLS)]
    finally:
        procs.close()
    RESULTS[watch] = _summary(runs)
    print(f"\n{watch}: {RESULTS[watch]}")
    for r in runs:
        print("   ", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()})
    if watch == "pidfd":
        # the exit, not the heartbeats, declared every death
        assert RESULTS[watch]["by"] == {"exit": KILLS}, runs
