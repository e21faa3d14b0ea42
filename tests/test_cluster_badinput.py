"""Bad input against the running cluster (dispatcher + 3 members, ipc://):
garbage, truncated and oversized datagrams at the IKE and NAT-T ports, random
bytes under a real ESP SPI, IKE headers with random SPIs, and junk on the
ZeroMQ members endpoint. Each is a counted drop (``status --json``), no process
dies or restarts, and the established SAs still carry traffic afterwards
(docs/failover.md: bad input gets a counted drop)."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from common.cluster.stats import MemberStats
from common.cluster.wire import Datagram, DatagramOut, Heartbeat, encode
from common.config import load_config
from dispatcher.supervisor import members_endpoint
from tests.cluster_util import (
    DOWN,
    UP,
    Endpoint,
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
    wait_assigned,
    wait_for,
    wait_status,
)

BASE = 31300
GW, PEER, ATTACKER = "127.0.0.1", "127.0.0.2", "127.0.0.4"
GW_PORTS = (BASE, BASE + 1)
GW_INSIDE, GW_BIND = (GW, BASE + 10), (GW, BASE + 11)
PEER_PORTS = (BASE + 100, BASE + 101)
PEER_INSIDE, PEER_BIND = (GW, BASE + 110), (GW, BASE + 111)
N_IKE, N_CHILD, N_MEMBERS = 3, 2, 3
PER_FLOW = 5
IKE_HEADER = struct.Struct("!8s8sBBBBII")  # RFC 7296 §3.1


@dataclass
class Cluster:
    config: Path
    dispatcher: Proc
    peer: Proc
    gw_ep: Endpoint
    peer_ep: Endpoint
    flows: list[tuple[str, str]]
    pids: list[int]

    def status(self) -> dict[str, Any]:
        return status(self.config)

    def diag(self) -> str:
        return tail(self.dispatcher.log_path) + "\n" + tail(self.peer.log_path)

    def traffic_ok(self) -> None:
        res = exchange_traffic(self.flows, self.peer_ep, self.gw_ep, per_flow=PER_FLOW)
        n = set(range(len(self.flows)))
        assert res.bad == 0 and res.misrouted == 0
        assert res.flows_seen(UP) == n and res.flows_seen(DOWN) == n, self.diag()
        for d in (UP, DOWN):
            assert res.total(d) >= 0.9 * res.total(d, "sent"), (d, res)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    procs = Procs(tmp_path)
    endpoints: list[Endpoint] = []
    try:
        conns = grid_connections(N_IKE, N_CHILD)
        config = tmp_path / "cluster.toml"
        config.write_text(gateway_toml(
            address=GW, ports=GW_PORTS, inside=f"udp:{GW_INSIDE[0]}:{GW_INSIDE[1]}",
            inside_bind=f"{GW_BIND[0]}:{GW_BIND[1]}", members=N_MEMBERS, conns=conns))
        disp = procs.start("cluster", cli_argv("run", "--config", str(config)))
        wait_assigned(disp, N_MEMBERS, timeout=15)
        gw_ep, peer_ep = Endpoint(GW_INSIDE, GW_BIND), Endpoint(PEER_INSIDE, PEER_BIND)
        endpoints += [gw_ep, peer_ep]
        peer_cfg = tmp_path / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=PEER, ports=PEER_PORTS, inside=f"udp:{PEER_INSIDE[0]}:{PEER_INSIDE[1]}",
            inside_bind=f"{PEER_BIND[0]}:{PEER_BIND[1]}", conns=conns,
            remote=(GW, GW_PORTS[0])))
        peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)))
        st = wait_status(config, "children up", lambda s: sum(
            m["child_sas"] for m in s["members"]) == N_IKE * N_CHILD,
            timeout=30, diag=lambda: tail(disp.log_path) + tail(peer.log_path))
        assert len(alive_members(st)) == N_MEMBERS
        flows = [ch.host_pair() for conn in conns for ch in conn.children]
        yield Cluster(config, disp, peer, gw_ep, peer_ep, flows,
                      [disp.pid] + [m["pid"] for m in st["members"]])
    finally:
        for ep in endpoints:
            ep.close()
        procs.close()


def member_drops(st: dict[str, Any]) -> dict[str, int]:
    total: dict[str, int] = {}
    for m in st["members"]:
        for k, v in m["drops"].items():
            total[k] = total.get(k, 0) + v
    return total


def _ike_header(spi_i: bytes, spi_r: bytes, exchange: int, flags: int, body: bytes) -> bytes:
    return IKE_HEADER.pack(spi_i, spi_r, 33, 0x20, exchange, flags, 1, 28 + len(body)) + body


def _all_alive(c: Cluster) -> None:
    dead = [p for p in c.pids if not pid_alive(p)]
    assert not dead, f"processes died: {dead}\n{c.diag()}"
    st = c.status()
    assert [m["pid"] for m in st["members"]] == c.pids[1:], "a member was restarted"
    assert len(alive_members(st)) == N_MEMBERS


def test_bad_datagrams_are_counted_drops_and_harm_nothing(cluster: Cluster) -> None:
    rnd = random.Random(7)
    cluster.traffic_ok()
    before = cluster.status()
    d0 = before["dispatcher"]["drops"]
    m0 = member_drops(before)
    real_spis = [int(e["spi_in"], 16) for e in esp_sas(sas(cluster.config))]
    assert len(real_spis) == N_IKE * N_CHILD

    def rbytes(n: int) -> bytes:
        return rnd.randbytes(n)

    def esp_garbage(n: int) -> bytes:
        # a random SPI that is not 0 and not reserved (1..255): routed as ESP
        return struct.pack("!I", rnd.randrange(0x1000, 1 << 32)) + rbytes(n - 4)

    truncated = [b"\x00", b"\x12", b"\x00\x00", b"\x01\x02\x03", bytes(4) + bytes(10),
                 b"\x00\x00\x00\x05" + rbytes(30)]   # SPI 5 is reserved, RFC 4303 §2.1
    garbage = [esp_garbage(rnd.randrange(8, 1400)) for _ in range(40)]
    oversized = [esp_garbage(65000), esp_garbage(65000)]
    fake_esp = [struct.pack("!II", spi, rnd.randrange(1, 1 << 32)) + rbytes(rnd.randrange(8, 300))
                for spi in real_spis for _ in range(5)]
    fake_esp += [struct.pack("!I", real_spis[0]) + rbytes(64996)]
    ike_random = [bytes(4) + _ike_header(rbytes(8), rbytes(8), 37, 0x08, rbytes(60))
                  for _ in range(20)]                                  # unknown SPIs
    ike_random += [bytes(4) + _ike_header(rbytes(8), bytes(8), 34, 0x08, rbytes(80))
                   for _ in range(10)]                                 # junk IKE_SA_INIT
    ike_random += [bytes(4) + rbytes(8) + rbytes(8) + b"\x21\x20\x25\x08" + rbytes(8)
                   for _ in range(5)]                                  # wrong lengths
    batches = (truncated, garbage, oversized, fake_esp, ike_random)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ATTACKER, 0))
    try:
        for port in GW_PORTS:
            for batch in batches:
                for data in batch:
                    sock.sendto(data, (GW, port))
                time.sleep(0.01)
            sock.sendto(b"\xff", (GW, port))   # a NAT-keepalive is no drop
    finally:
        sock.close()
    n_ports = len(GW_PORTS)

    def counted() -> dict[str, Any] | None:
        st = cluster.status()
        d = st["dispatcher"]["drops"]
        m = member_drops(st)

        def grew(src: dict[str, int], base: dict[str, int], *keys: str) -> int:
            return sum(src.get(k, 0) - base.get(k, 0) for k in keys)

        ok = (grew(d, d0, "malformed") >= len(truncated) * n_ports
              and grew(m, m0, "esp_unknown_spi") >= (len(garbage) + len(oversized)) * n_ports
              and grew(m, m0, "esp_integrity", "esp_replay", "esp_malformed")
              >= len(fake_esp) * n_ports
              and grew(m, m0, "ike_unknown_spi", "ike_malformed", "ike_bad_init",
                       "ike_sk_without_keys")
              >= len(ike_random) * n_ports)
        return st if ok else None

    st = wait_for("every bad datagram counted as a drop", counted, timeout=10,
                  diag=lambda: f"{cluster.status()['dispatcher']}\n{member_drops(cluster.status())}"
                  f"\nbefore: {d0} {m0}\n{cluster.diag()}")
    assert st["dispatcher"]["counters"].get("keepalive", 0) >= n_ports
    _all_alive(cluster)
    cluster.traffic_ok()
    # the real SAs' replay windows and keys are untouched: nothing was rekeyed
    after = {int(e["spi_in"], 16) for e in esp_sas(sas(cluster.config))}
    assert after == set(real_spis)


def test_junk_on_the_members_endpoint_is_dropped(cluster: Cluster, tmp_path: Path) -> None:
    config = load_config(cluster.config.read_text(), str(cluster.config))
    endpoint = members_endpoint(config, str(cluster.config))
    assert endpoint.startswith("ipc://")
    d0 = cluster.status()["dispatcher"]["drops"]
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trap.bind((GW, 0))
    trap.settimeout(0.5)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 1000)
    dealer.setsockopt(zmq.IDENTITY, b"intruder")
    try:
        dealer.connect(endpoint)
        dealer.send(b"junk")                                 # not a frame
        dealer.send(b"")                                     # empty
        dealer.send(bytes(range(256)) * 4)                   # random-ish
        dealer.send_multipart([b"two", b"frames"])           # wrong frame count
        # decodes, unknown
        dealer.send(encode(Heartbeat(2, 1, 1, 0, stats=MemberStats(ike_sas=99)), 1))
        # decodes and would make the cluster send UDP: must not, from a stranger
        trap_ip = socket.inet_aton(GW)
        dealer.send(encode(DatagramOut([Datagram(GW_PORTS[1], trap_ip,
                                                 trap.getsockname()[1], b"spoof")]), 2))

        def counted() -> dict[str, int] | None:
            # no CURVE key: the connection never gets past the handshake
            # (tests/test_hostile_member.py: the authenticated cases)
            d = cluster.status()["dispatcher"]["drops"]
            ok = (d.get("member_handshake_failed", 0)
                  - d0.get("member_handshake_failed", 0) >= 1)
            return d if ok else None

        wait_for("junk frames counted", counted, timeout=10,
                 diag=lambda: f"{cluster.status()['dispatcher']}\n{cluster.diag()}")
        with pytest.raises(TimeoutError):
            trap.recvfrom(100)
    finally:
        dealer.close()
        ctx.term()
        trap.close()
    st = cluster.status()
    assert [m["id"] for m in st["members"]] == [1, 2, 3]
    assert sum(m["ike_sas"] for m in st["members"]) == N_IKE   # the fake heartbeat counted nothing
    _all_alive(cluster)
    cluster.traffic_ok()
