"""Cleartext reaches the member that carries its child through the kernel, not
through the dispatcher (member/tuns.py, docs/routing.md "Host routes").

A 2-member cluster in namespace b (198.18.0.2, ``inside = tun:ipsc0``) and our
own peer in namespace a (198.18.0.1, a ``udp:`` inside the test reads) with
one IKE SA of four children, spread over both members. Cleartext sent in
namespace b to each child's remote network must come out of the peer
decrypted; the dispatcher relays none of it (``inner_relayed``), the
cluster's table routes each child's prefix to its member's TUN device.
After ``kill -9`` of a member its children's routes point to their new
carrier's device and traffic flows again; after SIGTERM table 220 is empty
and our rules are gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.harness import configs
from tests.cluster_util import (
    ROOT,
    Endpoint,
    Proc,
    cli_argv,
    gateway_toml,
    parse_udp4,
    sas,
    socket_in_netns,
    status,
    tail,
    wait_assigned,
    wait_for,
)
from tests.lab.netns import Lab

GW, PEER = "198.18.0.2", "198.18.0.1"
PEER_INSIDE, PEER_BIND = ("127.0.0.1", 9100), ("127.0.0.1", 9101)
#: the cluster's side 10.91.2.0/24 (its TUN's address 10.91.2.1); child k's
#: remote network 10.91.k.0/24
KS = (1, 11, 21, 31)
CHILDREN = tuple(configs.Child(f"c{k}", "10.91.2.0/24", f"10.91.{k}.0/24") for k in KS)
CONN = configs.Conn("a-b", "gw-b.test", "gw-a.test", CHILDREN)
PER_CHILD = 20
STOP_TIMEOUT_S = 15.0


def _table(lab: Lab, ns: str) -> str:
    return "".join(lab.run(ns, ["ip", fam, "route", "show", "table", "220"]).stdout
                   for fam in ("-4", "-6"))


def _carriers(config: Path) -> dict[int, int]:
    """child k -> the member carrying it (from ``sas``)."""
    out = {}
    for m in sas(config)["members"]:
        for ch in m.get("child_sas", []):
            out[int(ch["name"][1:])] = m["member"]
    return out


def _routed_to_carriers(lab: Lab, ns: str, config: Path) -> dict[int, int] | None:
    carriers = _carriers(config)
    if set(carriers) != set(KS):
        return None
    table = _table(lab, ns)
    ok = all(f"10.91.{k}.0/24 dev ipsc0m{m} " in table for k, m in carriers.items())
    return carriers if ok else None


def _send_and_receive(lab: Lab, ns: str, peer_ep: Endpoint, tag: int) -> dict[int, int]:
    """PER_CHILD datagrams from 10.91.2.1 (ns b) to 10.91.k.1 for each child;
    k -> how many came out of the peer decrypted (within a few seconds)."""
    sock = socket_in_netns(ns)
    try:
        sock.bind(("10.91.2.1", 0))
        for i in range(PER_CHILD):
            for k in KS:
                sock.sendto(b"OUTB" + bytes([tag, k, i]), (f"10.91.{k}.1", 9))
            time.sleep(0.002)
    finally:
        sock.close()
    got: dict[int, int] = dict.fromkeys(KS, 0)
    end = time.monotonic() + 5
    while time.monotonic() < end and min(got.values()) < PER_CHILD:
        for packet in peer_ep.take():
            udp = parse_udp4(packet)
            if udp is None or not udp.payload.startswith(b"OUTB") or udp.payload[4] != tag:
                continue
            k = udp.payload[5]
            if k in got and udp.dst == f"10.91.{k}.1":
                got[k] += 1
        time.sleep(0.05)
    return got


def _dispatcher(config: Path) -> dict[str, Any]:
    d: dict[str, Any] = status(config)["dispatcher"]
    return d


@dataclass
class Up:
    ns_a: str
    ns_b: str
    config: Path
    cluster: Proc
    peer: Proc
    peer_ep: Endpoint

    def diag(self) -> str:
        return (tail(self.cluster.log_path) + "\n" + tail(self.peer.log_path) + "\n"
                + self.table)

    table = ""


@contextlib.contextmanager
def cluster_and_peer(lab: Lab, tmp_path: Path, *, taken: str = "") -> Iterator[Up]:
    """The cluster (ns b) with its members joined, our peer (ns a) started;
    ``taken``: a TUN device of that name made in ns b first (not ours)."""
    ns_a, ns_b, _veth = lab.pair()
    if taken:
        lab.run(ns_b, ["ip", "tuntap", "add", "dev", taken, "mode", "tun"])
    config = tmp_path / "cluster.toml"
    config.write_text(gateway_toml(address=GW, ports=(500, 4500), inside="tun:ipsc0",
                                   members=2, conns=[CONN],
                                   extra={"inside_address": "10.91.2.1"}))
    cluster = Proc(cli_argv("run", "--config", str(config)), tmp_path / "cluster.log",
                   name="cluster", popen=lambda argv, **kw: lab.popen(ns_b, argv, **kw))
    wait_assigned(cluster, 2, timeout=30)
    peer_ep = Endpoint(PEER_INSIDE, PEER_BIND, ns=ns_a)
    try:
        peer_cfg = tmp_path / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=PEER, ports=(500, 4500), inside=f"udp:{PEER_INSIDE[0]}:{PEER_INSIDE[1]}",
            inside_bind=f"{PEER_BIND[0]}:{PEER_BIND[1]}", conns=[CONN], remote=(GW, 500)))
        peer = Proc(cli_argv("peer", "--config", str(peer_cfg)), tmp_path / "peer.log",
                    name="peer", popen=lambda argv, **kw: lab.popen(ns_a, argv, **kw))
        yield Up(ns_a, ns_b, config, cluster, peer, peer_ep)
    finally:
        peer_ep.close()


def _stop(up: Up) -> None:
    up.peer.close()
    up.cluster.proc.send_signal(signal.SIGTERM)
    up.cluster.proc.wait(STOP_TIMEOUT_S)


@pytest.mark.netns
@pytest.mark.slow
def test_cleartext_reaches_each_carrier_through_its_own_tun(lab: Lab, tmp_path: Path) -> None:
    with cluster_and_peer(lab, tmp_path) as up:
        ns_b, config, peer_ep = up.ns_b, up.config, up.peer_ep
        links = lab.run(ns_b, ["ip", "-o", "link", "show"]).stdout
        assert "ipsc0m1:" in links and "ipsc0m2:" in links, links

        def diag() -> str:
            up.table = _table(lab, ns_b)
            return up.diag()

        carriers = wait_for("every child routed to its carrier's TUN",
                            lambda: _routed_to_carriers(lab, ns_b, config), timeout=40,
                            diag=diag)
        assert set(carriers.values()) == {1, 2}, f"children not spread: {carriers}"
        table = _table(lab, ns_b)
        for k in KS:   # a child's prefix equal to a configured net replaced its base route
            assert f"10.91.{k}.0/24 dev ipsc0 " not in table, table

        got = _send_and_receive(lab, ns_b, peer_ep, tag=1)
        assert got == dict.fromkeys(KS, PER_CHILD), f"{got}\n{diag()}"
        d = _dispatcher(config)
        assert d["counters"].get("inner_relayed", 0) == 0, d
        assert not d["drops"].get("kernel_route_error"), d

        # kill -9 the carrier of the first child: its children move to the
        # survivor, and so do their routes (until the restarted member, on the
        # same TUN device, takes its share back: a table poller sees both)
        victim = carriers[KS[0]]
        survivor = 3 - victim
        pid = next(m["pid"] for m in status(config)["members"] if m["id"] == victim)
        moved = [k for k, m in carriers.items() if m == victim]
        seen: list[str] = []
        polling = threading.Event()
        polling.set()

        def poll() -> None:
            while polling.is_set():
                seen.append(_table(lab, ns_b))
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            os.kill(pid, signal.SIGKILL)

            def moved_to_survivor() -> bool:
                return any(all(f"10.91.{k}.0/24 dev ipsc0m{survivor} " in t for k in moved)
                           for t in list(seen))

            wait_for(f"routes of {moved} on member {survivor}'s TUN", moved_to_survivor,
                     timeout=30, diag=diag)
        finally:
            polling.clear()
            poller.join(5)

        def flowing() -> dict[int, int] | None:
            got = _send_and_receive(lab, ns_b, peer_ep, tag=2)
            return got if all(got[k] >= PER_CHILD * 0.9 for k in KS) else None

        wait_for("traffic on every child again", flowing, timeout=30, diag=diag)
        wait_for("routes follow the carriers", lambda: _routed_to_carriers(lab, ns_b, config),
                 timeout=15, diag=diag)
        _stop(up)
    assert _table(lab, ns_b) == ""
    for fam in ("-4", "-6"):
        rules = lab.run(ns_b, ["ip", fam, "rule"]).stdout
        assert "lookup 220" not in rules and "suppress_prefixlength" not in rules, rules
    assert "ipsc0m" not in lab.run(ns_b, ["ip", "-o", "link", "show"]).stdout


@pytest.mark.netns
@pytest.mark.slow
def test_a_tun_that_cannot_be_made_leaves_the_dispatcher_path(lab: Lab,
                                                               tmp_path: Path) -> None:
    """Member 2's device name is taken (by a device of someone else): no
    per-member devices, one line why, and cleartext flows as before, through
    the dispatcher; the other device is left alone."""
    with cluster_and_peer(lab, tmp_path, taken="ipsc0m2") as up:
        def diag() -> str:
            up.table = _table(lab, up.ns_b)
            return up.diag()

        wait_for("4 children up", lambda: set(_carriers(up.config)) == set(KS), timeout=40,
                 diag=diag)
        got = _send_and_receive(lab, up.ns_b, up.peer_ep, tag=3)
        assert got == dict.fromkeys(KS, PER_CHILD), f"{got}\n{diag()}"
        d = _dispatcher(up.config)
        assert d["counters"].get("inner_relayed", 0) >= PER_CHILD * len(KS), d
        log = up.cluster.log_path.read_text()
        assert log.count("cleartext to members through the dispatcher: cannot create "
                         "the per-member TUN devices") == 1, log[-3000:]
        assert "ipsc0m" not in _table(lab, up.ns_b)
        _stop(up)
    assert "ipsc0m1" not in lab.run(up.ns_b, ["ip", "-o", "link", "show"]).stdout
    assert "ipsc0m2" in lab.run(up.ns_b, ["ip", "-o", "link", "show"]).stdout


# -- when the dispatcher keeps the path (each case one line why) -----------------------

_PROBE = """
import asyncio, logging, sys
from member.config_file import read_config
from dispatcher.cluster import Dispatcher
logging.basicConfig(level=logging.INFO, format="%(message)s")
d = Dispatcher(read_config(sys.argv[1]), sys.argv[2])
d.want_member_tuns = sys.argv[3] == "1"
async def main():
    await d.start()
    print("fds", [d.member_tun_fd(m) is not None for m in (1, 2)])
    d.close()
