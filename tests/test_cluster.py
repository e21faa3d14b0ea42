"""The cluster on one host, as processes: ``ipsec-cluster run`` with a
dispatcher and 3 members (ipc://), our ``peer`` with 20 IKE SAs of 3 children
each, and an ESP-recording UDP relay between them (tests/cluster_util.py).

Root-less on loopback: the cluster at 127.0.0.1, the relay at 127.0.0.3, the
peer at 127.0.0.2, all on non-500 ports (every datagram RFC 3948 classified);
both insides are ``udp:`` sockets the test reads and writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.cluster.events import EventType
from tests.cluster_util import (
    DOWN,
    UP,
    Endpoint,
    EspProxy,
    Proc,
    Procs,
    TrafficResult,
    alive_members,
    assert_unique_ivs,
    cli_argv,
    esp_sas,
    exchange_traffic,
    gateway_toml,
    grid_connections,
    pid_alive,
    sas,
    status,
    tail,
    wait_assigned,
    wait_for,
    wait_status,
)

BASE = 31000
GW, PEER, PROXY = "127.0.0.1", "127.0.0.2", "127.0.0.3"
GW_PORTS = (BASE, BASE + 1)
GW_INSIDE, GW_BIND = (GW, BASE + 10), (GW, BASE + 11)
METRICS_PORT = BASE + 20
PROXY_PORT = BASE + 50
PEER_PORTS = (BASE + 100, BASE + 101)
PEER_INSIDE, PEER_BIND = (GW, BASE + 110), (GW, BASE + 111)
N_IKE, N_CHILD, N_MEMBERS = 20, 3, 3
PER_FLOW = 10


@dataclass
class Up:
    config: Path
    dispatcher: Proc
    peer: Proc
    proxy: EspProxy
    traffic: TrafficResult
    status_before: dict[str, Any]
    status: dict[str, Any]
    sas: dict[str, Any]
    flows: list[tuple[str, str]]

    def diag(self) -> str:
        return tail(self.dispatcher.log_path) + "\n" + tail(self.peer.log_path)


def start_cluster(procs: Procs, workdir: Path, *, members: int = N_MEMBERS,
                  ports: tuple[int, int] = GW_PORTS,
                  inside: tuple[tuple[str, int], tuple[str, int]] = (GW_INSIDE, GW_BIND),
                  metrics_port: int = 0, n_ike: int = N_IKE,
                  n_child: int = N_CHILD) -> tuple[Path, Proc]:
    """``ipsec-cluster run`` with ``members`` members; returns once all have
    joined and the segment table is out."""
    config = workdir / "cluster.toml"
    extra = {"metrics_port": metrics_port} if metrics_port else {}
    config.write_text(gateway_toml(
        address=GW, ports=ports, inside=f"udp:{inside[0][0]}:{inside[0][1]}",
        inside_bind=f"{inside[1][0]}:{inside[1][1]}", members=members,
        conns=grid_connections(n_ike, n_child), extra=extra))
    proc = procs.start("cluster", cli_argv("run", "--config", str(config)))
    wait_assigned(proc, members, timeout=15)
    wait_for(f"{members} members alive", lambda: len(alive_members(status(config))) == members
             and all(m["segments"] for m in status(config)["members"]),
             timeout=15, diag=lambda: tail(proc.log_path))
    return config, proc


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    workdir = tmp_path_factory.mktemp("cluster")
    procs = Procs(workdir)
    proxy: EspProxy | None = None
    endpoints: list[Endpoint] = []
    try:
        config, disp = start_cluster(procs, workdir, metrics_port=METRICS_PORT)
        proxy = EspProxy((PROXY, PROXY_PORT), (GW, GW_PORTS[0]))
        gw_ep = Endpoint(GW_INSIDE, GW_BIND)
        peer_ep = Endpoint(PEER_INSIDE, PEER_BIND)
        endpoints += [gw_ep, peer_ep]
        conns = grid_connections(N_IKE, N_CHILD)
        peer_cfg = workdir / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=PEER, ports=PEER_PORTS, inside=f"udp:{PEER_INSIDE[0]}:{PEER_INSIDE[1]}",
            inside_bind=f"{PEER_BIND[0]}:{PEER_BIND[1]}", conns=conns,
            remote=(PROXY, PROXY_PORT)))
        peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)))

        def children_up() -> dict[str, Any] | None:
            st = status(config)
            ok = (sum(m["child_sas"] for m in st["members"]) == N_IKE * N_CHILD
                  and sum(m["ike_sas"] for m in st["members"]) == N_IKE)
            return st if ok else None

        before = wait_for("60 children up", children_up, timeout=40,
                          diag=lambda: tail(disp.log_path) + tail(peer.log_path))
        flows = [ch.host_pair() for conn in conns for ch in conn.children]
        res = exchange_traffic(flows, peer_ep, gw_ep, per_flow=PER_FLOW)
        time.sleep(0.3)  # heartbeats carry the members' counters
        # the ipsec-cluster commands themselves, as a user runs them
        yield Up(config, disp, peer, proxy, res, before, status(config, cli=True),
                 sas(config, cli=True), flows)
    finally:
        for ep in endpoints:
            ep.close()
        procs.close()
        if proxy is not None:
            proxy.close()


def test_all_children_are_up_and_spread_over_the_members(up: Up) -> None:
    ike = [s for m in up.sas["members"] for s in m["ike_sas"]]
    assert len(ike) == N_IKE and all(s["state"] == "ESTABLISHED" for s in ike)
    assert sorted(s["remote_id"] for s in ike) == sorted(f"peer{k}.test" for k in range(N_IKE))
    children = [c for s in ike for c in s["children"]]
    assert len(children) == N_IKE * N_CHILD
    assert all(c["state"] == "INSTALLED" for c in children), children
    esp = esp_sas(up.sas)
    assert len(esp) == N_IKE * N_CHILD
    # each child is carried where its IKE SA says it is
    carried = {e["spi_in"]: e["member"] for e in esp}
    assert {c["spi_in"]: c["member"] for c in children} == carried
    per_member = Counter(carried.values())
    assert set(per_member) == {1, 2, 3}, per_member
    # the IKE SA owner places children on the least-loaded member; members learn
    # each other's loads from heartbeats, so concurrent placements may skew a bit
    fair = N_IKE * N_CHILD // N_MEMBERS
    assert min(per_member.values()) >= fair // 2, per_member


def test_traffic_passes_every_child_both_ways(up: Up) -> None:
    res = up.traffic
    n = len(up.flows)
    assert res.bad == 0 and res.misrouted == 0
    every = set(range(n))
    assert res.flows_seen(UP) == every, f"peer -> cluster missing {every - res.flows_seen(UP)}"
    assert res.flows_seen(DOWN) == every, f"cluster -> peer missing {every - res.flows_seen(DOWN)}"
    for direction in (UP, DOWN):
        sent = res.total(direction, "sent")
        assert sent == n * PER_FLOW
        # loopback: nothing should get lost; allow a little for a loaded machine
        assert res.total(direction) >= 0.95 * sent, (direction, res.total(direction), sent)
    # every ESP packet the peer sent went through the relay and was counted
    esp_in = sum(m["packets_in"] for m in up.status["members"])
    esp_out = sum(m["packets_out"] for m in up.status["members"])
    assert esp_in >= res.total(UP) and esp_out >= res.total(DOWN)
    assert len(up.proxy.to_cluster) >= esp_in and len(up.proxy.to_peer) >= esp_out


def test_every_member_carried_traffic(up: Up) -> None:
    for m in up.status["members"]:
        assert m["packets_in"] > 0 and m["packets_out"] > 0, m
        assert m["bytes_in"] > 0 and m["bytes_out"] > 0, m
    per_sa = Counter[int]()
    for e in esp_sas(up.sas):
        assert e["packets_in"] > 0 and e["packets_out"] > 0, e
        per_sa[e["member"]] += e["packets_in"]
    assert set(per_sa) == {1, 2, 3}


def test_no_spi_is_allocated_twice(up: Up) -> None:
    esp = esp_sas(up.sas)
    spis_in = [int(e["spi_in"], 16) for e in esp]
    spis_out = [int(e["spi_out"], 16) for e in esp]
    everything = spis_in + spis_out
    assert len(set(spis_in)) == len(spis_in) == N_IKE * N_CHILD
    assert len(set(everything)) == len(everything) == 2 * N_IKE * N_CHILD
    assert all(s >= 256 for s in everything)   # RFC 4303 §2.1: 1..255 reserved
    ike = [s for m in up.sas["members"] for s in m["ike_sas"]]
    ike_spis = [s["spi_r"] for s in ike] + [s["spi_i"] for s in ike]
    assert len(set(ike_spis)) == len(ike_spis)
    # what the relay saw is exactly the negotiated SPIs, each way
    assert {r.spi for r in up.proxy.to_cluster} == set(spis_in)
    assert {r.spi for r in up.proxy.to_peer} == set(spis_out)


def test_no_iv_repeats_in_either_direction(up: Up) -> None:
    to_cluster, to_peer = up.proxy.to_cluster, up.proxy.to_peer
    assert len(to_cluster) >= up.traffic.total(UP) > 0
    assert len(to_peer) >= up.traffic.total(DOWN) > 0
    assert_unique_ivs(to_cluster, "peer -> cluster")
    assert_unique_ivs(to_peer, "cluster -> peer")
    # the cluster's IVs are sender id || counter (RFC 6027 §3.7.1): the sender
    # ids in the IVs are the members' incarnation ids
    sender_ids = {int.from_bytes(r.iv[:2], "big") for r in to_peer}
    assert sender_ids <= {m["sender_id"] for m in up.status["members"]}
    assert len(sender_ids) == N_MEMBERS


def test_status_json_is_complete_and_sane(up: Up) -> None:
    st = up.status
    c = st["cluster"]
    assert c["address"] == GW and c["mode"] == "load-sharing" and c["epoch"] >= 1
    assert c["uptime_s"] > 0 and c["endpoint"].startswith("ipc://")
    d = st["dispatcher"]
    # the dispatcher is a process of its own, child of the supervisor (`run`)
    assert d["supervisor_pid"] == up.dispatcher.pid and d["pid"] != up.dispatcher.pid
    assert d["inside_routes"] == N_IKE * N_CHILD
    # the kernel data path: the dispatcher saw the first IKE_SA_INITs only;
    # the members received and sent every ESP packet themselves
    assert d["data_path"] == "kernel" and d["data_path_off"] == ""
    assert d["counters"]["udp_in"] >= N_IKE
    assert d["esp_relayed"] == 0 and "udp_out" not in d["counters"]
    assert d["counters"]["inner_out"] >= up.traffic.total(UP)
    assert isinstance(d["drops"], dict)
    members = st["members"]
    assert [m["id"] for m in members] == [1, 2, 3]
    assert sum(m["segments"] for m in members) == 256
    assert len({m["sender_id"] for m in members}) == 3
    assert len({m["pid"] for m in members}) == 3
    for m in members:
        assert m["alive"] is True and m["pid"] > 0 and m["host"]
        assert 0 <= m["last_heartbeat_ms"] < 2000
        assert m["sync_gaps"] == 0
        assert isinstance(m["drops"], dict)
        assert not any(k.startswith("esp_") for k in m["drops"] if m["drops"][k]), m["drops"]
    assert sum(m["ike_sas"] for m in members) == N_IKE
    assert sum(m["child_sas"] for m in members) == N_IKE * N_CHILD


def test_prometheus_metrics(up: Up) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics",
                                  timeout=5).read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("ipsec_cluster_child_sas{")]
    assert len(lines) == N_MEMBERS, text
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) == N_IKE * N_CHILD
    for name in ("ipsec_cluster_member_alive", "ipsec_cluster_ike_sas",
                 "ipsec_cluster_esp_packets_in_total", "ipsec_cluster_table_epoch"):
        assert name in text, name


def test_sigterm_to_the_dispatcher_stops_every_member(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        config, disp = start_cluster(procs, tmp_path, ports=(BASE + 200, BASE + 201),
                                     inside=((GW, BASE + 210), (GW, BASE + 211)), n_ike=1)
        member_pids = [m["pid"] for m in status(config)["members"]]
        assert len(member_pids) == N_MEMBERS and all(pid_alive(p) for p in member_pids)
        disp.proc.send_signal(signal.SIGTERM)
        assert disp.proc.wait(10) == 0, tail(disp.log_path)
        wait_for("members gone", lambda: not any(pid_alive(p) for p in member_pids),
                 timeout=5, interval=0.05)
        assert "all members stopped" in disp.log_text()
    finally:
        procs.close()


def test_a_stalled_member_is_declared_dead_and_rejoins_as_a_new_incarnation(
        tmp_path: Path) -> None:
    """SIGSTOP a member past dead_after: its segments move on, the supervisor
    ends that incarnation (a stalled member's output would be a second sender
    for SAs that have a new owner) and starts it again, so it rejoins with a
    new pid and IV sender id."""
    procs = Procs(tmp_path)
    try:
        config, disp = start_cluster(procs, tmp_path, ports=(BASE + 300, BASE + 301),
                                     inside=((GW, BASE + 310), (GW, BASE + 311)), n_ike=1)
        before = {m["id"]: m for m in status(config)["members"]}
        stalled = before[2]
        os.kill(stalled["pid"], signal.SIGSTOP)
        try:
            wait_status(config, "member 2 declared dead",
                        lambda s: not s["members"][1]["alive"], timeout=10)
        finally:
            # (the supervisor may already have ended the stalled incarnation)
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled["pid"], signal.SIGCONT)
        st = wait_status(config, "member 2 back as a new incarnation", lambda s: (
            len(alive_members(s)) == N_MEMBERS and s["members"][1]["pid"] != stalled["pid"]),
            timeout=10, diag=lambda: tail(disp.log_path))
        assert not pid_alive(stalled["pid"])
        assert st["members"][1]["sender_id"] not in {m["sender_id"] for m in before.values()}
        assert [e for e in disp.events() if e.type is EventType.MEMBER_DEAD and e.member == 2]
        # (the log's own manners: the stale incarnation's return is logged once, not
        # once per heartbeat)
        assert disp.log_text().count("is back after being declared dead") <= 1
    finally:
        procs.close()
