"""The dispatcher killed on one host, with strongSwan as the peer (issue #11,
docs/failover.md "The dispatcher on one host").

charon in namespace a (the lab of tests/failover_lab.py: IKE SAs ``a-b`` and
``c-d`` with three children each, charon's DPD every second) against a
3-member cluster in namespace b (``ipsec-cluster run``: the supervisor, the
dispatcher and the members, the kernel data path, a TUN inside), 200 pings/s
through every child, children carried by at least two members. ``kill -9``
of the dispatcher process (``status --json``: ``dispatcher.pid``) while the
pings run, and right after it charon starts a third connection ``e-f`` (a
new IKE SA, an identity the cluster has not seen). Then:

- charon holds the same IKE SAs (same SPIs) and started no IKE_SA_INIT for
  them; the supervisor started a new dispatcher, the members run on;
- nothing was sent twice: no (SPI, sequence number) and no (SPI, IV) pair
  twice in a capture of the cluster's ESP, and charon (a strict peer: its
  replay window) logged no failed sequence number check;
- every child passes traffic after the kill, and the new IKE SA came up;
- then a child rekey, an IKE rekey and DPD exchanges all succeed.

The timings (the gap on each child, the time until the new IKE SA is up)
are printed here and measured in bench/test_failover_bench.py part (e);
they are not asserted.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.harness import configs
from tests.failover_lab import (
    CHILDREN,
    Setup,
    Streams,
    charon_conf,
    cluster_toml,
    gaps,
    owners,
    status,
    wait_assigned,
)
from tests.interop_gw import PSK, OurProcess
from tests.lab import traffic
from tests.lab.charon import Charon, CharonError, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

pytestmark = [pytest.mark.interop, pytest.mark.netns, pytest.mark.slow]

#: the connection charon starts right after the kill: (name, child, k),
#: inner nets 10.91.k.0/24 (charon) <-> 10.91.k+1.0/24 (cluster)
SPARE = ("e-f", "e1", 61)
SPARE_IDS = ("gw-e.test", "gw-b.test")
#: charon's retransmits of the new IKE_SA_INIT: every RETRANSMIT_S, no
#: backoff, so its establishment time is known to RETRANSMIT_S
RETRANSMIT_S = 0.1
RETRANSMIT_TRIES = 100
#: how long charon may take for the new IKE SA in all (the test's bound,
#: far above the 1 s goal the bench measures)
NEW_IKE_TIMEOUT_S = 15.0
#: how long the pings run, and when the kill comes (the pings go on past
#: the new dispatcher's start and the members' reattach)
STREAM_S = 10.0
KILL_AFTER_S = 2.0
#: a capture's ESP records: (time, spi, seq, IV)
EspRow = tuple[float, int, int, bytes]


def lab_toml() -> str:
    """tests/failover_lab.py's cluster plus the connection ``e-f``."""
    data = tomllib.loads(cluster_toml())
    name, child, k = SPARE
    conn = configs.Conn(name, SPARE_IDS[1], SPARE_IDS[0], (
        configs.Child(child, f"10.91.{k + 1}.0/24", f"10.91.{k}.0/24", "aes128gcm16"),),
        options={"dpd_delay": 0})
    data["connections"].update(configs.connections([conn], psk=PSK, start_action=None))
    return configs.dumps(data)


def lab_charon_conf() -> str:
    name, child, k = SPARE
    spare = Conn(name, "198.18.0.1", "198.18.0.2",
                 [Child(child, f"10.91.{k}.0/24", f"10.91.{k + 1}.0/24")],
                 local_id=SPARE_IDS[0], remote_id=SPARE_IDS[1], psk=PSK, dpd_delay="1s")
    return charon_conf() + render_swanctl_conf(spare)


def start(lab: Lab, tmp: Path) -> Setup:
    """The lab of tests/failover_lab.py ``setup`` with the spare connection
    known to both sides (not started) and charon retransmitting every
    RETRANSMIT_S."""
    ns_a, ns_b, _veth = lab.pair()
    for _c, _n, k in [*CHILDREN, SPARE]:
        lab.add_lo_addr(ns_a, f"10.91.{k}.1")
        if k + 1 != 2:
            lab.add_lo_addr(ns_b, f"10.91.{k + 1}.1")
    cluster = OurProcess(lab, ns_b, lab_toml(), tmp, name="cluster")
    wait_assigned(cluster, 3, timeout=30)
    charon = lab.charon(ns_a, "charon-a", charon_options={"uniqueids": "no"},
                        retransmit_timeout=RETRANSMIT_S, retransmit_base=1.0,
                        retransmit_tries=RETRANSMIT_TRIES)
    charon.load(lab_charon_conf())
    for c, name, _k in CHILDREN:
        charon.initiate(child=name, ike=c)
    return Setup(ns_a, ns_b, charon, cluster, cluster.config)


