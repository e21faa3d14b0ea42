"""strongSwan against a cluster in network namespaces, with continuous pings
through every child, for the failover tests and the failover benchmark.

charon (namespace a, 198.18.0.1) brings up two IKE SAs (connections ``a-b``
and ``c-d``, different identities) with three children each; the cluster
(namespace b, 198.18.0.2, ``inside = tun``) spreads the children over its
members. Each child has an inner pair 10.91.<k>.1 (a) <-> 10.91.<k+1>.1 (b)."""

from __future__ import annotations

import itertools
import re
import subprocess
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import configs
from bench.harness.control import ask
from tests.cluster_util import wait_assigned as wait_assigned
from tests.interop_gw import PSK, OurProcess
from tests.lab.charon import Charon, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

#: an answer of the cluster (its members report with the next heartbeats)
STATUS_TIMEOUT_S = 15.0

#: (connection, child, k): inner nets 10.91.k.0/24 (charon) <-> 10.91.k+1.0/24 (cluster)
CHILDREN = [("a-b", "c1", 1), ("a-b", "c2", 11), ("a-b", "c3", 21),
            ("c-d", "d1", 31), ("c-d", "d2", 41), ("c-d", "d3", 51)]
IDS = {"a-b": ("gw-a.test", "gw-b.test"), "c-d": ("gw-c.test", "gw-b.test")}


def cluster_toml(members: int = 3, mode: str = "load-sharing",
                 extra: str | Mapping[str, Any] = "") -> str:
    """The cluster in namespace b: connections ``a-b`` and ``c-d`` with their
    children of ``CHILDREN`` (``extra``: more ``[cluster]`` keys, a mapping
    or TOML lines)."""
    more = tomllib.loads(extra) if isinstance(extra, str) else dict(extra)
    cluster = {"address": configs.LAB_GATEWAY, "inside": "tun:ipsc0",
               "inside_address": "10.91.2.1", "members": members, "mode": mode,
               "log_level": "info", "replay_after_failover": "rekey", **more}
    conns = []
    for conn in ("a-b", "c-d"):
        kids = tuple(configs.Child(name, f"10.91.{k + 1}.0/24", f"10.91.{k}.0/24",
                                   "aes128ctr-sha256" if k in (11, 41) else "aes128gcm16")
                     for c, name, k in CHILDREN if c == conn)
        conns.append(configs.Conn(conn, IDS[conn][1], IDS[conn][0], kids,
                                  options={"dpd_delay": 0}))
    return configs.dumps(configs.gateway_config(cluster, conns, psk=PSK, start_action=None))


def charon_conf() -> str:
    conns = []
    for conn in ("a-b", "c-d"):
        kids = [Child(name, f"10.91.{k}.0/24", f"10.91.{k + 1}.0/24",
                      esp_proposals="aes128ctr-sha256" if k in (11, 41) else "aes128gcm16")
                for c, name, k in CHILDREN if c == conn]
        conns.append(Conn(conn, "198.18.0.1", "198.18.0.2", kids, local_id=IDS[conn][0],
                          remote_id=IDS[conn][1], psk=PSK, dpd_delay="1s"))
    return render_swanctl_conf(*conns)


@dataclass
class Setup:
    ns_a: str
    ns_b: str
    charon: Charon
    cluster: OurProcess
    config: Path


def setup(lab: Lab, tmp_path: Path, **kw: Any) -> Setup:
    ns_a, ns_b, _veth = lab.pair()
    for _c, _n, k in CHILDREN:
        lab.add_lo_addr(ns_a, f"10.91.{k}.1")
        if k + 1 != 2:
            lab.add_lo_addr(ns_b, f"10.91.{k + 1}.1")
    cluster = OurProcess(lab, ns_b, cluster_toml(**kw), tmp_path, name="cluster")
    wait_assigned(cluster, int(kw.get("members", 3)), timeout=30)
    charon = lab.charon(ns_a, "charon-a", charon_options={"uniqueids": "no"})
    charon.load(charon_conf())
    for c, name, _k in CHILDREN:
        charon.initiate(child=name, ike=c)
    return Setup(ns_a, ns_b, charon, cluster, cluster.config)


def status(config: Path) -> dict[str, Any]:
    """``ipsec-cluster status --json``, asked on the control socket."""
    return ask(config, "status", timeout=STATUS_TIMEOUT_S)


def sas(config: Path) -> dict[str, Any]:
    """``ipsec-cluster sas --json``, asked on the control socket."""
    return ask(config, "sas", timeout=STATUS_TIMEOUT_S)


def owners(config: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(IKE SA name -> member owning it, child name -> member carrying it)."""
    ike: dict[str, int] = {}
    child: dict[str, int] = {}
    for m in sas(config)["members"]:
        for sa in m.get("ike_sas", []):
            if sa["state"] == "ESTABLISHED":
                ike[sa["name"]] = m["member"]
        for ch in m.get("child_sas", []):
            child[ch["name"]] = m["member"]
    return ike, child


class Streams:
    """``ping -D -i 0.005`` (200/s) through every child, from charon's side."""

    def __init__(self, lab: Lab, ns: str, tmp: Path, seconds: float,
                 interval: float = 0.005) -> None:
        self.files: dict[str, Path] = {}
        self.procs = []
        count = int(seconds / interval)
        for _c, name, k in CHILDREN:
            f = tmp / f"ping-{name}.txt"
            self.files[name] = f
            self.procs.append(lab.popen(ns, [
                "ping", "-n", "-D", "-i", str(interval), "-W", "1", "-c", str(count),
                "-I", f"10.91.{k}.1", f"10.91.{k + 1}.1"], stdout=f.open("w"),
                stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for p in self.procs:
            p.wait(timeout=max(0.1, end - time.monotonic()))

    def replies(self) -> dict[str, list[tuple[float, int]]]:
        out: dict[str, list[tuple[float, int]]] = {}
        pat = re.compile(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+)")
        for name, f in self.files.items():
            rows = []
            for line in f.read_text().splitlines():
                m = pat.match(line)
                if m:
                    rows.append((float(m.group(1)), int(m.group(2))))
            out[name] = rows
        return out


def gaps(replies: list[tuple[float, int]], after: float) -> tuple[float, int]:
    """(largest gap between replies around ``after``, replies lost)."""
    times = [t for t, _ in replies]
    seqs = {s for _, s in replies}
    lost = (max(seqs) - min(seqs) + 1 - len(seqs)) if seqs else 0
    worst = 0.0
    for a, b in itertools.pairwise(times):
        if b >= after - 1.0 and a <= after + 5.0:
            worst = max(worst, b - a)
    return worst, lost