asyncio.run(main())
"""


@pytest.mark.netns
@pytest.mark.parametrize(("inside", "endpoint", "ours", "line"), [
    ("tun:ipsc0", "ipc://{tmp}/m.ipc", True,
     "cleartext to members through the kernel: TUN devices ipsc0m1, ipsc0m2"),
    ("udp:127.0.0.1:9000", "ipc://{tmp}/m.ipc", True,
     "cleartext to members through the dispatcher: the inside is udp, not a TUN device"),
    ("tun:ipsc0", "tcp://127.0.0.1:7700", True,
     "cleartext to members through the dispatcher: members may join from other hosts "
     "(tcp://127.0.0.1:7700)"),
    ("tun:ipsc0", "ipc://{tmp}/m.ipc", False,
     "cleartext to members through the dispatcher: the members are not started by this "
     "process"),
])
def test_which_path_and_why(lab: Lab, tmp_path: Path, inside: str, endpoint: str,
                            ours: bool, line: str) -> None:
    ns = lab.netns()
    config = tmp_path / "cluster.toml"
    config.write_text(gateway_toml(address="127.0.0.1", ports=(500, 4500), inside=inside,
                                   members=2, conns=[CONN],
                                   extra={"inside_address": "10.91.2.1"}
                                   if inside.startswith("tun") else {}))
    res = lab.run(ns, [sys.executable, "-c", _PROBE, str(config),
                       endpoint.format(tmp=tmp_path), "1" if ours else "0"],
                  cwd=str(ROOT), check=False, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(line) == 1, res.stderr
    kernel = "through the kernel" in line
    assert f"fds [{kernel}, {kernel}]" in res.stdout, res.stdout
    assert lab.run(ns, ["ip", "-o", "link", "show"]).stdout.count("ipsc0") == 0


_HANDOVER = """
import asyncio, os, socket, subprocess
from member.tuns import MemberTuns, read_packets
tuns = MemberTuns("ipsx0", 2, 1400)
tuns.open()
subprocess.run(["ip", "route", "add", "10.9.1.0/24", "dev", "ipsx0m1"], check=True)
subprocess.run(["ip", "addr", "add", "10.9.0.1/32", "dev", "lo"], check=True)
alive = {1: False, 2: False}
got = []
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("10.9.0.1", 0))
async def main():
    loop = asyncio.get_running_loop()
    tuns.read_while_dead(alive.get, loop, got.extend)   # member 1 dead: we read
    sock.sendto(b"while-dead", ("10.9.1.7", 9))
    await asyncio.sleep(0.2)
    alive[1] = True
    tuns.read_while_dead(alive.get, loop, got.extend)   # alive again: it reads
    sock.sendto(b"queued", ("10.9.1.7", 9))
    await asyncio.sleep(0.2)
    mine = read_packets(tuns.fd(1), 256)
    print("dispatcher", [p[28:] for p in got if p[0] >> 4 == 4 and p[9] == 17])
    print("member", [p[28:] for p in mine if p[0] >> 4 == 4 and p[9] == 17])
    print("readers", sorted(m for m, r in tuns.readers.items() if r.reading))
    tuns.close()
