"""Two dispatcher hosts, active and standby (docs/failover.md "Two dispatcher
hosts"): the cluster's address moves with VRRP (keepalived in each
dispatcher namespace, its notify script signalling the local
``ipsec-cluster run``), members on other hosts know both dispatchers (tcp://
with CURVE) and follow the active one; our peer holds IKE SAs with children
and sends inner packets every 5 ms through every child.

    peer 198.18.50.1 ─┐
    disp-a .11 ───────┤  bridge in its own namespace; the cluster's address
    disp-b .12 ───────┤  198.18.50.10 (VRRP) on disp-a or disp-b
    host1 .21 (m1) ───┤
    host2 .22 (m2) ───┘

The active dispatcher host is stopped (its processes killed -9, its link
down): the standby takes the address, the members reattach to it with the
same sender ids and IKE SAs (the peer sees nothing: no rekey, the same
SPIs), traffic flows again; the gap and the time until a new IKE SA is
accepted are printed. Then the old host comes back: it stays the standby
(keepalived's nopreempt), answers members with a STANDBY notice and takes
no member, while the active one's term is above the one it had.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.vrrp import Vrrp, write
from tests.cluster_util import (
    UP,
    Endpoint,
    Proc,
    Procs,
    alive_members,
    cli_argv,
    gateway_toml,
    grid_connections,
    parse_udp4,
    sas,
    status,
    tail,
    udp4_packet,
    wait_for,
    wait_status,
)
from tests.conftest import REQUIRE_ENV
from tests.lab.netns import Lab
from tests.test_cluster_rejoin import keygen

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NET = "198.18.50"
VIP, PEER = f"{NET}.10", f"{NET}.1"
DISP = {"a": f"{NET}.11", "b": f"{NET}.12"}
HOSTS = {1: f"{NET}.21", 2: f"{NET}.22"}
SYNC_PORT = 32790
GW_PORTS = (32700, 32701)
PEER_PORTS = (32800, 32801)
PEER2_PORTS = (32802, 32803)
INSIDE, INSIDE_BIND = ("127.0.0.1", 32710), ("127.0.0.1", 32711)
N_IKE, N_CHILD = 2, 2
#: the rejoin tests' timing: a dispatcher is silent after 4 x 50 ms
TIMING = {"heartbeat_interval": 0.05, "dead_after": 4}
PRIORITY = {"a": 150, "b": 100}
#: inner packets per flow per second during the failover
PPS = 200


def _need_keepalived() -> str:
    path = shutil.which("keepalived") or next(
        (p for p in ("/usr/sbin/keepalived", "/sbin/keepalived") if os.path.exists(p)), None)
    if path is None:
        reason = ("keepalived is not installed (Debian: apt-get install keepalived; "
                  "`make sysdeps` installs it as root)")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


class TimedEndpoint(Endpoint):
    """An inside endpoint that keeps when each packet came."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        self.times: list[tuple[float, bytes]] = []
        super().__init__(*a, **kw)

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.times.append((time.monotonic(), data))


