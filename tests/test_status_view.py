"""``ipsec-cluster status`` as text (dispatcher/views.py): plain tab-separated
lines with every field whole when stdout is not a terminal, and totals that
count only alive members (after a failover the dead member's last counts
would otherwise be counted twice)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from rich.console import Console

from dispatcher.views import COLUMNS, print_status

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
