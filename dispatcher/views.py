"""Human views of ``status`` (a ``StatusReport``, common/cluster/stats.py) and
``sas`` (rich tables on a terminal; plain tab-separated lines otherwise)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from common.cluster.stats import MemberStatus, PoolStatus, StatusReport

COLUMNS = ("id", "pid", "host", "alive", "segs", "bkup", "IKE", "child", "pkts in",
           "bytes in", "pkts out", "bytes out", "replicas", "drops", "refused")
#: the columns summed in the totals row (alive members only: a dead member's
#: SAs were taken over by the others and are counted there)
SUMMED = ("segs", "bkup", "IKE", "child", "pkts in", "bytes in", "pkts out", "bytes out")


def status_rows(report: StatusReport) -> list[list[str]]:
    """One row per member, then a totals row over the alive members."""
    rows = []
    totals = dict.fromkeys(SUMMED, 0)
    for m in report.members:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(m.drops.items()) if v) or "-"
        numbers = dict(zip(SUMMED, (m.segments, m.backup_segments, m.ike_sas, m.child_sas,
                                    m.packets_in, m.bytes_in, m.packets_out, m.bytes_out),
                           strict=True))
        if m.alive:
            for k, v in numbers.items():
                totals[k] += v
        rows.append([str(m.id), str(m.pid), m.host, "yes" if m.alive else "DEAD",
                     *(str(v) for v in numbers.values()), _replicas(m), drops,
                     _refused(m.refused) or "-"])
    alive = sum(1 for m in report.members if m.alive)
    rows.append(["total", "-", "-", f"{alive}/{len(report.members)}",
                 *(str(v) for v in totals.values()), "-", "-", "-"])
    return rows


def print_status(report: StatusReport, console: Console | None = None, *,
                 plain: bool | None = None) -> None:
    """A table on a terminal; otherwise (``status | cat``, ``plain``) one
    tab-separated line per row with every field whole."""
    if plain is None:
        plain = console is None and not sys.stdout.isatty()
    c = report.cluster
    head = (f"cluster {c.address} ({c.mode}), table epoch {c.epoch}, "
            f"up {c.uptime_s} s, members at {c.endpoint}")
    d = report.dispatcher
    drops = ", ".join(f"{k}={v}" for k, v in sorted(d.drops.items())) or "none"
    tail = (f"dispatcher pid {d.pid}: {dict(d.counters)}; drops: {drops}; "
            f"refused: {_refused(d.refused) or 'none'}")
    rows = status_rows(report)
    pools = [_pool_line(p) for p in report.pools or ()]
    if plain:
        out = [head, "\t".join(COLUMNS), *("\t".join(r) for r in rows), *pools, tail]
        sys.stdout.write("\n".join(out) + "\n")
        return
    console = console or Console()
    console.print(head)
    table = Table(*COLUMNS)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for line in pools:
        console.print(line)
    console.print(tail)


def _pool_line(p: PoolStatus) -> str:
    """One virtual IP pool: size, leases, and which member holds them."""
    by = ", ".join(f"member {m}: {n}" for m, n in p.by_member.items()) or "-"
    return (f"pool {p.name} {p.addrs}: {p.leased} of {p.size} leased "
            f"({p.per_segment} per segment; {by})")


def _refused(counts: Mapping[str, int]) -> str:
    """Refusals by reason (member/refusals.py), unexpected failures (bug.*) first."""
    rows = sorted(counts.items(), key=lambda kv: (not kv[0].startswith("bug."), kv[0]))
    return ", ".join(f"{k}={v}" for k, v in rows if v)


def _replicas(m: MemberStatus) -> str:
    r = m.replication
    if r is None:
        return "0/0"
    text = f"{r.ike_replicas}/{r.child_replicas}"
    if r.degraded:
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
            if ike.get("virtual_ips"):
                console.print(f"  virtual IPs {', '.join(ike['virtual_ips'])}")
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
