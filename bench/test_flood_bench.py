"""Flood: a 3-member cluster under IKE_SA_INIT from many sources that answer
cookies (the issue's goal: under 2,000 IKE_SA_INIT/s from 250 sources for
60 s, every process under 100 MB RSS and a legitimate handshake in under
100 ms).

Run (root, network namespaces; ~75 s; never part of ``make test``;
IPSEC_CLUSTER_SKIP_BENCH=1 skips it):

    PYTHONPATH=$PWD .venv/bin/pytest bench/test_flood_bench.py -q -s

IPSEC_CLUSTER_FLOOD_RATE (default 2000), IPSEC_CLUSTER_FLOOD_SECONDS (60)
and IPSEC_CLUSTER_FLOOD_SOURCES (250) change the flood.

Setup (bench/flood.py): ns peer (198.18.0.1 and 198.18.1.1.. on one veth)
and ns gw (198.18.0.2, ``ipsec-cluster run`` with ``members = 3``). The
generator in ns peer sends IKE_SA_INIT with a real KE value from each source
in turn at the rate, answers every COOKIE at once, never sends IKE_AUTH. A
legitimate initiator (our IKE engine, from 198.18.0.1) times IKE_SA_INIT +
IKE_AUTH: five times before the flood (the baseline), then every 3 s during
it. A thread samples VmRSS of the dispatcher and of every member and the
members' half-open counts (``status --json``) twice a second.

Asserted: the bounds that hold by construction (half-open count per member
at most HALF_OPEN_MAX; RSS under 100 MB). Reported, not asserted (a shared
machine decides them): the handshake latencies against the 100 ms goal.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from bench.flood import GW, PEER, FloodLab, handshake, rss_bytes, run_flood
from common.ike.limits import HALF_OPEN_MAX

RATE = float(os.environ.get("IPSEC_CLUSTER_FLOOD_RATE", "2000"))
SECONDS = float(os.environ.get("IPSEC_CLUSTER_FLOOD_SECONDS", "60"))
SOURCES = int(os.environ.get("IPSEC_CLUSTER_FLOOD_SOURCES", "250"))
MEMBERS = 3
RSS_GOAL = 100 * 1024 * 1024
LATENCY_GOAL_S = 0.100
BASELINE_HANDSHAKES = 5


def _ms(x: float | None) -> str:
    return "failed" if x is None else f"{1000 * x:.0f} ms"


def test_flood(tmp_path: Path) -> None:
    if os.environ.get("IPSEC_CLUSTER_SKIP_BENCH") == "1":
        pytest.skip("IPSEC_CLUSTER_SKIP_BENCH=1")
    from tests.lab.netns import lab_unavailable_reason

    reason = lab_unavailable_reason(need_charon=False)
    if reason is not None:
        pytest.skip(reason)
    lab = FloodLab(tmp_path, members=MEMBERS, n_sources=SOURCES)
    try:
        idle_rss = {name: rss_bytes(pid) for name, pid in lab.pids().items()}
        baseline = [handshake(lab.peer_ns, PEER, GW) for _ in range(BASELINE_HANDSHAKES)]
        run = run_flood(lab, RATE, SECONDS)
    finally:
        lab.close()
    done = [h for h in run.handshakes if h is not None]
    base = [h for h in baseline if h is not None]
    base_med = statistics.median(base) if base else None
    med = statistics.median(done) if done else None
    gen = run.generator
    print(f"\nflood: {RATE:.0f} IKE_SA_INIT/s asked from {SOURCES} sources for {SECONDS:.0f} s;"
          f" sent {gen.get('sent')} in {gen.get('seconds')} s, cookies answered"
          f" {gen.get('cookies_answered')}, IKE_SA_INIT answers (half-open SAs made)"
          f" {gen.get('init_answers')}")
    for name in sorted(run.peak_rss):
        print(f"  {name:11s} RSS idle {idle_rss.get(name, 0) >> 20:4d} MB,"
              f" peak {run.peak_rss[name] >> 20:4d} MB")
    print(f"  half-open peak per member: {run.peak_half_open} (cap {HALF_OPEN_MAX})")
    print(f"  drops: {run.drops}")
    print(f"  handshake without flood: {[_ms(h) for h in baseline]} (median {_ms(base_med)})")
    print(f"  handshake during flood: {[_ms(h) for h in run.handshakes]}"
          f" (median {_ms(med)}, {len(done)}/{len(run.handshakes)} completed)")
    if med is not None and base_med:
        verdict = "met" if med < LATENCY_GOAL_S else "NOT met"
        print(f"  ratio flood/baseline (medians): {med / base_med:.1f}x;"
              f" goal {1000 * LATENCY_GOAL_S:.0f} ms {verdict}")
    assert run.peak_half_open and all(n <= HALF_OPEN_MAX for n in run.peak_half_open.values())
    assert all(rss < RSS_GOAL for rss in run.peak_rss.values()), run.peak_rss