def ike_spis(charon: Charon) -> dict[str, tuple[str, str]]:
    return {s["name"]: (s["initiator-spi"], s["responder-spi"]) for s in charon.list_sas()
            if s["state"] == "ESTABLISHED"}


def esp_rows(pcap: Path, src: str) -> list[EspRow]:
    from bench.test_failover_bench import _esp_from_pcap

    return _esp_from_pcap(pcap, src)


def replay_failures(charon: Charon) -> int:
    """Packets charon's ESP (libipsec) dropped on its sequence number check."""
    return charon.log_text().count("sequence number verification failed")


def _initiations(charon: Charon, conns: tuple[str, ...]) -> int:
    names = "|".join(map(re.escape, conns))
    return len(re.findall(rf"initiating IKE_SA ({names})\[", charon.log_text()))


@dataclass
class Killed:
    """What one kill of the dispatcher did."""

    setup: Setup
    killed_at: float
    before: dict[str, Any]
    after: dict[str, Any]
    spis_before: dict[str, tuple[str, str]]
    spis_after: dict[str, tuple[str, str]]
    inits_before: int
    inits_after: int
    carriers: dict[str, int]
    replies: dict[str, list[tuple[float, int]]]
    esp: list[EspRow]
    new_ike_s: float | None
    new_ike_error: str
    replay_failures: int

    def children(self) -> dict[str, dict[str, Any]]:
        """Per child: the longest silence between replies from just before
        the kill to the end of the pings (when it began, after the kill),
        the longest one in the 1.5 s before the kill (the baseline), replies
        lost, the carrying member, the last reply after the kill."""
        out: dict[str, dict[str, Any]] = {}
        k = self.killed_at
        for name, rows in self.replies.items():
            times = [t for t, _ in rows if t >= k - 0.05]
            pairs = list(itertools.pairwise(times))
            worst = max(pairs, key=lambda p: p[1] - p[0], default=(k, k + float("inf")))
            base = [t for t, _ in rows if k - 1.5 <= t <= k]
            baseline = max((b - a for a, b in itertools.pairwise(base)), default=float("inf"))
            _worst, lost = gaps(rows, k)
            out[name] = {"gap_ms": (worst[1] - worst[0]) * 1000,
                         "gap_at_ms": (worst[0] - k) * 1000,
                         "baseline_gap_ms": baseline * 1000, "lost": lost,
                         "carrier": self.carriers[name],
                         "last_reply_after_kill_s": (rows[-1][0] - k) if rows else None}
        return out

    def seq_repeats(self) -> int:
        seqs = Counter((spi, seq) for _t, spi, seq, _iv in self.esp)
        return sum(n - 1 for n in seqs.values() if n > 1)

    def iv_repeats(self) -> int:
        ivs = Counter((spi, iv) for _t, spi, _seq, iv in self.esp)
        return sum(n - 1 for n in ivs.values() if n > 1)


