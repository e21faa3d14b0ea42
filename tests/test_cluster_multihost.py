"""The cluster across "hosts" (network namespaces joined by veth pairs): the
dispatcher in one namespace, members 1 and 2 in a second, member 3 in a third,
all over ``tcp://`` with ZeroMQ CURVE (keys from ``ipsec-cluster keygen``); our
peer and the ESP-recording relay in a fourth namespace. The same traffic checks
as tests/test_cluster.py, and a member whose key is not authorized is refused.

    peer ns 198.18.0.1 ── 198.18.0.2 dispatcher ns 198.18.1.1 ── 198.18.1.2 host1 (m1, m2)
                                                   198.18.2.1 ── 198.18.2.2 host2 (m3, rogue)
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster_util import (
    DOWN,
    ROOT,
    UP,
    Endpoint,
    EspProxy,
    Procs,
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
    wait_for,
    wait_status,
)
from tests.lab.netns import Lab

pytestmark = pytest.mark.netns

GW, PEER = "198.18.0.2", "198.18.0.1"
SYNC_PORT = 31590
GW_PORTS = (31500, 31501)
PEER_PORTS = (31600, 31601)
PROXY_PORT = 31550
INSIDE, INSIDE_BIND = ("127.0.0.1", 31510), ("127.0.0.1", 31511)
N_IKE, N_CHILD = 8, 3
PER_FLOW = 10
HOSTS = {"host1": ("198.18.1.1/24", "198.18.1.2/24", (1, 2)),
         "host2": ("198.18.2.1/24", "198.18.2.2/24", (3,))}


def keygen(keys: Path, name: str) -> None:
    subprocess.run(cli_argv("keygen", "--dir", str(keys), "--name", name), check=True,
                   capture_output=True, cwd=ROOT, timeout=30)


def test_members_on_other_hosts_over_curve(lab: Lab, tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    endpoints: list[Endpoint] = []
    proxy: EspProxy | None = None
    try:
        ns_d = lab.netns()
        ns_p = lab.netns()
        lab.veth(ns_p, ns_d, f"{PEER}/24", f"{GW}/24")
        host_ns = {}
        for host, (addr_d, addr_m, _ids) in HOSTS.items():
            host_ns[host] = lab.netns()
            lab.veth(ns_d, host_ns[host], addr_d, addr_m)

        keys = tmp_path / "keys"
        # one key pair per member, authorized for its member id (memberN.key)
        for name in ("dispatcher", "member1", "member2", "member3", "rogue"):
            keygen(keys, name)
        authorized = tmp_path / "authorized"
        authorized.mkdir()
        for name in ("member1", "member2", "member3"):   # not "rogue"
            (authorized / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())

        conns = grid_connections(N_IKE, N_CHILD)
        config = tmp_path / "dispatcher.toml"
        config.write_text(gateway_toml(
            address=GW, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
            inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", members=0, conns=conns,
            extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}", "expect_members": 3,
                   "curve_secret_key": "keys/dispatcher.key_secret",
                   "curve_authorized": "authorized"}))
        disp = procs.start("dispatcher", cli_argv("run", "--config", str(config)), ns=ns_d)
        disp.wait_ready(timeout=15)

        def member_config(key: str) -> Path:
            path = tmp_path / f"member-{key}.toml"
            path.write_text(gateway_toml(
                address=GW, ports=GW_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}", conns=conns,
                extra={"sync": f"tcp://0.0.0.0:{SYNC_PORT}",
                       "curve_secret_key": f"keys/{key}.key_secret",
                       "curve_server_key": "keys/dispatcher.key"}))
            return path

        for host, (addr_d, _addr_m, ids) in HOSTS.items():
            endpoint = f"tcp://{addr_d.split('/')[0]}:{SYNC_PORT}"
            for member_id in ids:
                procs.start(f"member{member_id}", cli_argv(
                    "member", "--config", str(member_config(f"member{member_id}")),
                    "--id", str(member_id),
                    "--connect", endpoint), ns=host_ns[host])
        rogue = procs.start("rogue", cli_argv(
            "member", "--config", str(member_config("rogue")), "--id", "4",
            "--connect", f"tcp://198.18.2.1:{SYNC_PORT}"), ns=host_ns["host2"])

        st = wait_status(config, "3 members joined over CURVE",
                         lambda s: len(alive_members(s)) == 3, timeout=20,
                         diag=lambda: tail(disp.log_path) + tail(tmp_path / "member1.log"))
        assert sum(m["segments"] for m in st["members"]) == 256
        assert st["cluster"]["endpoint"] == f"tcp://0.0.0.0:{SYNC_PORT}"

        # the rogue key is refused: counted, logged at WARNING, never a member
        wait_status(config, "the refusal counted",
                    lambda s: s["dispatcher"]["drops"].get("member_refused", 0) > 0,
                    timeout=10, diag=lambda: tail(disp.log_path))
        # (the log line itself: its logger and level)
        refusal = [ln for ln in disp.log_text().splitlines() if "refused" in ln]
        assert refusal and "ipsec_cluster.zap" in refusal[0] and "WARNING" in refusal[0], \
            refusal
        assert rogue.alive()

        proxy = EspProxy((PEER, PROXY_PORT), (GW, GW_PORTS[0]), ns=ns_p)
        gw_ep = Endpoint(INSIDE, INSIDE_BIND, ns=ns_d)
        peer_ep = Endpoint(INSIDE, INSIDE_BIND, ns=ns_p)
        endpoints += [gw_ep, peer_ep]
        peer_cfg = tmp_path / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=PEER, ports=PEER_PORTS, inside=f"udp:{INSIDE[0]}:{INSIDE[1]}",
            inside_bind=f"{INSIDE_BIND[0]}:{INSIDE_BIND[1]}", conns=conns,
            remote=(PEER, PROXY_PORT)))
        peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)), ns=ns_p)
        wait_for("all children up", lambda: sum(
            m["child_sas"] for m in status(config)["members"]) == N_IKE * N_CHILD,
            timeout=30, diag=lambda: tail(disp.log_path) + tail(peer.log_path))

        flows = [ch.host_pair() for conn in conns for ch in conn.children]
        res = exchange_traffic(flows, peer_ep, gw_ep, per_flow=PER_FLOW)
        every = set(range(len(flows)))
        assert res.bad == 0 and res.misrouted == 0
        assert res.flows_seen(UP) == every and res.flows_seen(DOWN) == every, (
            tail(disp.log_path) + tail(peer.log_path))
        for d in (UP, DOWN):
            assert res.total(d) >= 0.95 * res.total(d, "sent"), (d, res)

        time.sleep(0.3)
        st = status(config, cli=True)
        answer = sas(config, cli=True)
        assert [m["id"] for m in st["members"]] == [1, 2, 3]     # never the rogue 4
        assert [m["member"] for m in answer["members"]] == [1, 2, 3]
        for m in st["members"]:
            assert m["alive"] and m["packets_in"] > 0 and m["packets_out"] > 0, m
            assert m["sync_gaps"] == 0
        assert st["dispatcher"]["drops"].get("member_refused", 0) >= 1
        # members on other hosts: the relay carries every ESP packet both ways
        assert st["dispatcher"]["data_path"] == "relay"
        assert st["dispatcher"]["esp_relayed"] >= res.total(UP) + res.total(DOWN)
        esp = esp_sas(answer)
        assert len(esp) == N_IKE * N_CHILD
        assert set(Counter(e["member"] for e in esp)) == {1, 2, 3}
        spis = [int(e["spi_in"], 16) for e in esp] + [int(e["spi_out"], 16) for e in esp]
        assert len(set(spis)) == len(spis)
        assert {r.spi for r in proxy.to_cluster} == {int(e["spi_in"], 16) for e in esp}
        assert len(proxy.to_cluster) >= res.total(UP) and len(proxy.to_peer) >= res.total(DOWN)
        assert_unique_ivs(proxy.to_cluster, "peer -> cluster")
        assert_unique_ivs(proxy.to_peer, "cluster -> peer")
        pids = [disp.pid] + [p.pid for p in procs.procs if p.log_path.stem.startswith("member")]
        assert all(pid_alive(p) for p in pids)
    finally:
        for ep in endpoints:
            ep.close()
        if proxy is not None:
            proxy.close()
        procs.close()
