"""The data path on one host (docs/routing.md "The data path on one host"):
members started by ``ipsec-cluster run`` receive and send their own ESP and
IKE on sockets of a steered SO_REUSEPORT group, and the dispatcher relays no
ESP at all (tests/test_cluster.py checks ``esp_relayed == 0`` under traffic).
Here the fallbacks, each with real traffic through our peer: the relay when
the configuration asks for it, and when the kernel refuses the steering
program (a network namespace whose ``net.core.optmem_max`` is too small to
hold it: the attach fails with ENOMEM, the real refusal); and a member killed
under traffic on the kernel path, whose socket the dispatcher drains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster_util import (
    DOWN,
    UP,
    Endpoint,
    Procs,
    alive_members,
    cli_argv,
    exchange_traffic,
    gateway_toml,
    grid_connections,
    status,
    tail,
    wait_for,
    wait_status,
)
from tests.lab.netns import Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GW, PEER = "127.0.0.1", "127.0.0.2"
GW_PORTS, PEER_PORTS = (31700, 31701), (31710, 31711)
INSIDE, INSIDE_BIND = ("127.0.0.1", 31720), ("127.0.0.1", 31721)
PEER_INSIDE, PEER_BIND = ("127.0.0.2", 31730), ("127.0.0.2", 31731)
N_IKE, N_CHILD, PER_FLOW = 4, 2, 20


def _run(lab: Lab, tmp_path: Path, *, extra: dict[str, object],
         optmem: int | None = None, kill_member: bool = False) -> dict[str, object]:
    """A 2-member cluster and our peer in a fresh namespace, traffic on every
    child both ways; the status after it."""
    procs = Procs(tmp_path)
    endpoints: list[Endpoint] = []
    try:
        ns = lab.netns()
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{PEER}/8", "dev", "lo"], check=False)
        if optmem is not None:
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                            f"net.core.optmem_max={optmem}"], check=True)
        conns = grid_connections(N_IKE, N_CHILD)
        config = tmp_path / "cluster.toml"
        config.write_text(gateway_toml(
            address=GW, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
            inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", members=2, conns=conns,
            extra=extra))
        disp = procs.start("cluster", cli_argv("run", "--config", str(config)), ns=ns)
        wait_status(config, "2 members with segments",
                    lambda s: len(alive_members(s)) == 2
                    and all(m["segments"] for m in s["members"]),
                    timeout=20, diag=lambda: tail(disp.log_path))
        gw_ep = Endpoint(INSIDE, INSIDE_BIND, ns=ns)
        peer_ep = Endpoint(PEER_INSIDE, PEER_BIND, ns=ns)
        endpoints += [gw_ep, peer_ep]
        peer_cfg = tmp_path / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=PEER, ports=PEER_PORTS, inside=f"udp:{PEER_INSIDE[0]}:{PEER_INSIDE[1]}",
            inside_bind=f"{PEER_BIND[0]}:{PEER_BIND[1]}", conns=conns,
            remote=(GW, GW_PORTS[0])))
        peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)), ns=ns)
        wait_for("all children up", lambda: sum(
            m["child_sas"] for m in status(config)["members"]) == N_IKE * N_CHILD,
            timeout=30, diag=lambda: tail(disp.log_path) + tail(peer.log_path))
        if kill_member:
            victim = next(m for m in status(config)["members"] if m["child_sas"])
            os.kill(victim["pid"], signal.SIGKILL)
            wait_status(config, "the victim's segments taken over",
                        lambda s: not any(m["segments"] and m["id"] == victim["id"]
                                          and m["pid"] == victim["pid"]
                                          for m in s["members"])
                        and sum(m["child_sas"] for m in s["members"] if m["alive"])
                        == N_IKE * N_CHILD,
                        timeout=20, diag=lambda: tail(disp.log_path))
        flows = [ch.host_pair() for conn in conns for ch in conn.children]
        res = exchange_traffic(flows, peer_ep, gw_ep, per_flow=PER_FLOW)
        every = set(range(len(flows)))
        assert res.bad == 0 and res.misrouted == 0
        assert res.flows_seen(UP) == every and res.flows_seen(DOWN) == every, (
            tail(disp.log_path) + tail(peer.log_path))
        for d in (UP, DOWN):
            assert res.total(d) >= 0.95 * res.total(d, "sent"), (d, res)
        time.sleep(0.3)   # the members' heartbeats carry their counters
        st = status(config)
        st["traffic"] = res.total(UP) + res.total(DOWN)
        return st
    finally:
        for ep in endpoints:
            ep.close()
        procs.close()


def test_data_path_relay_in_the_config_relays_every_esp_packet(lab: Lab, tmp_path: Path) -> None:
    st = _run(lab, tmp_path, extra={"data_path": "relay"})
    d = st["dispatcher"]
    assert d["data_path"] == "relay" and d["data_path_off"] == 'data_path = "relay"'
    assert d["esp_relayed"] >= st["traffic"]


def test_a_kernel_that_refuses_the_program_falls_back_to_the_relay(
        lab: Lab, tmp_path: Path) -> None:
    # 64 bytes of option memory: no steering program fits (ENOMEM at attach)
    st = _run(lab, tmp_path, extra={}, optmem=64)
    d = st["dispatcher"]
    assert d["data_path"] == "relay"
    assert "optmem_max" in d["data_path_off"], d["data_path_off"]
    assert d["esp_relayed"] >= st["traffic"]


def test_the_kernel_path_after_a_member_is_killed(lab: Lab, tmp_path: Path) -> None:
    st = _run(lab, tmp_path, extra={}, kill_member=True)
    d = st["dispatcher"]
    assert d["data_path"] == "kernel"
    # the dead member's segments re-pointed to the survivor's socket: the
    # traffic after the takeover never went through the dispatcher
    assert d["esp_relayed"] == 0, d
    assert d["counters"].get("steered", 0) >= 2