def kill_the_dispatcher(lab: Lab, tmp: Path) -> Killed:
    """Set the lab up, kill -9 its dispatcher under 200 pings/s per child,
    start the spare connection right after, and collect what happened."""
    s = start(lab, tmp)
    ike_owner, carriers = owners(s.config)
    assert len(ike_owner) == 2 and len(carriers) == 6, (ike_owner, carriers)
    assert len(set(carriers.values())) >= 2, carriers
    before = status(s.config)
    disp = before["dispatcher"]
    assert disp["pid"] and disp["supervisor_pid"] == s.cluster.pid, disp
    spis_before = ike_spis(s.charon)
    inits_before = _initiations(s.charon, ("a-b", "c-d"))
    pcap = tmp / "esp.pcap"
    dump = lab.popen(s.ns_a, ["tcpdump", "-i", "veth0", "-n", "-U", "-s", "96", "-w", str(pcap),
                              "udp port 4500"], stdout=open(os.devnull, "w"),
                     stderr=open(tmp / "tcpdump.err", "w"))
    time.sleep(0.5)
    streams = Streams(lab, s.ns_a, tmp, seconds=STREAM_S)
    time.sleep(KILL_AFTER_S)
    new_ike: dict[str, Any] = {}

    def initiate() -> None:
        # swanctl waits for the IKE SA and its child; charon retransmits the
        # IKE_SA_INIT every RETRANSMIT_S until a dispatcher answers
        try:
            s.charon.initiate(child=SPARE[1], ike=SPARE[0], timeout=NEW_IKE_TIMEOUT_S)
            new_ike["up"] = time.time()
        except CharonError as exc:
            new_ike["error"] = str(exc)

    killed_at = time.time()
    os.kill(disp["pid"], signal.SIGKILL)
    starter = threading.Thread(target=initiate)
    starter.start()
    streams.wait(timeout=STREAM_S + 20)
    starter.join(NEW_IKE_TIMEOUT_S + 10)
    time.sleep(0.3)
    dump.send_signal(signal.SIGINT)
    dump.wait(timeout=5)
    after = status(s.config)
    return Killed(
        setup=s, killed_at=killed_at, before=before, after=after,
        spis_before=spis_before, spis_after=ike_spis(s.charon), inits_before=inits_before,
        inits_after=_initiations(s.charon, ("a-b", "c-d")), carriers=carriers,
        replies=streams.replies(), esp=esp_rows(pcap, "198.18.0.2"),
        new_ike_s=None if "up" not in new_ike else new_ike["up"] - killed_at,
        new_ike_error=new_ike.get("error", ""), replay_failures=replay_failures(s.charon))


def all_children_pass(ns_a: str) -> None:
    for _c, name, k in [*CHILDREN, SPARE]:
        res = traffic.ping(ns_a, f"10.91.{k + 1}.1", src=f"10.91.{k}.1", count=3,
                           interval=0.05)
        assert res.ok, f"child {name}: {res.output}"


def rekeys_and_dpd(s: Setup, spis_before: dict[str, tuple[str, str]]) -> None:
    """strongSwan rekeys children and an IKE SA through the reattached
    members, and its DPD requests are answered."""
    s.charon.rekey_child("c1")
    s.charon.rekey_child("d2")
    new_ike = s.charon.rekey_ike("a-b")
    assert new_ike["initiator-spi"] != spis_before["a-b"][0]
    all_children_pass(s.ns_a)
    log_len = len(s.charon.log_text())
    time.sleep(2.5)
    tail = s.charon.log_text()[log_len:]
    assert "sending DPD request" in tail and "parsed INFORMATIONAL response" in tail, tail
    for name in ("a-b", "c-d", SPARE[0]):
        assert s.charon.ike_sa(name) is not None, name


def test_kill_9_of_the_dispatcher_with_strongswan(lab: Lab, tmp_path: Path) -> None:
    k = kill_the_dispatcher(lab, tmp_path)
    s = k.setup
    diag = f"\n{s.cluster.log_text()[-4000:]}\n{s.charon.log_tail()}"
    # a new dispatcher under the same supervisor; the members ran on
    assert k.after["dispatcher"]["pid"] not in (0, k.before["dispatcher"]["pid"]), k.after
    assert k.after["dispatcher"]["supervisor_pid"] == k.before["dispatcher"]["supervisor_pid"]
    assert ({m["id"]: m["pid"] for m in k.after["members"]}
            == {m["id"]: m["pid"] for m in k.before["members"]}), (k.before, k.after)
    # the same IKE SAs, no new IKE_SA_INIT for them
    assert {n: v for n, v in k.spis_after.items() if n != SPARE[0]} == k.spis_before, diag
    assert k.inits_after == k.inits_before, diag
    # nothing sent twice, nothing refused as a replay by charon
    assert k.esp, "no ESP captured"
    assert k.seq_repeats() == 0 and k.iv_repeats() == 0
    assert k.replay_failures == 0, diag
    # every child passed traffic after the kill; the new IKE SA came up
    children = k.children()
    print(f"\nkill -9 of the dispatcher: per child (gap ms, lost, carrier): "
          f"{ {n: (round(c['gap_ms']), c['lost'], c['carrier']) for n, c in children.items()} }; "
          f"new IKE SA up after {k.new_ike_s} s")
    for name, c in children.items():
        assert c["last_reply_after_kill_s"] is not None and c["last_reply_after_kill_s"] > 5.0, \
            (name, children)
    assert k.new_ike_s is not None, k.new_ike_error + diag
    assert s.charon.ike_sa(SPARE[0]) is not None
    all_children_pass(s.ns_a)
    # then rekeys and DPD
    rekeys_and_dpd(s, k.spis_before)
    assert s.cluster.alive()
    assert "Traceback" not in s.cluster.log_text()
