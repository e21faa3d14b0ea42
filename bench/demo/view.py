"""What the operator sees of the demo: a live table (rich) of per-member
load from the ``status`` polls, our peer's counts under it, and a line per
thing that happened (timed from the demo's start).

Without a terminal (CI, tests) events print as lines and the table is printed
at the moments that matter (``snapshot``) instead of live.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.demo.facts import REFRESH_HZ, SEGMENTS, Facts


@dataclass(slots=True)
class MemberView:
    """What the table shows of one member, with rates from the last poll."""

    id: int
    pid: int = 0
    alive: bool = True
    sender_id: int = 0
    segments: int = 0
    backups: int = 0
    ike_sas: int = 0
    child_sas: int = 0
    packets_in: int = 0
    packets_out: int = 0
    rate_in: float = 0.0
    rate_out: float = 0.0
    drops: int = 0
    #: packet counters at the last rate computation
    base_in: int = 0
    base_out: int = 0


class View:
    """The console, the member table and the event lines over the facts."""

    def __init__(self, facts: Facts, console: Any = None) -> None:
        from rich.console import Console

        self.facts = facts
        if console is None:
            console = Console(highlight=False)
            if not console.is_terminal:   # CI, pipes: wide enough for the table
                console = Console(highlight=False, width=max(console.width, 120))
        self.console = console
        self.live_mode = bool(self.console.is_terminal)
        self.members: dict[int, MemberView] = {}
        self.last_poll: float | None = None

    def now(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.facts.t_start

    def event(self, text: str, style: str = "", *, at: float | None = None) -> None:
        t = (at if at is not None else time.monotonic()) - self.facts.t_start
        self.console.print(f"[dim]{t:5.1f}s[/] " + (f"[{style}]{text}[/]" if style else text))

    def update(self, st: dict[str, Any]) -> None:
        """The member views from one ``status`` (rates over at least 0.2 s)."""
        now = time.monotonic()
        dt = (now - self.last_poll) if self.last_poll else 0.0
        if dt >= 0.2 or not self.last_poll:
            self.last_poll = now
        for m in st["members"]:
            v = self.members.setdefault(m["id"], MemberView(m["id"]))
            if v.pid and m["pid"] != v.pid:   # restarted: counters from zero
                v.rate_in = v.rate_out = 0.0
                v.base_in = v.base_out = 0
            elif dt >= 0.2:   # (an extra poll right after another keeps the rates)
                v.rate_in = max(0, m["packets_in"] - v.base_in) / dt
                v.rate_out = max(0, m["packets_out"] - v.base_out) / dt
            if dt >= 0.2 or not v.pid:
                v.base_in, v.base_out = m["packets_in"], m["packets_out"]
            v.pid, v.alive, v.sender_id = m["pid"], m["alive"], m["sender_id"]
            v.segments, v.backups = m["segments"], m["backup_segments"]
            v.ike_sas, v.child_sas = m["ike_sas"], m["child_sas"]
            v.packets_in, v.packets_out = m["packets_in"], m["packets_out"]
            v.drops = sum(m["drops"].values())

    def segments(self) -> str:
        """"member 0: 86, member 1: 85, ..." (in member order)."""
        return ", ".join(f"member {m.id}: {m.segments}"
                         for m in sorted(self.members.values(), key=lambda m: m.id))

    def note(self, v: MemberView) -> str:
        """What the failover act means for a member's state column."""
        fo = self.facts.fo
        if fo.killed_at is None or v.id != fo.member or fo.balanced_at is not None:
            return ""
        if fo.rejoined_at is not None:
            return f"rejoining {v.segments}/{SEGMENTS // self.facts.schedule.members}"
        return "killed -9"

    def table(self) -> Any:
        from rich.table import Table

        title = (f"cluster 127.0.0.1:{self.facts.gw_ports[0]}  epoch {self.facts.epoch}  "
                 f"{self.facts.phase}")
        t = Table(title=title, title_justify="left", expand=False)
        for name in ("member", "state", "pid", "IV id", "segs", "backup", "IKE", "child",
                     "ESP in", "ESP out", "in/s", "out/s", "drops"):
            t.add_column(name, justify="left" if name in ("member", "state") else "right")
        for v in sorted(self.members.values(), key=lambda v: v.id):
            note = self.note(v)
            if not v.alive:
                state, style = "DEAD", "bold red"
            elif note:
                state, style = note, "yellow"
            else:
                state, style = "up", "green"
            dead = not v.alive
            t.add_row(str(v.id), f"[{style}]{state}[/]", str(v.pid), str(v.sender_id),
                      str(v.segments), str(v.backups), str(v.ike_sas), str(v.child_sas),
                      str(v.packets_in), str(v.packets_out),
                      "-" if dead else f"{v.rate_in:.0f}", "-" if dead else f"{v.rate_out:.0f}",
                      str(v.drops), style="dim" if dead else "")
        return t

    def peer_line(self) -> str:
        f = self.facts
        if f.t0 is None:
            return "peer: bringing up IKE SAs"
        return (f"peer: {f.peer_sent} packets sent, {f.peer_echoed} echoed back "
                f"({f.peer_sent - f.peer_echoed} in flight or lost), "
                f"traffic t={time.monotonic() - f.t0:.1f}s")

    def render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        return Group(self.table(), Text(self.peer_line(), style="cyan"))

    def snapshot(self, why: str) -> None:
        """Without a terminal: the table now, printed once."""
        if not self.live_mode:
            self.console.print(f"[bold]-- {why}[/]")
            self.console.print(self.table())
            self.console.print(self.peer_line())

    def live(self, run: Callable[[Callable[[], None]], None]) -> None:
        """``run(refresh)`` with the table live on a terminal (``refresh``
        redraws it), else with a ``refresh`` that does nothing."""
        from rich.live import Live

        if self.live_mode:
            with Live(self.render(), console=self.console, refresh_per_second=REFRESH_HZ,
                      transient=False) as live:
                run(lambda: live.update(self.render()))
        else:
            run(lambda: None)

    def summary(self, lines: list[str]) -> None:
        self.console.print()
        self.console.print("[bold]Summary[/]")
        for line in lines:
            self.line(line)

    def line(self, text: str, *, indent: str = "  ") -> None:
        """One line of the summary, as it is (no markup)."""
        self.console.print(indent + text, markup=False)
