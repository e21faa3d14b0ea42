"""Human views of ``status`` and ``sas`` (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_status(status: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    c = status["cluster"]
    console.print(f"cluster {c['address']} ({c['mode']}), table epoch {c['epoch']}, "
                  f"up {c['uptime_s']} s, members at {c['endpoint']}")
    table = Table("id", "pid", "host", "alive", "segs", "bkup", "IKE", "child", "pkts in",
                  "bytes in", "pkts out", "bytes out", "replicas", "drops", "refused")
    for m in status["members"]:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(m["drops"].items()) if v) or "-"
        table.add_row(str(m["id"]), str(m["pid"]), m["host"], "yes" if m["alive"] else "DEAD",
                      str(m["segments"]), str(m["backup_segments"]), str(m["ike_sas"]),
                      str(m["child_sas"]), str(m["packets_in"]), str(m["bytes_in"]),
                      str(m["packets_out"]), str(m["bytes_out"]), _replicas(m), drops,
                      _refused(m.get("refused", {})) or "-")
    console.print(table)
    d = status["dispatcher"]
    drops = ", ".join(f"{k}={v}" for k, v in sorted(d["drops"].items())) or "none"
    console.print(f"dispatcher pid {d['pid']}: {d['counters']}; drops: {drops}; "
                  f"refused: {_refused(d.get('refused', {})) or 'none'}")


def _refused(counts: dict[str, int]) -> str:
    """Refusals by reason (member/refusals.py), unexpected failures (bug.*) first."""
    rows = sorted(counts.items(), key=lambda kv: (not kv[0].startswith("bug."), kv[0]))
    return ", ".join(f"{k}={v}" for k, v in rows if v)


def _replicas(m: dict[str, Any]) -> str:
    r = m.get("replication", {})
    text = f"{r.get('ike_replicas', 0)}/{r.get('child_replicas', 0)}"
    if r.get("degraded"):
        text += " UNREPLICATED"
    return text


def print_sas(sas: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    for m in sas["members"]:
        if "error" in m:
            console.print(f"member {m['member']}: {m['error']}")
            continue
        for ike in m["ike_sas"]:
            console.print(f"[bold]{ike['name']}[/]: #{ike['id']} on member {m['member']}, "
                          f"{ike['state']}, {ike['spi_i']}_i {ike['spi_r']}_r, "
                          f"remote {ike['remote']} {ike['remote_id']}, {ike['algorithms']}"
                          f"{_timers(ike)}")
            for ch in ike["children"]:
                console.print(f"  {ch['name']}: {ch['state']} on member {ch['member']}, "
                              f"{ch['spi_in']}_i {ch['spi_out']}_o, {ch['algorithms']}"
                              f"{_timers(ch)}")
                console.print(f"    local  {', '.join(ch['local_ts'])}")
                console.print(f"    remote {', '.join(ch['remote_ts'])}")
        for esp in m["child_sas"]:
            console.print(f"  ESP {esp['name']} {esp['spi_in']}_i {esp['spi_out']}_o on member "
                          f"{m['member']}: in {esp['packets_in']} pkts/{esp['bytes_in']} B, "
                          f"out {esp['packets_out']} pkts/{esp['bytes_out']} B")


def _timers(sa: dict[str, Any]) -> str:
    """Age and rekey timer (control API ``list-sas``; absent in older answers)."""
    text = ""
    if sa.get("age_s") is not None:
        text += f", up {sa['age_s']} s"
    if sa.get("rekey_in_s") is not None:
        text += f", rekey in {sa['rekey_in_s']} s"
    return text
