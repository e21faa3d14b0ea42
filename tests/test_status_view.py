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
        print_status(AFTER_FAILOVER, plain=True)
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
    print_status(AFTER_FAILOVER, Console(file=out, width=400))
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
    total = dict(zip(COLUMNS, status_rows(snapshot)[-1], strict=True))
    assert total["IKE"] == str(len(conns)), snapshot
    assert total["alive"] == "1/2"