asyncio.run(main())
links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
print("left", links.count("ipsx0m"))
"""


@pytest.mark.netns
def test_a_dead_members_tun_is_read_by_the_dispatcher_until_it_is_back(
        lab: Lab, tmp_path: Path) -> None:
    """member/tuns.py on real devices: while member 1 has no live incarnation
    the dispatcher reads its device; once it is back the packets wait on the
    device for the member (nothing read twice, nothing lost); closing removes
    the devices."""
    ns = lab.netns()
    res = lab.run(ns, [sys.executable, "-c", _HANDOVER], cwd=str(ROOT), check=False,
                  timeout=30)
    assert res.returncode == 0, res.stderr
    assert "dispatcher [b'while-dead']" in res.stdout, res.stdout
    assert "member [b'queued']" in res.stdout, res.stdout
    assert "readers [2]" in res.stdout, res.stdout
    assert "left 0" in res.stdout, res.stdout


_APPLIER = """
import ipaddress, subprocess
from member.routes import KernelRoutes
from member.tun import open_tun, configure
net = ipaddress.ip_network
fd, _ = open_tun("d0")   # (no dummy devices on every kernel)
configure("d0", None)
def table():
    return "".join(subprocess.run(["ip", f, "route", "show", "table", "1220"],
                                  capture_output=True, text=True).stdout for f in ("-4", "-6"))
