"""``ipsec-cluster status`` as text (dispatcher/views.py): plain tab-separated
lines with every field whole when stdout is not a terminal, and totals that
count only alive members (after a failover the dead member's last counts
would otherwise be counted twice)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from common.cluster.stats import StatusReport
from dispatcher.views import COLUMNS, print_status, status_rows
from tests.cluster_util import (
    ChildSpec,
    ConnSpec,
    Procs,
    alive_members,
    cli_argv,
    gateway_toml,
    status,
    tail,
    wait_for,
)

LONG_HOST = "member-host-with-a-rather-long-name.datacenter.example.org"


def _member(mid: int, alive: bool, ike: int, child: int, **extra: Any) -> dict[str, Any]:
    return {"id": mid, "pid": 1000 + mid, "host": LONG_HOST, "alive": alive, "segments": 4,
            "backup_segments": 4, "ike_sas": ike, "child_sas": child,
            "packets_in": 123456789012, "bytes_in": 987654321098765, "packets_out": 7,
            "bytes_out": 700, "drops": {"esp_auth_failed": 3, "replayed": 0},
            "refused": {"bug.timer": 1}, "replication": {"ike_replicas": 2}, **extra}


# after a failover: member 2 died with 5 IKE / 10 child SAs, member 1 took them over
AFTER_FAILOVER = {
    "cluster": {"address": "198.18.0.2", "mode": "load-sharing", "epoch": 3,
                "uptime_s": 12.5, "endpoint": "ipc:///tmp/x/members.ipc"},
    "dispatcher": {"pid": 999, "counters": {"in": 5}, "drops": {}, "refused": {}},
    "members": [_member(1, True, 10, 20), _member(2, False, 5, 10),
                _member(3, True, 1, 2)],
}


def _plain() -> list[list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_status(StatusReport.from_json(AFTER_FAILOVER), plain=True)
    return [line.split("\t") for line in out.getvalue().splitlines()]


def test_plain_layout_has_every_field_whole() -> None:
    lines = _plain()
    header = lines[1]
    assert tuple(header) == COLUMNS
    rows = lines[2:-1]
    assert all(len(r) == len(COLUMNS) for r in rows), rows
    first = dict(zip(COLUMNS, rows[0], strict=True))
    assert first["host"] == LONG_HOST
    assert first["bytes in"] == "987654321098765"
    assert first["drops"] == "esp_auth_failed=3"
    assert first["refused"] == "bug.timer=1"
    assert lines[-1][0].startswith("dispatcher pid 999")


def test_totals_count_only_alive_members() -> None:
    total = dict(zip(COLUMNS, _plain()[-2], strict=True))
    assert total["id"] == "total"
    assert total["alive"] == "2/3"
    assert (total["IKE"], total["child"]) == ("11", "22")
    assert total["pkts in"] == str(2 * 123456789012)


def test_terminal_layout_is_a_table_with_the_same_totals() -> None:
    out = io.StringIO()
    print_status(StatusReport.from_json(AFTER_FAILOVER), Console(file=out, width=400))
    text = out.getvalue()
    assert "DEAD" in text
    total = next(ln for ln in text.splitlines() if "total" in ln)
    assert "2/3" in total and " 11 " in total and " 22 " in total


@pytest.mark.slow
def test_totals_after_a_live_failover_count_each_sa_once(tmp_path: Path) -> None:
    """kill -9 of a member holding SAs: in a snapshot where it is DEAD and the
    other member took its SAs over, the totals row counts every SA once."""
    base = 35000 + os.getpid() % 500 * 4
    conns = tuple(ConnSpec(f"c{i}", "gw.test", f"peer{i}.test",
                           (ChildSpec("net", f"10.74.{i}.0/24", f"10.75.{i}.0/24"),))
                  for i in range(6))
    config = tmp_path / "gw.toml"
    config.write_text(gateway_toml(address="127.0.0.1", ports=(base, base + 1),
                                   inside="udp:127.0.0.1:9", inside_bind=f"127.0.0.1:{base + 2}",
                                   members=2, conns=conns))
    peer_cfg = tmp_path / "peer.toml"
    peer_cfg.write_text(gateway_toml(address="127.0.0.2", ports=(base + 100, base + 101),
                                     inside="udp:127.0.0.1:9",
                                     inside_bind=f"127.0.0.1:{base + 102}", conns=conns,
                                     remote=("127.0.0.1", base)))
    procs = Procs(tmp_path)
    try:
        disp = procs.start("gw", cli_argv("run", "--config", str(config)))
        wait_for("2 members", lambda: len(alive_members(status(config))) == 2, timeout=20,
                 diag=lambda: tail(disp.log_path))
        procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)))

        def spread() -> dict[str, Any] | None:
            st = status(config)
            ok = (sum(m["ike_sas"] for m in st["members"]) == len(conns)
                  and all(m["ike_sas"] for m in st["members"])
                  and all(m["replication"].get("ike_replicas") for m in st["members"]))
            return st if ok else None

        st = wait_for("SAs on both members, replicated", spread, timeout=40,
                      diag=lambda: tail(disp.log_path))
        victim = max(st["members"], key=lambda m: m["ike_sas"])
        os.kill(victim["pid"], signal.SIGKILL)

        def taken_over() -> dict[str, Any] | None:
            st = status(config)
            dead = [m for m in st["members"] if not m["alive"]]
            alive = alive_members(st)
            ok = (dead and dead[0]["ike_sas"] > 0
                  and sum(m["ike_sas"] for m in alive) == len(conns))
            return st if ok else None

        snapshot = wait_for("a snapshot: DEAD with its last SAs, taken over", taken_over,
                            timeout=20, interval=0.05, diag=lambda: tail(disp.log_path))
    finally:
        procs.close()
    total = dict(zip(COLUMNS, status_rows(StatusReport.from_json(snapshot))[-1], strict=True))
    assert total["IKE"] == str(len(conns)), snapshot
    assert total["alive"] == "1/2"


# -- the report behind the view (common/cluster/stats.py StatusReport) ------------------------

#: the keys of ``status --json`` in their order (docs/operations.md, the tests, the demo)
STATUS_KEYS = ["cluster", "dispatcher", "members", "pools"]
CLUSTER_KEYS = ["address", "mode", "epoch", "uptime_s", "endpoint"]
DISPATCHER_KEYS = ["pid", "counters", "drops", "inside_routes", "refused", "esp_relayed",
                   "data_path", "data_path_off", "supervisor_pid", "adopting", "role", "host",
                   "term"]
MEMBER_KEYS = ["id", "pid", "host", "alive", "sender_id", "last_heartbeat_ms", "segments",
               "backup_segments", "ike_sas", "half_open_ike_sas", "child_sas", "packets_in",
               "bytes_in", "packets_out", "bytes_out", "drops", "refused", "sync_gaps",
               "replication", "sync"]
REPLICATION_KEYS = ["ike_replicas", "child_replicas", "unreplicated_changes", "ack_timeouts",
                    "held", "sync_out", "sync_in", "takeovers", "degraded"]
POOL_KEYS = ["name", "addrs", "dns", "size", "per_segment", "leased", "by_member"]


def _full_member(mid: int) -> dict[str, Any]:
    return {"id": mid, "pid": 77, "host": "h", "alive": mid != 2, "sender_id": mid,
            "last_heartbeat_ms": 12, "segments": 3, "backup_segments": 2, "ike_sas": 4,
            "half_open_ike_sas": 1, "child_sas": 5, "packets_in": 6, "bytes_in": 7,
            "packets_out": 8, "bytes_out": 9, "drops": {"esp_replay": 1}, "refused": {},
            "sync_gaps": 0, "replication": dict(zip(REPLICATION_KEYS, [*range(8), True],
                                                    strict=True)),
            "sync": {"sync_out": 5, "bulk_sent": 2}}


CLUSTER_STATUS = {
    "cluster": {"address": "198.18.0.2", "mode": "load-sharing", "epoch": 3, "uptime_s": 1.5,
                "endpoint": "ipc:///x"},
    "dispatcher": {"pid": 9, "counters": {"udp_in": 1}, "drops": {}, "inside_routes": 2,
                   "refused": {"wire_frames": 1}, "esp_relayed": 5, "data_path": "kernel",
                   "data_path_off": "", "supervisor_pid": 4321, "adopting": False,
                   "role": "standby", "host": "disp-b", "term": 3},
    "members": [_full_member(1), _full_member(2)],
    "pools": [{"name": "rw", "addrs": "10.9.0.0/24", "dns": ["10.9.0.1"], "size": 254,
               "per_segment": 15, "leased": 3, "by_member": {1: 2, 3: 1}}]}
SINGLE_STATUS = {
    "cluster": {"address": "198.18.0.2", "mode": "single-process", "epoch": 0,
                "uptime_s": 0.2, "endpoint": "ipc:///y"},
    "dispatcher": {"pid": 9, "counters": {}, "drops": {}, "inside_routes": 0,
                   "refused": {"bug.ike.KeyError": 2}, "esp_relayed": 0,
                   "data_path": "single-process", "data_path_off": "",
                   "supervisor_pid": 0, "adopting": False, "role": "active", "host": "",
                   "term": 0},
    "members": [{**_full_member(1), "replication": {}, "sync": {}}]}


@pytest.mark.parametrize("obj", [CLUSTER_STATUS, SINGLE_STATUS], ids=["cluster", "single"])
def test_the_report_reads_back_the_json_of_status_exactly(obj: dict[str, Any]) -> None:
    import json

    text = json.dumps(obj)
    report = StatusReport.from_json(json.loads(text))
    assert report.to_json() == obj
    assert json.dumps(report.to_json()) == text    # the same keys in the same order
    assert json.dumps(StatusReport.from_json({"ok": True, **obj}).to_json()) == text


@pytest.mark.parametrize("bad", [
    {"members": {}}, {"members": [{"id": "1"}]}, {"members": [{"id": 1, "alive": 1}]},
    {"members": [{"id": 1, "drops": {"x": "1"}}]}, {"cluster": []},
    {"pools": [{"name": "p", "by_member": {"x": 1}}]}, {"dispatcher": {"pid": True}}])
def test_a_status_of_another_shape_is_a_value_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="status"):
        StatusReport.from_json(bad)


def test_the_dispatchers_status_has_the_keys_of_status_json() -> None:
    """Dispatcher.status(): the report of its members' last heartbeats, in
    the JSON every reader of ``status --json`` knows."""
    import json

    from common.cluster.stats import ConnectionCounts, EspTraffic, MemberStats, Replicas
    from tests.test_hostile_member import _rig

    d, _ = _rig()
    try:
        d.members[1].stats = MemberStats(
            ike_sas=4, half_open_ike_sas=1, child_sas=5, esp=EspTraffic(6, 7, 8, 9),
            sync_gaps=2, replicas=Replicas(3, 4, 1), drops={"esp_replay": 1},
            refused={"bug.ike.KeyError": 1},
            sync={"ike_unreplicated": 5, "ack_timeouts": 6, "sync_out": 7, "sync_in": 8,
                  "takeovers": 9, "sync_gaps": 1},
            pools={"rw": 3}, connections=ConnectionCounts({"c": 4}, {"net": 5}))
        d.members[1].gaps = 3
        d.members[2].incarnation.alive = False
        st = d.status()
    finally:
        d.close()
    assert list(st) == STATUS_KEYS
    assert list(st["cluster"]) == CLUSTER_KEYS and list(st["dispatcher"]) == DISPATCHER_KEYS
    assert st["dispatcher"]["pid"] == os.getpid()
    assert [m["id"] for m in st["members"]] == [1, 2, 3, 4]
    m1 = st["members"][0]
    assert list(m1) == MEMBER_KEYS and list(m1["replication"]) == REPLICATION_KEYS
    assert (m1["ike_sas"], m1["half_open_ike_sas"], m1["child_sas"]) == (4, 1, 5)
    assert (m1["packets_in"], m1["bytes_in"], m1["packets_out"], m1["bytes_out"]) == (6, 7, 8, 9)
    assert m1["drops"] == {"esp_replay": 1} and m1["refused"] == {"bug.ike.KeyError": 1}
    assert m1["sync_gaps"] == 3 + 2
    assert m1["replication"] == {"ike_replicas": 3, "child_replicas": 4,
                                 "unreplicated_changes": 5, "ack_timeouts": 6, "held": 1,
                                 "sync_out": 7, "sync_in": 8, "takeovers": 9,
                                 "degraded": m1["replication"]["degraded"]}
    assert m1["sync"]["sync_gaps"] == 1 and "connections" not in m1
    assert not st["members"][1]["alive"] and st["members"][1]["ike_sas"] == 0
    obj = json.loads(json.dumps(st))
    assert StatusReport.from_json(obj).to_json() == obj


def test_the_gateways_status_has_the_keys_of_status_json() -> None:
    from common.config import load_config
    from dispatcher.gateway import Gateway
    from tests.test_hostile_member_input import CONFIG

    gw = Gateway(load_config(CONFIG, "gw.toml"))
    gw.member.counters.update(esp_in=3, esp_in_bytes=300, esp_out=2, esp_out_bytes=200)
    gw.refusals.counts["bug.ike.KeyError"] += 1
    st = gw.status_report().to_json()
    assert list(st) == STATUS_KEYS[:3]
    assert list(st["cluster"]) == CLUSTER_KEYS and list(st["dispatcher"]) == DISPATCHER_KEYS
    assert st["cluster"]["mode"] == "single-process" and st["cluster"]["epoch"] == 0
    assert st["dispatcher"]["refused"] == {"bug.ike.KeyError": 1}
    (m,) = st["members"]
    assert list(m) == MEMBER_KEYS
    assert (m["id"], m["host"], m["alive"], m["replication"], m["sync"]) == (
        1, "local", True, {}, {})
    assert (m["packets_in"], m["bytes_in"], m["packets_out"], m["bytes_out"]) == (3, 300, 2, 200)
