"""Prometheus metrics (dispatcher/metrics.py) scraped from a running gateway,
single-process (members = 1) and cluster (members = 2): counters end in
``_total`` and are TYPE counter, HELP texts say more than the name, IKE/child
SA counts carry a per-connection label, and counters never go down."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cluster_util import (
    DOWN,
    ROOT,
    UP,
    ChildSpec,
    ConnSpec,
    Endpoint,
    Procs,
    cli_argv,
    exchange_traffic,
    gateway_toml,
    tail,
    wait_for,
)

GW, PEER = "127.0.0.1", "127.0.0.2"
BASE = 33000 + (os.getpid() % 200) * 20
CONNS = (ConnSpec("branch", "gw.test", "branch.test",
                  (ChildSpec("net", "10.72.2.0/24", "10.72.1.0/24"),)),
         ConnSpec("depot", "gw.test", "depot.test",
                  (ChildSpec("lan", "10.73.2.0/24", "10.73.1.0/24"),)))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def families(text: str) -> dict[str, dict[str, str]]:
    """name -> {"help": ..., "type": ...} of our families."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = re.match(r"# (HELP|TYPE) (ipsec_cluster_\w+) (.*)", line)
        if m:
            out.setdefault(m[2], {})[m[1].lower()] = m[3]
    return out


def samples(text: str) -> dict[str, float]:
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith("ipsec_cluster_")}


@pytest.mark.slow
@pytest.mark.parametrize("members", [1, 2])
def test_metrics_in_single_and_cluster_mode(tmp_path: Path, members: int) -> None:
    base = BASE + members * 5
    metrics_port = base + 4
    config = tmp_path / "gw.toml"
    config.write_text(gateway_toml(address=GW, ports=(base, base + 1),
                                   inside=f"udp:127.0.0.1:{base + 2}",
                                   inside_bind=f"127.0.0.1:{base + 3}", members=members,
                                   conns=CONNS, extra={"metrics_port": metrics_port}))
    peer_cfg = tmp_path / "peer.toml"
    peer_cfg.write_text(gateway_toml(address=PEER, ports=(base + 100, base + 101),
                                     inside=f"udp:127.0.0.1:{base + 102}",
                                     inside_bind=f"127.0.0.1:{base + 103}", conns=CONNS,
                                     remote=(GW, base)))
    procs = Procs(tmp_path)
    endpoints: list[Endpoint] = []
    try:
        gw = procs.start("gw", cli_argv("run", "--config", str(config)))
        wait_for("metrics served", lambda: _try_scrape(metrics_port), timeout=20,
                 diag=lambda: tail(gw.log_path))
        peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)))

        def both_up() -> str | None:
            text = _try_scrape(metrics_port) or ""
            s = samples(text)
            ike = {k: v for k, v in s.items() if k.startswith("ipsec_cluster_connection_ike_sas")}
            ok = (sum(v for k, v in ike.items() if 'connection="branch"' in k) == 1
                  and sum(v for k, v in ike.items() if 'connection="depot"' in k) == 1)
            return text if ok else None

        first = wait_for("both connections up", both_up, timeout=40,
                         diag=lambda: tail(gw.log_path) + tail(peer.log_path))
        gw_ep = Endpoint(("127.0.0.1", base + 2), ("127.0.0.1", base + 3))
        peer_ep = Endpoint(("127.0.0.1", base + 102), ("127.0.0.1", base + 103))
        endpoints += [gw_ep, peer_ep]
        flows = [ch.host_pair() for conn in CONNS for ch in conn.children]
        res = exchange_traffic(flows, peer_ep, gw_ep, per_flow=5)
        time.sleep(0.5)  # heartbeats carry the members' counters
        second = scrape(metrics_port)
    finally:
        for ep in endpoints:
            ep.close()
        procs.close()
    fams = families(second)
    assert fams["ipsec_cluster_member_alive"]["type"] == "gauge"
    for name in ("ipsec_cluster_takeovers_total", "ipsec_cluster_sync_ack_timeouts_total",
                 "ipsec_cluster_esp_in_bytes_total", "ipsec_cluster_member_drops_total"):
        assert fams[name]["type"] == "counter", name
    for name, fam in fams.items():
        assert fam.get("help") and fam["help"] != name and "_" not in fam["help"].split()[0]
    now = samples(second)
    for name, fam in fams.items():   # TYPE counter exactly for the *_total families
        assert (fam["type"] == "counter") == name.endswith("_total"), name
    assert "ipsec_cluster_uptime_seconds" in fams
    assert any('child="lan"' in k and v == 1 for k, v in now.items()
               if k.startswith("ipsec_cluster_connection_child_sas"))
    # every metric the Grafana dashboard queries exists
    dashboard = (ROOT / "docs" / "grafana-dashboard.json").read_text()
    json.loads(dashboard)
    for name in set(re.findall(r"ipsec_cluster_\w+", dashboard)):
        assert name in fams, name
    # the traffic is counted: every packet the cluster's inside received (UP)
    # was decrypted there, every one the peer received (DOWN) encrypted there
    def total(prefix: str) -> float:
        return sum(v for k, v in now.items() if k.startswith(prefix))

    assert res.total(UP) > 0 and res.total(DOWN) > 0, res
    assert total("ipsec_cluster_esp_packets_in_total") >= res.total(UP)
    assert total("ipsec_cluster_esp_packets_out_total") >= res.total(DOWN)
    assert total("ipsec_cluster_esp_in_bytes_total") >= 200 * res.total(UP)
    assert total("ipsec_cluster_esp_out_bytes_total") >= 200 * res.total(DOWN)
    before = samples(first)
    for key, value in now.items():
        if key.endswith("_total") and key in before:
            assert value >= before[key], key


