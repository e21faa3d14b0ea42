"""RFC 6027 failover with a real peer: strongSwan in namespace a, a 3-member
cluster in namespace b, two IKE SAs with three children each spread over the
members, 200 pings/s through every child. ``kill -9`` a member: strongSwan
keeps the same IKE SAs (same SPIs, no new IKE_SA_INIT), every child passes
traffic again, rekeys initiated by strongSwan and DPD go on working."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.failover_lab import CHILDREN, Streams, gaps, owners, setup, status
from tests.lab import traffic
from tests.lab.netns import Lab

pytestmark = pytest.mark.interop


def _spis(charon) -> dict[str, tuple[str, str]]:  # type: ignore[no-untyped-def]
    return {s["name"]: (s["initiator-spi"], s["responder-spi"]) for s in charon.list_sas()
            if s["state"] == "ESTABLISHED"}


def _all_children_pass(ns_a: str) -> None:
    for _c, name, k in CHILDREN:
        res = traffic.ping(ns_a, f"10.91.{k + 1}.1", src=f"10.91.{k}.1", count=3,
                           interval=0.05)
        assert res.ok, f"child {name}: {res.output}"


def _kill_and_check(lab: Lab, tmp_path: Path, victim_of: str, **kw: object) -> None:
    s = setup(lab, tmp_path, **kw)  # type: ignore[arg-type]
    ike_owner, child_owner = owners(s.config)
    assert len(ike_owner) == 2 and len(child_owner) == 6, (ike_owner, child_owner)
    if kw.get("mode") != "hot-standby":
        assert len(set(child_owner.values())) >= 2, child_owner
    before = _spis(s.charon)
    inits_before = s.charon.log_text().count("initiating IKE_SA")
    if victim_of == "ike":
        victim = ike_owner["a-b"]
    else:
        carriers = set(child_owner.values()) - set(ike_owner.values())
        victim = min(carriers) if carriers else child_owner["c2"]
    pid = next(m["pid"] for m in status(s.config)["members"] if m["id"] == victim)
    streams = Streams(lab, s.ns_a, tmp_path, seconds=6.0)
    time.sleep(2.0)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    streams.wait(timeout=20)
    # Same IKE SAs (same SPIs), no new IKE_SA_INIT from strongSwan.
    assert _spis(s.charon) == before
    assert s.charon.log_text().count("initiating IKE_SA") == inits_before
    results = {}
    for name, rows in streams.replies().items():
        gap, lost = gaps(rows, killed_at)
        results[name] = (round(gap, 3), lost)
        assert rows and rows[-1][0] > killed_at + 1.0, f"{name} stopped passing: {results}"
    (tmp_path / "gaps.txt").write_text(repr(results))
    _all_children_pass(s.ns_a)
    # strongSwan rekeys through the new owner, and DPD keeps passing.
    s.charon.rekey_child("c1")
    s.charon.rekey_child("d2")
    new_ike = s.charon.rekey_ike("a-b")
    assert new_ike["initiator-spi"] != before["a-b"][0]
    _all_children_pass(s.ns_a)
    log_len = len(s.charon.log_text())
    time.sleep(2.5)
    tail = s.charon.log_text()[log_len:]
    assert "sending DPD request" in tail and "parsed INFORMATIONAL response" in tail, tail
    assert s.charon.ike_sa("a-b") is not None and s.charon.ike_sa("c-d") is not None
    assert s.cluster.alive()


def test_kill_the_owner_of_an_ike_sa(lab: Lab, tmp_path: Path) -> None:
    _kill_and_check(lab, tmp_path, "ike")


def test_kill_a_member_that_only_carries_children(lab: Lab, tmp_path: Path) -> None:
    _kill_and_check(lab, tmp_path, "child")


def test_hot_standby_fails_over(lab: Lab, tmp_path: Path) -> None:
    _kill_and_check(lab, tmp_path, "ike", mode="hot-standby")
