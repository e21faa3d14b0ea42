"""The demo's verdict: the checks at the end and their causes, as functions
of the facts the scenario recorded (no process needed to test them).

``verdict`` gives the summary lines and the failed checks: the SAs up, the
traffic that came back, the failover act (dead, taken over, restarted,
balanced again), what was lost and when (``_loss_runs`` and ``_silences``
group our peer's per-packet records), whether the IKE SAs stayed the same,
and the cluster's drops; ``causes`` says why a member may have been declared
dead that we did not kill.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any

from bench.demo.facts import ESPS, GW, LAST_ECHO_S, SEGMENTS, STRAY_LOSS, Facts, adopted


def ike_sas(sas: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """IKE SA name -> {spi_i, spi_r, member, state, children}."""
    out: dict[str, dict[str, Any]] = {}
    for m in (sas or {}).get("members", []):
        for sa in m.get("ike_sas", []):
            out[sa["name"]] = {"spi_i": sa["spi_i"], "spi_r": sa["spi_r"], "state": sa["state"],
                               "member": m["member"], "children": len(sa.get("children", []))}
    return out


def _child_spis(sas: dict[str, Any] | None) -> set[str]:
    """Inbound SPIs of every child SA the IKE SA owners list."""
    return {ch["spi_in"] for m in (sas or {}).get("members", [])
            for sa in m.get("ike_sas", []) for ch in sa.get("children", [])}


def _esp_carriers(sas: dict[str, Any] | None) -> dict[str, int]:
    """child SA inbound SPI -> the member carrying it."""
    return {ch["spi_in"]: m["member"] for m in (sas or {}).get("members", [])
            for ch in m.get("child_sas", [])}



def _loss_runs(lost: list[int], sent_at: list[float], n: int) -> list[dict[str, Any]]:
    """Consecutive lost packets of one child (its sequence numbers step by
    ``n``) as runs: child, packets, first and last send time."""
    runs: list[dict[str, Any]] = []
    by_child: dict[int, list[int]] = {}
    for seq in lost:
        by_child.setdefault(seq % n, []).append(seq)
    for child, seqs in sorted(by_child.items()):
        bounds: list[list[int]] = []
        for seq in seqs:
            if bounds and seq == bounds[-1][1] + n:
                bounds[-1][1] = seq
            else:
                bounds.append([seq, seq])
        runs += [{"child": child, "packets": (last - first) // n + 1,
                  "first": sent_at[first], "last": sent_at[last]} for first, last in bounds]
    return runs


def _silences(arrivals: list[list[float]], at_least: float) -> list[dict[str, Any]]:
    """Per child, every interval of at least ``at_least`` without an echo."""
    out = []
    for child, times in enumerate(arrivals):
        times.sort()
        for a, b in itertools.pairwise(times):
            if b - a >= at_least:
                out.append({"child": child, "from": a, "to": b})
    return out



def verdict(facts: Facts) -> tuple[list[str], list[str]]:
    """(summary lines, failures)."""
    s, fo, d = facts.schedule, facts.fo, facts.done or {}
    lines: list[str] = []
    bad: list[str] = []
    want_ike, want_child = s.ike_sas, s.ike_sas * s.children
    lines.append(f"cluster        {s.members} members at {GW}:{facts.gw_ports[0]}, "
                 f"{SEGMENTS} segments, final epoch {facts.epoch}")
    lines.append(f"IKE SAs        {facts.up.get('ike_sas_up', 0)}/{want_ike} up, "
                 f"{facts.up.get('children_up', 0)}/{want_child} child SAs "
                 f"({', '.join(ESPS)})")
    if not d:
        lines.append(f"traffic        not finished: {facts.peer_sent} packets sent, "
                     f"{facts.peer_echoed} echoed back so far")
        return lines, bad
    sent, echoed = d.get("sent", 0), d.get("echoed", 0)
    lost = sent - echoed
    pct = 100.0 * lost / sent if sent else 0.0
    lines.append(f"traffic        {sent} packets peer -> cluster, {echoed} back cluster -> "
                 f"peer through the echo, {lost} lost ({pct:.2f} %), "
                 f"{d.get('duplicates', 0)} duplicates")
    if not sent or not echoed:
        bad.append("no traffic came back")
    if d.get("duplicates"):
        bad.append(f"{d['duplicates']} echoes arrived twice")
    if fo.killed_at is None:
        bad.append("the failover act did not happen")
        return lines, bad
    k = fo.killed_at - facts.t_start
    lines.append(f"failover       kill -9 member {fo.member} (pid {fo.pid}, {fo.ike_sas} "
                 f"IKE SAs, {fo.child_sas} child SAs, {fo.segments} segments) at "
                 f"t={k:.1f}s")
    if fo.dead_at is not None:
        took = ", ".join(f"{m}: {n}" for m, n in sorted(fo.moved_to.items()))
        lines.append(f"               declared dead after "
                     f"{(fo.dead_at - fo.killed_at) * 1000:.0f} ms, segments to the "
                     f"backups (epoch {fo.dead_epoch}; segments {took})")
    else:
        bad.append(f"member {fo.member} was not declared dead")
    now = adopted(facts.status)
    for member, segments, at in fo.takeovers:
        ike0, child0 = fo.adopted_before.get(member, (0, 0))
        ike1, child1 = now.get(member, (ike0, child0))
        lines.append(f"               member {member} took over {segments} segments: "
                     f"{ike1 - ike0} IKE SAs, {child1 - child0} child SAs "
                     f"({fo.since_kill(at)})")
    if fo.rekeyed:
        per = ", ".join(f"member {m}: {n}" for m, n in sorted(fo.rekeyed.items()))
        lines.append(f"               child SAs rekeyed after the kill ({per})")
    if fo.rejoined_at is not None:
        lines.append(f"               rejoined after "
                     f"{fo.rejoined_at - fo.killed_at:.1f} s (pid {fo.new_pid}, IV sender "
                     f"id {fo.sender_id} -> {fo.new_sender_id})")
    else:
        bad.append(f"member {fo.member} was not restarted")
    if fo.balanced_at is not None and fo.rejoined_at is not None:
        back = fo.taken_back
        lines.append(f"               autobalance gave back {fo.balanced_segments} segments "
                     f"{fo.balanced_at - fo.rejoined_at:.1f} s after it rejoined (with "
                     f"{back[1]} IKE SAs, {back[2]} child SAs)")
    else:
        bad.append(f"member {fo.member} did not get its segments back")
    lines += _loss(facts, bad)
    lines += _same_sas(facts, bad)
    return lines, bad

def _loss(facts: Facts, bad: list[str]) -> list[str]:
    fo, d = facts.fo, facts.done or {}
    if fo.killed_at is None:
        raise RuntimeError("failover summary before the kill")
    labels: list[str] = d.get("children", [])
    runs = d.get("lost_runs", [])
    fo_end = (fo.dead_at or fo.killed_at) + 1.0
    bal_start = fo.rejoined_at or fo_end
    bal_end = (fo.balanced_at or bal_start) + 1.0
    at_kill = [r for r in runs if fo.killed_at - 0.2 <= r["last"] and r["first"] <= fo_end]
    at_balance = [r for r in runs if r not in at_kill
                  and bal_start <= r["last"] and r["first"] <= bal_end]
    unplanned = [r for r in runs if r not in at_kill and r not in at_balance
                 and any(t - 0.2 <= r["last"] and r["first"] <= t + 1.0
                         for t, _ in facts.others_dead)]
    stray = [r for r in runs if r not in at_kill and r not in at_balance
             and r not in unplanned]
    n_kill = sum(r["packets"] for r in at_kill)
    n_bal = sum(r["packets"] for r in at_balance)
    n_stray = sum(r["packets"] for r in stray)
    spacing = d.get("spacing_s", 0.0)
    gap = max((r["last"] - r["first"] + spacing for r in at_kill), default=0.0)
    silences = [x for x in d.get("silences", [])
                if fo.killed_at - 0.2 <= x["to"] and x["from"] <= fo_end + 2.0]
    silent = max((x["to"] - x["from"] for x in silences), default=0.0)
    hit = sorted({labels[r["child"]] if r["child"] < len(labels) else str(r["child"])
                  for r in at_kill})
    lines = [f"loss at kill   {n_kill} packets on {len(hit)} of {len(labels)} children "
             f"({', '.join(hit) or 'none'})",
             f"failover gap   ~{gap * 1000:.0f} ms of lost packets on the worst child; "
             f"longest silence {silent * 1000:.0f} ms (packets every "
             f"{spacing * 1000:.0f} ms per child)",
             f"other loss     {n_bal} during autobalance, "
             + (f"{sum(r['packets'] for r in unplanned)} at the unplanned failover, "
                if facts.others_dead else "") + f"{n_stray} elsewhere"]
    sent = d.get("sent", 0)
    if sent and n_stray > STRAY_LOSS * sent:
        bad.append(f"{n_stray} packets lost outside the failover")
    # every child still carried traffic at the end
    t_end = d.get("t_end", 0.0)
    stale = [labels[i] if i < len(labels) else str(i)
             for i, last in enumerate(d.get("last_echo", []))
             if last is None or last < t_end - LAST_ECHO_S]
    if stale:
        bad.append(f"children without echoes at the end: {', '.join(stale)}")
    if d.get("interrupted"):
        bad.append("the peer was stopped early")
    return lines

def _same_sas(facts: Facts, bad: list[str]) -> list[str]:
    before, after = ike_sas(facts.sas_before), ike_sas(facts.sas_after)
    during = ike_sas(facts.sas_during)
    fo = facts.fo
    same = [n for n, sa in before.items() if n in after
            and (after[n]["spi_i"], after[n]["spi_r"]) == (sa["spi_i"], sa["spi_r"])
            and after[n]["state"] == "ESTABLISHED"]
    lines = [f"same IKE SAs   {len(same)}/{len(before)} IKE SAs kept their SPIs "
             f"(sas before and after), none set up again"]
    for name in sorted(before):
        sa = before[name]
        if sa["member"] != fo.member:
            continue
        mid = during.get(name, {}).get("member", "?")
        end = after.get(name, {}).get("member", "?")
        lines.append(f"               {name} {sa['spi_i']}_i {sa['spi_r']}_r: member "
                     f"{sa['member']} -> {mid} (takeover) -> {end}")
    children_after = sum(sa["children"] for sa in after.values())
    spis_before, spis_after = _child_spis(facts.sas_before), _child_spis(facts.sas_after)
    kept = len(spis_before & spis_after)
    lines.append(f"child SAs      {children_after} after the failover: {kept} unchanged, "
                 f"{len(spis_after - spis_before)} rekeyed by their new owner "
                 f"(replay_after_failover = rekey); "
                 f"{len(_esp_carriers(facts.sas_after))} carried by the members")
    lines.append(f"drops          {_drops(facts.status)}")
    want = facts.schedule.ike_sas
    if len(before) != want:
        bad.append(f"sas before the kill listed {len(before)} IKE SAs, not {want}")
    if len(same) != len(before) or len(after) != len(before):
        changed = sorted(set(before) ^ set(same)) or sorted(set(after) ^ set(before))
        bad.append(f"IKE SAs changed over the failover: {', '.join(changed) or '?'}")
    if children_after != want * facts.schedule.children:
        bad.append(f"{children_after} child SAs after the failover, not "
                   f"{want * facts.schedule.children}")
    return lines

def causes(facts: Facts) -> list[str]:
    """Members declared dead that we did not kill, and why that may be."""
    out = [text for _, text in facts.others_dead]
    if out:
        with contextlib.suppress(OSError):
            out.append(f"the machine is busy? load average {os.getloadavg()[0]:.1f} on "
                       f"{os.cpu_count()} CPUs (a member is dead after 3 missed heartbeats, "
                       "150 ms by default)")
    return out

def _drops(status: dict[str, Any] | None) -> str:
    """The cluster's nonzero drop counters at the end (members as they are
    now: a restarted member starts from zero)."""
    st = status or {}
    parts = [f"dispatcher {k}={v}" for k, v in
             sorted(st.get("dispatcher", {}).get("drops", {}).items()) if v]
    for m in st.get("members", []):
        parts += [f"member {m['id']} {k}={v}" for k, v in sorted(m["drops"].items()) if v]
    return ", ".join(parts) or "none"