def _try_scrape(port: int) -> str | None:
    try:
        return scrape(port)
    except OSError:
        return None


def test_metrics_address_is_a_config_key_with_a_one_line_error() -> None:
    from common.config import ConfigError, load_config

    def config(**extra: str) -> str:
        return gateway_toml(address=GW, ports=(500, 4500), inside="udp:127.0.0.1:9000",
                            conns=CONNS, extra=extra)

    assert load_config(config(), "gw.toml").cluster.metrics_address == "127.0.0.1"
    opened = config(metrics_address="0.0.0.0")
    assert load_config(opened, "gw.toml").cluster.metrics_address == "0.0.0.0"
    with pytest.raises(ConfigError, match=r"gw.toml: cluster.metrics_address: expected"):
        load_config(config(metrics_address="lo"), "gw.toml")


def test_the_metrics_are_read_from_the_status_report() -> None:
    """In-process: every family comes from the StatusReport (common/cluster/stats.py),
    whichever process serves it; a member without replication (a single
    process) shows zeros there."""
    from common.cluster.stats import (
        ClusterStatus,
        ConnectionCounts,
        DispatcherStatus,
        MemberStatus,
        ReplicationStatus,
        StatusReport,
    )
    from dispatcher.metrics import ClusterCollector

    report = StatusReport(
        ClusterStatus(epoch=4, uptime_s=2.5),
        DispatcherStatus(counters={"udp_in": 7}, drops={"no_owner": 2},
                         refused={"wire_frames": 1}),
        (MemberStatus(1, segments=3, ike_sas=2, packets_in=5, bytes_in=500,
                      drops={"esp_replay": 1}, refused={"push_bad_spi": 3},
                      replication=ReplicationStatus(ike_replicas=6, takeovers=2, degraded=True),
                      connections=ConnectionCounts({"branch": 2}, {"net": 1})),
         MemberStatus(2, alive=False, last_heartbeat_ms=1500)))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in ClusterCollector(lambda: report).collect() for s in f.samples}
    one, two = (("member", "1"),), (("member", "2"),)
    assert got[("ipsec_cluster_member_alive", one)] == 1.0
    assert got[("ipsec_cluster_member_alive", two)] == 0.0
    assert got[("ipsec_cluster_member_heartbeat_age_seconds", two)] == 1.5
    assert got[("ipsec_cluster_segments", one)] == 3.0
    assert got[("ipsec_cluster_ike_sas", one)] == 2.0
    assert got[("ipsec_cluster_esp_packets_in_total", one)] == 5.0
    assert got[("ipsec_cluster_esp_in_bytes_total", one)] == 500.0
    assert got[("ipsec_cluster_ike_replicas", one)] == 6.0
    assert got[("ipsec_cluster_takeovers_total", one)] == 2.0
    assert got[("ipsec_cluster_takeovers_total", two)] == 0.0
    assert got[("ipsec_cluster_unreplicated", one)] == 1.0
    assert got[("ipsec_cluster_unreplicated", two)] == 0.0
    assert got[("ipsec_cluster_member_drops_total", (("member", "1"),
                                                     ("reason", "esp_replay")))] == 1.0
    assert got[("ipsec_cluster_connection_ike_sas", (("connection", "branch"),
                                                     ("member", "1")))] == 2.0
    assert got[("ipsec_cluster_connection_child_sas", (("child", "net"),
                                                       ("member", "1")))] == 1.0
    assert got[("ipsec_cluster_refused_total", (("process", "1"),
                                                ("reason", "push_bad_spi")))] == 3.0
    assert got[("ipsec_cluster_refused_total", (("process", "dispatcher"),
                                                ("reason", "wire_frames")))] == 1.0
    assert got[("ipsec_cluster_dispatcher_drops_total", (("reason", "no_owner"),))] == 2.0
    assert got[("ipsec_cluster_dispatcher_events_total", (("event", "udp_in"),))] == 7.0
    assert got[("ipsec_cluster_table_epoch", ())] == 4.0
    assert got[("ipsec_cluster_uptime_seconds", ())] == 2.5