class Pair:
    """The two-host rig: namespaces on a bridge, keys, configs, processes."""

    def __init__(self, lab: Lab, tmp: Path, procs: Procs, keepalived: str) -> None:
        self.lab, self.tmp, self.procs, self.keepalived = lab, tmp, procs, keepalived
        self.sw = lab.netns()
        lab.run(self.sw, ["ip", "link", "add", "br0", "type", "bridge"])
        lab.run(self.sw, ["ip", "link", "set", "br0", "up"])
        self.ns: dict[str, str] = {}
        self.dev: dict[str, str] = {}
        for name, addr in (("peer", PEER), ("a", DISP["a"]), ("b", DISP["b"]),
                           ("host1", HOSTS[1]), ("host2", HOSTS[2])):
            ns = self.ns[name] = lab.netns()
            self.dev[name] = self._port(name, ns, f"{addr}/24")
        for side in ("a", "b"):
            # the standby binds the cluster's address before it holds it
            lab.run(self.ns[side], ["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"])
        keys = tmp / "keys"
        for name in ("dispatcher-a", "dispatcher-b", "member1", "member2"):
            keygen(keys, name)
        authorized = tmp / "authorized"
        authorized.mkdir()
        for m in (1, 2):
            (authorized / f"member{m}.key").write_bytes((keys / f"member{m}.key").read_bytes())
        self.conns = grid_connections(N_IKE, N_CHILD)
        self.config = {side: self._dispatcher_config(side) for side in ("a", "b")}
        self.disp: dict[str, Proc] = {}
        self.ka: dict[str, Proc] = {}
        self.members: dict[int, Proc] = {}
        self.inside: dict[str, TimedEndpoint] = {}
        self.peer_ep: TimedEndpoint | None = None

    def _port(self, name: str, ns: str, cidr: str) -> str:
        sw_dev, dev = f"p-{name}", "eth0"
        self.lab.run(self.sw, ["ip", "link", "add", sw_dev, "type", "veth", "peer", "name", dev,
                               "netns", ns])
        self.lab.run(self.sw, ["ip", "link", "set", sw_dev, "master", "br0", "up"])
        self.lab.run(ns, ["ip", "addr", "add", cidr, "dev", dev])
        self.lab.run(ns, ["ip", "link", "set", dev, "up"])
        return dev

    def _dispatcher_config(self, side: str) -> Path:
        path = self.tmp / f"dispatcher-{side}.toml"
        path.write_text(gateway_toml(
            address=VIP, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
            inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", members=0, conns=self.conns,
            extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}", "expect_members": 2, **TIMING,
                   "curve_secret_key": f"keys/dispatcher-{side}.key_secret",
                   "curve_authorized": "authorized", "role": "standby",
                   "control": str(self.tmp / f"run-{side}")}))
        return path

    def start_dispatcher(self, side: str, tag: str = "") -> None:
        self.disp[side] = self.procs.start(
            f"dispatcher-{side}{tag}", cli_argv("run", "--config", str(self.config[side])),
            ns=self.ns[side])
        self.disp[side].wait_ready(timeout=20)
        conf, _ = write(self.tmp / f"keepalived-{side}",
                        Vrrp(f"disp-{side}", self.dev[side], f"{VIP}/24", PRIORITY[side]),
                        self.tmp / f"run-{side}")
        d = conf.parent
        self.ka[side] = self.procs.start(f"keepalived-{side}{tag}", [
            self.keepalived, "--dont-fork", "--log-console", "--log-detail", "--vrrp",
            "-f", str(conf), "-p", str(d / "keepalived.pid"), "-r", str(d / "vrrp.pid"),
            "-c", str(d / "checkers.pid")], ns=self.ns[side])

    def start_member(self, m: int) -> None:
        path = self.tmp / f"member{m}.toml"
        path.write_text(gateway_toml(
            address=VIP, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
            conns=self.conns,
            extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}", **TIMING,
                   "curve_secret_key": f"keys/member{m}.key_secret",
                   "curve_server_key": "keys/dispatcher-a.key",
                   "sync_standby": f"tcp://{DISP['b']}:{SYNC_PORT}",
                   "curve_server_key_standby": "keys/dispatcher-b.key"}))
        self.members[m] = self.procs.start(f"member{m}", cli_argv(
            "member", "--config", str(path), "--id", str(m),
            "--connect", f"tcp://{DISP['a']}:{SYNC_PORT}"), ns=self.ns[f"host{m}"])

    def status(self, side: str) -> dict[str, Any]:
        """That host's status; a dispatcher restarting (deposed, or a role
        change) leaves its control socket unanswered for a moment
        (docs/operations.md): asked again for up to STATUS_RETRY_S."""
        end = time.monotonic() + STATUS_RETRY_S
        while True:
            try:
                return status(self.config[side])
            except AssertionError:
                if time.monotonic() >= end:
                    raise
                time.sleep(0.1)

    def diag(self) -> str:
        out = ""
        for name in ("dispatcher-a", "dispatcher-b", "member1", "member2", "keepalived-a",
                     "keepalived-b", "peer"):
            if (self.tmp / f"{name}.log").exists():
                out += f"\n--- {name}\n" + tail(self.tmp / f"{name}.log")
        return out

    def ike(self, side: str) -> set[tuple[str, str]]:
        answer = sas(self.config[side])
        return {(sa["spi_i"], sa["spi_r"]) for m in answer["members"]
                for sa in m.get("ike_sas", [])}

    def close(self) -> None:
        for ep in [*self.inside.values(), *([self.peer_ep] if self.peer_ep else [])]:
            ep.close()
        self.procs.close()


def _flows(pair: Pair) -> list[tuple[str, str]]:
    return [ch.host_pair() for conn in pair.conns for ch in conn.children]


def _sender(pair: Pair, stop: threading.Event, sent: list[float]) -> None:
    """Inner packets from the peer's inside through every child, PPS per flow."""
    assert pair.peer_ep is not None
    flows = _flows(pair)
    seq = 0
    while not stop.is_set():
        for i, (chost, phost) in enumerate(flows):
            body = b"CLTT" + i.to_bytes(2, "big") + bytes([UP]) + seq.to_bytes(4, "big")
            pair.peer_ep.send(udp4_packet(phost, chost, 40000, 7000 + i, body, ident=seq & 0xFFFF))
        sent.append(time.monotonic())
        seq += 1
        time.sleep(1 / PPS)


