"""Members on other hosts come back (docs/failover.md "Rejoin, fencing and
reattach"): network namespaces over tcp:// with CURVE, as in
tests/test_cluster_multihost.py, our peer with IKE SAs and the ESP-recording
relay in front of the cluster. Each member runs in a restart loop, the
stand-in for its host's systemd unit (examples/systemd/): it is started again
on any exit but 2 (refused) and 3 (replaced).

    peer ns 198.18.40.1 ── 198.18.40.2 dispatcher ns 198.18.41.1 ── 198.18.41.2 host1 (m1, m2)
                                                     198.18.42.1 ── 198.18.42.2 host2 (m3)

- host2's link down for 0.3 s and for 5 s, member 3 killed -9, a
  replacement of member 3 started while the old one hangs (SIGSTOP): each
  time member 3 is back as a live backup within 10 s, no SA lost, traffic
  through every child; the old one, woken, is told it was replaced and stops
  (exit 3); a second process with the key of a healthy member waits and
  joins once that one is killed; a member with another heartbeat interval
  exits 2 with one line naming the key and both values;
- the dispatcher killed -9 and started again with the same command: the
  members reattach with their SAs (the same IKE and ESP SPIs), the epoch goes
  on upwards, traffic flows, and a new IKE SA is accepted.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_util import (
    DOWN,
    ROOT,
    UP,
    Endpoint,
    EspProxy,
    Proc,
    Procs,
    alive_members,
    cli_argv,
    esp_sas,
    exchange_traffic,
    gateway_toml,
    grid_connections,
    pid_alive,
    sas,
    status,
    tail,
    wait_for,
    wait_status,
)
from tests.lab.netns import Lab, Veth

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GW, PEER = "198.18.40.2", "198.18.40.1"
SYNC_PORT = 32590
GW_PORTS = (32500, 32501)
PEER_PORTS = (32600, 32601)
PEER2_PORTS = (32602, 32603)
PROXY_PORT = 32550
INSIDE, INSIDE_BIND = ("127.0.0.1", 32510), ("127.0.0.1", 32511)
N_IKE, N_CHILD = 4, 2
HOSTS = {"host1": ("198.18.41.1/24", "198.18.41.2/24", (1, 2)),
         "host2": ("198.18.42.1/24", "198.18.42.2/24", (3,))}
#: a member is declared dead after 4 x 50 ms without a heartbeat (the issue's
#: "a link loss of 0.2 s or more")
TIMING = {"heartbeat_interval": 0.05, "dead_after": 4}
#: how long a member may take to be back as a live backup
BACK_S = 10.0
#: the stand-in for systemd's Restart=always with RestartPreventExitStatus=2 3
RESTART_LOOP = ('while :; do "$@"; rc=$?; echo "restart loop: exit status $rc"; '
                'case $rc in 2|3) exit $rc;; esac; sleep 0.3; done')


def keygen(keys: Path, name: str) -> None:
    subprocess.run(cli_argv("keygen", "--dir", str(keys), "--name", name), check=True,
                   capture_output=True, cwd=ROOT, timeout=30)


@dataclass
class Rig:
    lab: Lab
    tmp: Path
    procs: Procs
    ns_d: str
    ns_p: str
    host_ns: dict[str, str]
    links: dict[str, Veth]
    config: Path
    disp: Proc
    conns: list[Any]
    loops: dict[int, Proc] = field(default_factory=dict)
    endpoints: list[Endpoint] = field(default_factory=list)
    proxy: EspProxy | None = None
    peer: Proc | None = None

    def diag(self, *names: str) -> str:
        out = tail(self.disp.log_path)
        for name in names:
            out += tail(self.tmp / f"{name}.log")
        return out

    def member_config(self, member_id: int, **extra: Any) -> Path:
        path = self.tmp / f"member{member_id}-{len(list(self.tmp.glob('member*.toml')))}.toml"
        path.write_text(gateway_toml(
            address=GW, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
            conns=self.conns,
            extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}", **TIMING,
                   "curve_secret_key": f"keys/member{member_id}.key_secret",
                   "curve_server_key": "keys/dispatcher.key", **extra}))
        return path

    def member_argv(self, member_id: int, **extra: Any) -> list[str]:
        host = next(h for h, (_d, _m, ids) in HOSTS.items() if member_id in ids)
        endpoint = f"tcp://{HOSTS[host][0].split('/')[0]}:{SYNC_PORT}"
        return cli_argv("member", "--config", str(self.member_config(member_id, **extra)),
                        "--id", str(member_id), "--connect", endpoint)

    def start_loop(self, member_id: int, name: str) -> Proc:
        """Member ``member_id`` under the restart loop (its log: ``name``.log)."""
        host = next(h for h, (_d, _m, ids) in HOSTS.items() if member_id in ids)
        argv = ["bash", "-c", RESTART_LOOP, "loop", *self.member_argv(member_id)]
        return self.procs.start(name, argv, ns=self.host_ns[host])

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = status(self.config)["dispatcher"]["counters"]
        return counters

    def member(self, member_id: int) -> dict[str, Any]:
        return next(m for m in status(self.config)["members"] if m["id"] == member_id)

    def snapshot(self) -> tuple[set[tuple[str, str]], set[str]]:
        """The IKE SAs (SPIi, SPIr) and the inbound ESP SPIs the cluster holds."""
        answer = sas(self.config)
        ike = {(sa["spi_i"], sa["spi_r"]) for m in answer["members"]
               for sa in m.get("ike_sas", [])}
        return ike, {e["spi_in"] for e in esp_sas(answer)}

    def no_sa_lost(self, ike0: set[tuple[str, str]]) -> None:
        """The same IKE SAs and every child (a child a takeover rekeyed has new
        SPIs: replay_after_failover = "rekey")."""
        wait_for("the same IKE SAs and every child", lambda: (
            lambda snap: snap[0] == ike0 and len(snap[1]) == N_IKE * N_CHILD)(self.snapshot()),
            timeout=10, diag=lambda: f"{self.snapshot()} vs {ike0}" + self.diag("member3"))

    def traffic(self) -> None:
        """Inner packets through every child, both ways."""
        flows = [ch.host_pair() for conn in self.conns for ch in conn.children]
        gw_ep, peer_ep = self.endpoints
        res = exchange_traffic(flows, peer_ep, gw_ep, per_flow=5)
        every = set(range(len(flows)))
        assert res.bad == 0 and res.misrouted == 0
        assert res.flows_seen(UP) == every and res.flows_seen(DOWN) == every, (
            res, self.diag("peer", "member3"))

    def back(self, member_id: int, old_pid: int, what: str,
             since: float | None = None) -> dict[str, Any]:
        """Member ``member_id`` is alive again in another process than
        ``old_pid`` (0: any), a backup of some segments, and no member is left
        without a live backup."""
        def check(s: dict[str, Any]) -> bool:
            m = next((m for m in s["members"] if m["id"] == member_id), None)
            return (m is not None and m["alive"] and (m["pid"] != old_pid or not old_pid)
                    and m["backup_segments"] > 0
                    and not any(x["replication"].get("degraded") for x in alive_members(s))
                    and len(alive_members(s)) == 3)
        t0 = time.monotonic() if since is None else since
        st = wait_status(self.config, what, check, timeout=BACK_S - (time.monotonic() - t0),
                         diag=lambda: self.diag(f"member{member_id}"))
        print(f"{what}: back in {time.monotonic() - t0:.2f} s")
        return next(m for m in st["members"] if m["id"] == member_id)


def build(lab: Lab, tmp_path: Path, procs: Procs) -> Rig:
    ns_d, ns_p = lab.netns(), lab.netns()
    lab.veth(ns_p, ns_d, f"{PEER}/24", f"{GW}/24")
    host_ns, links = {}, {}
    for host, (addr_d, addr_m, _ids) in HOSTS.items():
        host_ns[host] = lab.netns()
        links[host] = lab.veth(ns_d, host_ns[host], addr_d, addr_m)
    keys = tmp_path / "keys"
    for name in ("dispatcher", "member1", "member2", "member3"):
        keygen(keys, name)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for name in ("member1", "member2", "member3"):
        (authorized / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    conns = grid_connections(N_IKE, N_CHILD)
    config = tmp_path / "dispatcher.toml"
    config.write_text(gateway_toml(
        address=GW, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
        inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", members=0, conns=conns,
        extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}", "expect_members": 3, **TIMING,
               "curve_secret_key": "keys/dispatcher.key_secret",
               "curve_authorized": "authorized"}))
    disp = procs.start("dispatcher", cli_argv("run", "--config", str(config)), ns=ns_d)
    disp.wait_ready(timeout=15)
    rig = Rig(lab, tmp_path, procs, ns_d, ns_p, host_ns, links, config, disp, conns)
    for _d, _m, ids in HOSTS.values():
        for member_id in ids:
            rig.loops[member_id] = rig.start_loop(member_id, f"member{member_id}")
    wait_status(config, "3 members with segments", lambda s: len(alive_members(s)) == 3
                and all(m["segments"] and m["backup_segments"] for m in s["members"]),
                timeout=30, diag=lambda: rig.diag("member1", "member3"))
    rig.proxy = EspProxy((PEER, PROXY_PORT), (GW, GW_PORTS[0]), ns=ns_p)
    rig.endpoints = [Endpoint(INSIDE, INSIDE_BIND, ns=ns_d), Endpoint(INSIDE, INSIDE_BIND, ns=ns_p)]
    peer_cfg = tmp_path / "peer.toml"
    peer_cfg.write_text(gateway_toml(
        address=PEER, ports=PEER_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
        inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", conns=conns,
        remote=(PEER, PROXY_PORT)))
    rig.peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)), ns=ns_p)
    wait_for("all children up", lambda: sum(
        m["child_sas"] for m in status(config)["members"]) == N_IKE * N_CHILD,
        timeout=30, diag=lambda: rig.diag("peer"))
    # every member carries children (member 3 too: what it carries must survive)
    wait_for("children replicated", lambda: all(
        not m["replication"].get("degraded") for m in status(config)["members"]), timeout=10)
    rig.traffic()
    return rig


def close(rig: Rig | None, procs: Procs) -> None:
    if rig is not None:
        for ep in rig.endpoints:
            ep.close()
        if rig.proxy is not None:
            rig.proxy.close()
    procs.close()


def link(rig: Rig, host: str, up: bool) -> None:
    veth = rig.links[host]
    rig.lab.run(veth.ns_b, ["ip", "link", "set", veth.dev_b, "up" if up else "down"])


def test_remote_members_come_back_after_link_loss_kill_and_replacement(
        lab: Lab, tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    rig = None
    try:
        rig = build(lab, tmp_path, procs)
        ike0, esp0 = rig.snapshot()
        assert len(ike0) == N_IKE and len(esp0) == N_IKE * N_CHILD

        first = rig.member(3)
        for down_s in (0.3, 5.0):
            link(rig, "host2", up=False)
            time.sleep(down_s)
            link(rig, "host2", up=True)
            t0 = time.monotonic()
            # (after 0.3 s it may or may not have been declared dead: either way)
            time.sleep(0.5)
            m3 = rig.back(3, 0, f"member 3 after its link was down {down_s} s", t0)
            rig.no_sa_lost(ike0)
            rig.traffic()
            assert m3["sender_id"] != 0
        # the old incarnation was told it was declared dead and ended itself:
        # member 3 runs as another process with another sender id
        after = rig.member(3)
        assert rig.counters().get("notice_dead", 0) >= 1, rig.counters()
        assert (after["pid"], after["sender_id"]) != (first["pid"], first["sender_id"])
        # the new one gets its share of segments back (autobalance)
        wait_status(rig.config, "member 3 owns its share again", lambda s: next(
            m for m in s["members"] if m["id"] == 3)["segments"] >= 256 // 3 - 1, timeout=20,
            diag=lambda: rig.diag("member3"))

        # kill -9: the restart loop starts it again
        pid = rig.member(3)["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rig.back(3, pid, "member 3 after kill -9", t0)
        rig.no_sa_lost(ike0)
        rig.traffic()

        # a replacement while the old one lingers (hung): the old one is
        # declared dead, the replacement joins; the old one, woken, is told
        # it was replaced and stops for good (exit status 3: not restarted)
        old = rig.member(3)
        os.kill(old["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        replacement = rig.start_loop(3, "member3-replacement")
        m3 = rig.back(3, old["pid"], "the replacement of member 3", t0)
        assert m3["sender_id"] != old["sender_id"]
        os.kill(old["pid"], signal.SIGCONT)
        assert rig.loops[3].wait(10) == 3, tail(tmp_path / "member3.log")
        assert rig.counters().get("notice_replaced", 0) >= 1, rig.counters()
        time.sleep(1.0)
        st = status(rig.config)
        assert next(m for m in st["members"] if m["id"] == 3)["pid"] == m3["pid"]
        assert replacement.alive()
        rig.no_sa_lost(ike0)
        rig.traffic()

        # a second process with member 3's key while the first is healthy: it
        # does not displace it (a stolen key could not either), it waits; once
        # the first is killed for good (its loop too), the waiting one joins
        second = rig.start_loop(3, "member3-second")
        wait_status(rig.config, "the second one refused while member 3 is alive",
                    lambda s: s["dispatcher"]["drops"].get("refused_hello_member_alive", 0) > 0,
                    timeout=10)
        assert rig.member(3)["pid"] == m3["pid"]
        t0 = time.monotonic()
        replacement.signal_group(signal.SIGKILL)
        m3 = rig.back(3, m3["pid"], "the waiting second process of member 3", t0)
        assert second.alive()
        rig.no_sa_lost(ike0)

        # timing keys other than the dispatcher's: refused at join, exit 2
        wrong = procs.start("member3-wrong", rig.member_argv(3, heartbeat_interval=0.1),
                            ns=rig.host_ns["host2"])
        assert wrong.wait(20) == 2, wrong.tail()
        assert rig.counters().get("notice_refused", 0) >= 1
        assert rig.member(3)["pid"] == m3["pid"] and second.alive()
    finally:
        close(rig, procs)


def test_a_member_with_other_timing_keys_exits_2_with_one_line(
        lab: Lab, tmp_path: Path) -> None:
    """Refused at join, not declared dead at once: the member's one line names
    the key and both values (a message to the operator; the process exits)."""
    procs = Procs(tmp_path)
    try:
        ns_d, ns_m = lab.netns(), lab.netns()
        lab.veth(ns_d, ns_m, HOSTS["host2"][0], HOSTS["host2"][1])
        keys = tmp_path / "keys"
        for name in ("dispatcher", "member3"):
            keygen(keys, name)
        authorized = tmp_path / "authorized"
        authorized.mkdir()
        (authorized / "member3.key").write_bytes((keys / "member3.key").read_bytes())
        conns = grid_connections(1, 1)
        config = tmp_path / "dispatcher.toml"
        config.write_text(gateway_toml(
            address=GW, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
            inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", members=0, conns=conns,
            extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}", "expect_members": 1, **TIMING,
                   "curve_secret_key": "keys/dispatcher.key_secret",
                   "curve_authorized": "authorized"}))
        lab.run(ns_d, ["ip", "addr", "add", f"{GW}/32", "dev", "lo"])
        disp = procs.start("dispatcher", cli_argv("run", "--config", str(config)), ns=ns_d)
        disp.wait_ready(timeout=15)
        member = tmp_path / "member3.toml"
        member.write_text(gateway_toml(
            address=GW, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}", conns=conns,
            extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}", **TIMING, "heartbeat_interval": 0.1,
                   "curve_secret_key": "keys/member3.key_secret",
                   "curve_server_key": "keys/dispatcher.key"}))
        wrong = procs.start("member3", cli_argv(
            "member", "--config", str(member), "--id", "3",
            "--connect", f"tcp://{HOSTS['host2'][0].split('/')[0]}:{SYNC_PORT}"), ns=ns_m)
        assert wrong.wait(20) == 2, wrong.tail() + disp.tail()
        lines = [ln for ln in wrong.log_text().splitlines() if "refused" in ln]
        assert len(lines) == 1, wrong.tail()
        assert "member 3: refused by the dispatcher: cluster.heartbeat_interval is 0.1 at " \
               "member 3 but 0.05 at the dispatcher" in lines[0], lines
        st = status(config)
        assert st["dispatcher"]["drops"].get("refused_hello_timing", 0) >= 1
        assert not alive_members(st)
    finally:
        procs.close()


def test_members_reattach_to_a_restarted_dispatcher_with_their_sas(
        lab: Lab, tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    rig = None
    try:
        rig = build(lab, tmp_path, procs)
        ike0, esp0 = rig.snapshot()
        st0 = status(rig.config)
        epoch0 = st0["cluster"]["epoch"]
        ids0 = {m["id"]: (m["pid"], m["sender_id"]) for m in st0["members"]}
        argv = cli_argv("run", "--config", str(rig.config))
        os.kill(rig.disp.pid, signal.SIGKILL)
        rig.disp.wait(10)
        time.sleep(0.5)
        t0 = time.monotonic()
        rig.disp = procs.start("dispatcher-again", argv, ns=rig.ns_d)
        st = wait_status(rig.config, "the members reattached",
                         lambda s: len(alive_members(s)) == 3
                         and s["cluster"]["epoch"] > epoch0,
                         timeout=20, diag=lambda: rig.diag("dispatcher", "member1"))
        print(f"members reattached {time.monotonic() - t0:.2f} s after the restart")
        # the same processes, the same sender ids, a higher epoch
        assert {m["id"]: (m["pid"], m["sender_id"]) for m in st["members"]} == ids0
        wait_for("every child claimed again", lambda: rig.snapshot() == (ike0, esp0),
                 timeout=10, diag=lambda: rig.diag("dispatcher-again"))
        rig.traffic()
        assert all(pid_alive(pid) for pid, _sid in ids0.values())
        # every child was claimed again (the new dispatcher never saw the pushes)
        assert rig.counters().get("children_claimed", 0) >= N_IKE * N_CHILD
        # a new IKE SA is accepted
        peer2 = tmp_path / "peer2.toml"
        peer2.write_text(gateway_toml(
            address=PEER, ports=PEER2_PORTS, inside="udp:127.0.0.1:32520",
            inside_bind="127.0.0.1:32521", conns=rig.conns[:1], remote=(GW, GW_PORTS[0])))
        new = procs.start("peer2", cli_argv(
            "peer", "--config", str(peer2), "--ike-sas", "1", "--exit-when-up",
            "--initial-contact", "none", "--timeout", "15"), ns=rig.ns_p)
        assert new.wait(30) == 0, new.tail() + rig.disp.tail()
        assert status(rig.config)["cluster"]["epoch"] >= st["cluster"]["epoch"]
        print(shlex.join(argv))
    finally:
        close(rig, procs)