kr = KernelRoutes(1220)
print("ok1", kr.apply({net("10.9.0.0/24"): "d0", net("fd00:9::/64"): "d0",
                       net("0.0.0.0/0"): "d0"}, []))
print("t1", table().replace(chr(10), ";"))
print("ok2", kr.apply({}, [net("10.9.0.0/24"), net("fd00:9::/64"), net("0.0.0.0/0")]))
print("t2", repr(table()))
print("ok3", kr.apply({net("10.8.0.0/24"): "nodev0", net("10.7.0.0/24"): "d0"}, []))
print("errors", kr.errors, "t3", table().strip())
"""


@pytest.mark.netns
def test_the_applier_changes_our_table_in_one_batch_and_counts_failures(lab: Lab) -> None:
    ns = lab.netns()
    res = lab.run(ns, [sys.executable, "-c", _APPLIER], cwd=str(ROOT), check=False, timeout=30)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "ok1 True" in out and "ok2 True" in out and "ok3 False" in out, out
    t1 = next(line for line in out.splitlines() if line.startswith("t1"))
    for route in ("default dev d0", "10.9.0.0/24 dev d0", "fd00:9::/64 dev d0"):
        assert route in t1, t1
    assert "t2 ''" in out, out
    # the bad line is counted; the good one after it still went in (-force)
    assert "errors 1 t3 10.7.0.0/24 dev d0" in out, out