def _arrivals(pair: Pair) -> list[float]:
    """When inner packets of ours came out of either dispatcher's inside."""
    out = []
    for ep in pair.inside.values():
        with ep._lock:
            items = list(ep.times)
        for t, data in items:
            p = parse_udp4(data)
            if p is not None and p.payload[:4] == b"CLTT":
                out.append(t)
    return sorted(out)


#: how long a status request is retried while a dispatcher restarts
STATUS_RETRY_S = 5.0


def _up(pair: Pair, procs: Procs, tmp_path: Path
        ) -> tuple[dict[int, tuple[int, int]], set[tuple[str, str]], int]:
    """Both hosts (a active), both members, our peer's IKE SAs and children:
    the members' (pid, sender id), the IKE SAs and disp-a's term."""
    pair.start_dispatcher("a")
    wait_status(pair.config["a"], "disp-a active (VRRP master)",
                lambda s: s["dispatcher"]["role"] == "active", timeout=15, diag=pair.diag)
    pair.start_dispatcher("b")
    time.sleep(1.0)
    assert pair.status("b")["dispatcher"]["role"] == "standby", pair.diag()
    for m in (1, 2):
        pair.start_member(m)
    wait_status(pair.config["a"], "2 members with segments at disp-a",
                lambda s: len(alive_members(s)) == 2
                and all(m["segments"] and m["backup_segments"] for m in s["members"]),
                timeout=30, diag=pair.diag)
    assert not pair.status("b")["members"]
    assert pair.status("b")["dispatcher"]["counters"].get("notice_standby", 0) == 0
    for side in ("a", "b"):
        pair.inside[side] = TimedEndpoint(INSIDE, INSIDE_BIND, ns=pair.ns[side])
    pair.peer_ep = TimedEndpoint(INSIDE, INSIDE_BIND, ns=pair.ns["peer"])
    peer_cfg = tmp_path / "peer.toml"
    peer_cfg.write_text(gateway_toml(
        address=PEER, ports=PEER_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
        inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", conns=pair.conns,
        remote=(VIP, GW_PORTS[0])))
    procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)), ns=pair.ns["peer"])
    wait_for("all children up", lambda: sum(
        m["child_sas"] for m in pair.status("a")["members"]) == N_IKE * N_CHILD,
        timeout=30, diag=pair.diag)
    wait_for("children replicated", lambda: all(
        not m["replication"].get("degraded") for m in pair.status("a")["members"]),
        timeout=10, diag=pair.diag)
    st_a = pair.status("a")
    term_a = st_a["dispatcher"]["term"]
    assert term_a >= 1 and st_a["dispatcher"]["host"]
    ids = {m["id"]: (m["pid"], m["sender_id"]) for m in st_a["members"]}
    ike0 = pair.ike("a")
    assert len(ike0) == N_IKE

    return ids, ike0, term_a


def test_the_standby_host_takes_over_with_the_same_sas_and_the_old_one_stays_fenced(
        lab: Lab, tmp_path: Path) -> None:
    keepalived = _need_keepalived()
    procs = Procs(tmp_path)
    pair = Pair(lab, tmp_path, procs, keepalived)
    try:
        ids, ike0, term_a = _up(pair, procs, tmp_path)
        stop, sent = threading.Event(), list[float]()
        sender = threading.Thread(target=_sender, args=(pair, stop, sent), daemon=True)
        sender.start()
        wait_for("traffic through disp-a", lambda: len(_arrivals(pair)) > 50, timeout=10,
                 diag=pair.diag)
        # stop the active host: its processes killed, its link down
        t_kill = time.monotonic()
        for proc in (pair.disp["a"], pair.ka["a"]):
            proc.signal_group(signal.SIGKILL)
        lab.run(pair.ns["a"], ["ip", "link", "set", pair.dev["a"], "down"])
        # a new IKE SA, asked for at once (its retransmits reach the new active)
        peer2 = tmp_path / "peer2.toml"
        peer2.write_text(gateway_toml(
            address=PEER, ports=PEER2_PORTS, inside="udp:127.0.0.1:32720",
            inside_bind="127.0.0.1:32721", conns=pair.conns[:1], remote=(VIP, GW_PORTS[0])))
        new = procs.start("peer2", cli_argv(
            "peer", "--config", str(peer2), "--ike-sas", "1", "--exit-when-up",
            "--initial-contact", "none", "--timeout", "20"), ns=pair.ns["peer"])
        st = wait_status(pair.config["b"], "disp-b active with both members reattached",
                         lambda s: s["dispatcher"]["role"] == "active"
                         and len(alive_members(s)) == 2, timeout=20, diag=pair.diag)
        t_members = time.monotonic() - t_kill
        assert new.wait(30) == 0, new.tail() + pair.diag()
        t_new_ike = time.monotonic() - t_kill
        time.sleep(1.5)
        stop.set()
        sender.join(5)
        # the same member processes and sender ids, a term above disp-a's
        assert {m["id"]: (m["pid"], m["sender_id"]) for m in st["members"]} == ids
        assert st["dispatcher"]["term"] > term_a
        wait_for("the same IKE SAs at disp-b", lambda: ike0 <= pair.ike("b"), timeout=10,
                 diag=pair.diag)
        arrivals = _arrivals(pair)
        after = [t for t in arrivals if t > t_kill]
        assert after, "no packet came through after the failover" + pair.diag()
        before = max(t for t in arrivals if t <= t_kill)
        gaps = [b - a for a, b in zip([before, *after], after, strict=False)]
        gap = max(gaps)
        assert pair.inside["b"].times, "nothing came out of disp-b's inside"
        print(f"two hosts: gap {gap * 1000:.0f} ms (last packet before the kill "
              f"{(t_kill - before) * 1000:.0f} ms before it), members reattached "
              f"{t_members:.2f} s and a new IKE SA up {t_new_ike:.2f} s after the kill; "
              f"term {term_a} -> {st['dispatcher']['term']}")
        drops = [m["drops"] for m in pair.status("b")["members"]]
        print(f"member drops after the failover: {drops}")

        # the old active comes back: nopreempt keeps it the standby, and it
        # takes no member (they follow the active one, term above its old one)
        lab.run(pair.ns["a"], ["ip", "link", "set", pair.dev["a"], "up"])
        pair.start_dispatcher("a", "-again")
        time.sleep(2.0)
        sa, sb = pair.status("a"), pair.status("b")
        assert sa["dispatcher"]["role"] == "standby" and not sa["members"], pair.diag()
        assert sb["dispatcher"]["role"] == "active" and len(alive_members(sb)) == 2
        assert {m["id"]: (m["pid"], m["sender_id"]) for m in sb["members"]} == ids
    finally:
        pair.close()


def test_a_hung_active_that_wakes_up_is_fenced_by_the_term_then_reactivated(
        lab: Lab, tmp_path: Path) -> None:
    """disp-a hangs (every process of its host stopped) and disp-b takes over
    (term 2). disp-a wakes up believing it is active at term 1, and VRRP
    gives it the address back (its priority is higher): disp-b stands down,
    the members turn to disp-a, and their first claim (term 2) deposes the
    old incarnation; the next one rebuilds at term 3 from the same members,
    sender ids and SAs. Nothing of term 1 is taken by a member meanwhile."""
    keepalived = _need_keepalived()
    procs = Procs(tmp_path)
    pair = Pair(lab, tmp_path, procs, keepalived)
    try:
        ids, ike0, term_a = _up(pair, procs, tmp_path)
        a_pids = lab_pids(pair.ns["a"])
        for pid in a_pids:
            os.kill(pid, signal.SIGSTOP)
        st = wait_status(pair.config["b"], "disp-b active with both members",
                         lambda s: s["dispatcher"]["role"] == "active"
                         and len(alive_members(s)) == 2, timeout=20, diag=pair.diag)
        term_b = st["dispatcher"]["term"]
        assert term_b > term_a
        for pid in a_pids:
            os.kill(pid, signal.SIGCONT)
        st = wait_status(pair.config["a"], "disp-a active again above disp-b's term",
                         lambda s: s["dispatcher"]["role"] == "active"
                         and s["dispatcher"]["term"] > term_b
                         and len(alive_members(s)) == 2, timeout=30, diag=pair.diag)
        assert {m["id"]: (m["pid"], m["sender_id"]) for m in st["members"]} == ids
        wait_for("disp-b back to standby", lambda: pair.status("b")["dispatcher"]["role"]
                 == "standby", timeout=10, diag=pair.diag)
        # (deposed first: disp-a's term now above disp-b's says it was
        # re-activated after its members' claims showed it disp-b's term)
        wait_for("the same IKE SAs at disp-a", lambda: ike0 <= pair.ike("a"), timeout=10,
                 diag=pair.diag)
        print(f"hung active woke up: terms {term_a} -> {term_b} -> "
              f"{st['dispatcher']['term']}; refused by members: "
              f"{[m['refused'] for m in st['members']]}")
    finally:
        pair.close()


def lab_pids(ns: str) -> list[int]:
    from tests.lab.netns import netns_pids

    return netns_pids(ns)
