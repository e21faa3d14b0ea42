"""The cluster demonstration behind ``make demo`` (``python -m bench.demo``).

Root-less, on loopback, in a temporary directory with ports chosen free at
start, it runs (each in its own session, all stopped at the end or on Ctrl-C):

- the protected network: an inner echo (``python -m dispatcher.peer echo``) at
  the cluster's ``udp:`` inside, sending every inner packet back with its
  addresses swapped;
- the cluster: ``ipsec-cluster run`` with a dispatcher and 3 members at
  127.0.0.1 (the supervisor restarts a member that dies);
- our peer at 127.0.0.2 (``python -m bench.demo peer``, a ``dispatcher.peer.Peer``
  that records every packet): 6 IKE SAs (6 identities) with 3 children each
  (AES-GCM and AES-CTR), then paced inner UDP traffic round-robin through the
  18 children, each packet coming back through the echo (both directions
  carry ESP).

A live table (rich) of per-member load is refreshed from the control socket
(``status``) a few times a second; what happens in the cluster (members joined
and declared dead, takeovers, segments moved, SAs up and rekeyed) comes from
its event stream on the same socket (``events``), never from its log. After
``kill_after`` seconds of traffic the
demo sends SIGKILL to the member owning the most IKE SAs: the dispatcher
declares it dead and its segments fail over to their backups, the supervisor
restarts it (new IV sender id), and autobalance gives it segments back, while
traffic goes on. At the end: what was lost and when (per packet, from the
peer's records), whether the IKE SAs are the same (SPIs from ``sas``), and a
summary; exit status 0 only when every check passed.

Without a terminal (CI, tests) events print as lines and the table is printed
at the moments that matter instead of live.

The demo is a scenario (the acts above), a view (the table and the event
lines) and a verdict (the summary and its checks) on top of the harness
(bench/harness/): its processes, configs and control client are the ones
the tests and the benchmarks use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.harness import configs
from bench.harness.control import ControlClient, ControlError
from bench.harness.net import free_udp_ports
from bench.harness.procs import Proc, Procs, cli_argv, python_argv, run_main
from common.cluster.events import EventType, Logged

GW, PEER = "127.0.0.1", "127.0.0.2"
PSK = "demo-psk-not-secret-0123456789abcdef"
ESPS = ("aes128gcm16", "aes128ctr-sha256", "aes256gcm16")
SEGMENTS = 256
#: a live table and the status poll, per second
REFRESH_HZ = 4


@dataclass(frozen=True, slots=True)
class Schedule:
    """How long the acts last (seconds)."""

    ike_sas: int = 6
    children: int = 3
    members: int = 3
    pps: float = 300.0
    size: int = 256
    #: traffic starts once every SA is up; the kill comes this long after
    kill_after: float = 15.0
    #: total traffic time (the kill included)
    traffic: float = 34.0


FULL = Schedule()
QUICK = Schedule(kill_after=5.0, traffic=14.0)

#: deadlines of the setup steps
CLUSTER_UP_S = 25.0
PEER_UP_S = 30.0
#: after the kill, by when the member must be dead / back / balanced
DEAD_WITHIN_S = 3.0
RESTART_WITHIN_S = 10.0
BALANCED_WITHIN_S = 15.0
#: every child must have had an echo this close to the end of the traffic
LAST_ECHO_S = 1.0
#: how much of a log a failure shows
TAIL_CHARS = 1500
#: lost packets allowed outside the failover and autobalance windows (loopback
#: does not lose, a very busy machine might)
STRAY_LOSS = 0.01

log = logging.getLogger("ipsec_cluster.demo")


# == our peer, as a subprocess: ``python -m bench.demo peer ...`` ===========================
#
# One JSON object per line on stdout: {"event": "up", ...} once the SAs are
# up, {"event": "traffic", "t0": ...} when traffic starts, {"event":
# "progress", ...} a few times a second, {"event": "done", ...} at the end.
# Times are time.monotonic(), which is one clock for all processes on Linux.

SEQ = struct.Struct("!I")


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


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


def _peer_main(argv: list[str]) -> int:
    from common.config import load_config
    from common.packets import IPV4_UDP_HEADERS, TRAFFIC_MARK
    from dispatcher.peer import Peer, PeerOptions

    p = argparse.ArgumentParser(prog="python -m bench.demo peer")
    p.add_argument("--config", required=True)
    p.add_argument("--pps", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--timeout", type=float, default=PEER_UP_S)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(Path(args.config).read_text(), args.config)

    class Recorder:
        """The peer's inside: keeps the arrival time of every echo of ours."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.echo_at: dict[int, float] = {}
            self.duplicates = 0
            self.other = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def write(self, packet: bytes | bytearray | memoryview) -> bool:
            mark = IPV4_UDP_HEADERS + len(TRAFFIC_MARK)
            if bytes(packet[IPV4_UDP_HEADERS:mark]) == TRAFFIC_MARK:
                seq = SEQ.unpack_from(packet, mark)[0]
                if seq in self.echo_at:
                    self.duplicates += 1
                else:
                    self.echo_at[seq] = time.monotonic()
                return True
            self.other += 1
            return bool(self.inner.write(packet))

    class DemoPeer(Peer):
        async def demo(self) -> int:
            await self.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
            try:
                launch = asyncio.ensure_future(self._launch())
                stopped = asyncio.ensure_future(self._stopped.wait())
                done, _ = await asyncio.wait({launch, stopped}, timeout=args.timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                launch.cancel()
                stopped.cancel()
                result = self.result(timed_out=launch not in done)
                _emit({"event": "up", **result.as_dict(), "summary": result.summary()})
                if not result.ok or self._stopped.is_set():
                    return 1
                return await self.traffic()
            finally:
                self.close()

        def labels(self) -> list[str]:
            out = []
            for route in self.member.carried():
                try:
                    ike = self.member.engine.get(route.ike_id).name
                except KeyError:
                    ike = "?"
                out.append(f"{ike}/{route.name}")
            return out

        async def traffic(self) -> int:
            if self.inside is None:
                raise RuntimeError("traffic() before the inside was opened")
            rec = Recorder(self.inside)
            self.inside = rec
            self.options.traffic_size = args.size
            templates = self._templates()
            n = len(templates)
            labels = self.labels()
            if not n:
                _emit({"event": "done", "error": "no child to send through"})
                return 1
            total = int(args.pps * args.seconds)
            sent_at: list[float] = []
            c0 = self.member.counters.copy()
            start = time.monotonic()
            _emit({"event": "traffic", "t0": start, "children": labels, "pps": args.pps})
            next_progress = start
            while len(sent_at) < total and not self._stopped.is_set():
                now = time.monotonic()
                due = min(total, int((now - start) * args.pps) + 1)
                while len(sent_at) < due:
                    seq = len(sent_at)
                    sent_at.append(time.monotonic())
                    self.inner(templates[seq % n].packet(seq))
                if now >= next_progress:
                    next_progress = now + 1.0 / REFRESH_HZ
                    _emit({"event": "progress", "t": now, "sent": len(sent_at),
                           "echoed": len(rec.echo_at)})
                await asyncio.sleep(0.002)
            end = time.monotonic()
            drain = end + 1.5
            while len(rec.echo_at) < len(sent_at) and time.monotonic() < drain:
                await asyncio.sleep(0.02)
            sent = len(sent_at)
            lost = [s for s in range(sent) if s not in rec.echo_at]
            arrivals: list[list[float]] = [[] for _ in range(n)]
            for seq, t in rec.echo_at.items():
                arrivals[seq % n].append(t)
            per_child = [{"label": labels[i], "sent": len(range(i, sent, n)),
                          "echoed": len(arrivals[i])} for i in range(n)]
            spacing = n / args.pps
            _emit({"event": "done", "t0": start, "t_end": end, "sent": sent,
                   "echoed": len(rec.echo_at), "duplicates": rec.duplicates,
                   "other_in": rec.other,
                   "esp_out": self.member.counters["esp_out"] - c0["esp_out"],
                   "esp_in": self.member.counters["esp_in"] - c0["esp_in"],
                   "children": labels, "per_child": per_child, "spacing_s": spacing,
                   "lost_runs": _loss_runs(lost, sent_at, n),
                   "silences": _silences(arrivals, max(0.2, 4 * spacing)),
                   "last_echo": [max(a) if a else None for a in arrivals],
                   "interrupted": self._stopped.is_set(),
                   "drops": {k: v for k, v in (self.member.drops
                                               + self.member.engine.drops).items() if v}})
            return 0

    return run_main(DemoPeer(config, PeerOptions(timeout_s=args.timeout)).demo())


# == the show ==================================================================================


class DemoFailed(Exception):
    """A step did not work: the message says which and why."""


class Interrupted(Exception):
    pass


def _configs(schedule: Schedule, *, gw_ports: tuple[int, int], peer_ports: tuple[int, int],
             echo_port: int, gw_bind: int, peer_inside: int, run: Path) -> tuple[str, str]:
    """The cluster's config and our peer's (selectors and identities
    mirrored, children started): ``ike_sas`` connections k0.. with identities
    peerK.demo, ``children`` children each with their own /28s (cluster side
    10.200.K.C*16, peer side 10.100.K.C*16), the ESP transforms alternating."""
    conns = configs.grid_connections(schedule.ike_sas, schedule.children, esps=ESPS,
                                     domain="demo")
    cluster = configs.gateway_toml(
        address=GW, ports=gw_ports, inside=f"udp:{GW}:{echo_port}", inside_bind=f"{GW}:{gw_bind}",
        members=schedule.members, conns=conns, psk=PSK, extra={"control": str(run)})
    peer = configs.gateway_toml(
        address=PEER, ports=peer_ports, inside=f"udp:{GW}:{peer_inside}", conns=conns, psk=PSK,
        remote=(GW, gw_ports[0]))
    return cluster, peer


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
    note: str = ""
    #: packet counters at the last rate computation
    base_in: int = 0
    base_out: int = 0


@dataclass(slots=True)
class Failover:
    """The failover act, its moments in time.monotonic() (from the cluster's
    events when they say, else from the status polls)."""

    member: int = 0
    pid: int = 0
    sender_id: int = 0
    ike_sas: int = 0
    child_sas: int = 0
    segments: int = 0
    killed_at: float | None = None
    dead_at: float | None = None
    dead_epoch: int = 0
    #: member -> segments it took over from the dead one (TAKEOVER events)
    moved_to: dict[int, int] = field(default_factory=dict)
    #: (member, segments, when) of every TAKEOVER of the dead member's segments
    takeovers: list[tuple[int, int, float]] = field(default_factory=list)
    #: every member's (IKE SAs, child SAs) adopted so far, at the kill (its sync counters)
    adopted_before: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: child SAs rekeyed after the kill (CHILD_REKEYED: replay_after_failover = rekey), per member
    rekeyed: dict[int, int] = field(default_factory=dict)
    rejoined_at: float | None = None
    new_pid: int = 0
    new_sender_id: int = 0
    balanced_at: float | None = None
    balanced_segments: int = 0
    #: segments, IKE SAs, child SAs the rejoined member took back
    taken_back: list[int] = field(default_factory=lambda: [0, 0, 0])


def _ike_sas(sas: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
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


class Demo:
    def __init__(self, schedule: Schedule, *, console: Any = None,
                 keep: bool = False) -> None:
        from rich.console import Console

        self.s = schedule
        if console is None:
            console = Console(highlight=False)
            if not console.is_terminal:   # CI, pipes: wide enough for the table
                console = Console(highlight=False, width=max(console.width, 120))
        self.console = console
        self.live_mode = bool(self.console.is_terminal)
        self.keep = keep
        self.t_start = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="ipsec-cluster-demo-"))
        self.procs = Procs(self.workdir)
        self.control: ControlClient | None = None
        #: time.monotonic() - time.time(): an event's time (Unix) on our clock
        self.offset = time.monotonic() - time.time()
        #: what the event stream said so far, by type
        self.seen: dict[EventType, int] = {}
        self.cluster: Proc | None = None
        #: members declared dead that we did not kill: (when, what)
        self.others_dead: list[tuple[float, str]] = []
        self.views: dict[int, MemberView] = {}
        self.epoch = 0
        self.last_poll: float | None = None
        self.status: dict[str, Any] | None = None
        self.peer_events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.peer_sent = 0
        self.peer_echoed = 0
        self.t0: float | None = None
        self.fo = Failover()
        self.sas_before: dict[str, Any] | None = None
        self.sas_during: dict[str, Any] | None = None
        self.sas_after: dict[str, Any] | None = None
        self.up: dict[str, Any] = {}
        #: IKE_UP events per member
        self.ike_up: dict[int, int] = {}
        self.done: dict[str, Any] | None = None
        self.phase = "starting"
        self.live: Any = None
        self.config_path = self.workdir / "cluster.toml"
        self.peer_path = self.workdir / "peer.toml"
        self.gw_ports: tuple[int, int] = (0, 0)
        self.stopped_ok = False

    # -- the view --------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t_start

    def event(self, text: str, style: str = "", *, at: float | None = None) -> None:
        t = (at if at is not None else time.monotonic()) - self.t_start
        self.console.print(f"[dim]{t:5.1f}s[/] " + (f"[{style}]{text}[/]" if style else text))

    def table(self) -> Any:
        from rich.table import Table

        title = (f"cluster 127.0.0.1:{self.gw_ports[0]}  epoch {self.epoch}  "
                 f"{self.phase}")
        t = Table(title=title, title_justify="left", expand=False)
        for name in ("member", "state", "pid", "IV id", "segs", "backup", "IKE", "child",
                     "ESP in", "ESP out", "in/s", "out/s", "drops"):
            t.add_column(name, justify="left" if name in ("member", "state") else "right")
        for v in sorted(self.views.values(), key=lambda v: v.id):
            if not v.alive:
                state, style = "DEAD", "bold red"
            elif v.note:
                state, style = v.note, "yellow"
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
        if self.t0 is None:
            return "peer: bringing up IKE SAs"
        return (f"peer: {self.peer_sent} packets sent, {self.peer_echoed} echoed back "
                f"({self.peer_sent - self.peer_echoed} in flight or lost), "
                f"traffic t={time.monotonic() - self.t0:.1f}s")

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

    # -- processes -------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], *, stdout_pipe: bool = False) -> Proc:
        return self.procs.start(name, argv, stdout_pipe=stdout_pipe)

    def cluster_tail(self) -> str:
        return self.cluster.tail(TAIL_CHARS) if self.cluster is not None else ""

    # -- the scenario ----------------------------------------------------------------------

    def setup(self) -> None:
        ports = free_udp_ports(7, (GW, PEER))
        self.gw_ports = (ports[0], ports[1])
        peer_ports = (ports[2], ports[3])
        echo_port, gw_bind, peer_inside = ports[4], ports[5], ports[6]
        cluster, peer = _configs(self.s, gw_ports=self.gw_ports, peer_ports=peer_ports,
                                 echo_port=echo_port, gw_bind=gw_bind, peer_inside=peer_inside,
                                 run=self.workdir / "run")
        self.config_path.write_text(cluster)
        self.peer_path.write_text(peer)
        self.event(f"work directory {self.workdir} (configs and logs); cluster at "
                   f"{GW} ports {self.gw_ports[0]}/{self.gw_ports[1]}, peer at {PEER} ports "
                   f"{peer_ports[0]}/{peer_ports[1]}, inner echo at {GW}:{echo_port}")
        self.start("echo", python_argv("dispatcher.peer", "echo", f"{GW}:{echo_port}"))
        self.cluster = self.start("cluster", cli_argv("run", "--config", str(self.config_path)))
        self.control = ControlClient(config=self.config_path)
        self.event(f"started the cluster: dispatcher pid {self.cluster.pid} with "
                   f"{self.s.members} members")
        end = time.monotonic() + CLUSTER_UP_S
        while True:
            st = self.poll()
            share = SEGMENTS // self.s.members
            if st and sum(1 for m in st["members"] if m["alive"] and m["segments"] >= share) \
                    == self.s.members:
                break
            if not self.cluster.alive():
                raise DemoFailed("the cluster exited at start\n" + self.cluster_tail())
            if time.monotonic() > end:
                raise DemoFailed(f"the cluster's {self.s.members} members did not come up "
                                 f"within {CLUSTER_UP_S:g} s\n" + self.cluster_tail())
            time.sleep(0.2)
        self.read_events()
        segs = ", ".join(f"member {v.id}: {v.segments}" for v in self.views.values())
        self.event(f"{self.s.members} members joined, segment table epoch {self.epoch} "
                   f"({segs} segments of {SEGMENTS})", "green")

    def start_peer(self) -> Proc:
        n = self.s.ike_sas * self.s.children
        peer = self.start("peer", python_argv("bench.demo", "peer", "--config",
                                              str(self.peer_path), "--pps", str(self.s.pps),
                                              "--seconds", str(self.s.traffic), "--size",
                                              str(self.s.size)),
                          stdout_pipe=True)
        self.event(f"started our peer (pid {peer.pid}): {self.s.ike_sas} IKE SAs with "
                   f"{self.s.children} children each ({n} child SAs, "
                   f"{', '.join(ESPS)})")

        def read(out: IO[bytes]) -> None:
            for line in out:
                with contextlib.suppress(ValueError):
                    self.peer_events.put(json.loads(line))
            self.peer_events.put({"event": "exit"})

        if peer.proc.stdout is None:
            raise RuntimeError("the peer was started without a stdout pipe")
        threading.Thread(target=read, args=(peer.proc.stdout,), daemon=True).start()
        return peer

    def peer_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.peer_events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def wait_up(self, peer: Proc) -> None:
        end = time.monotonic() + PEER_UP_S + 5
        while True:
            e = self.peer_event(end - time.monotonic())
            if e is None or e["event"] == "exit":
                raise DemoFailed("our peer did not bring the SAs up\n" + peer.tail(TAIL_CHARS))
            if e["event"] == "up":
                self.up = e
                break
        want = self.s.ike_sas * self.s.children
        if not e["ok"] or e["children_up"] != want:
            raise DemoFailed(f"our peer: {e.get('summary')}\n" + peer.tail(TAIL_CHARS) + "\n"
                             + self.cluster_tail())
        self.event(f"{e['ike_sas_up']} IKE SAs and {e['children_up']} child SAs up in "
                   f"{e['elapsed_s']:.2f} s", "green")
        # the cluster's side of it: its events, per member that owns the IKE SAs
        end = time.monotonic() + 5
        while time.monotonic() < end and self.seen.get(EventType.CHILD_UP, 0) < want:
            self.read_events()
            time.sleep(0.1)
        per = ", ".join(f"member {m}: {n}" for m, n in sorted(self.ike_up.items()))
        self.event(f"the cluster's events: {self.seen.get(EventType.IKE_UP, 0)} IKE SAs up "
                   f"({per}), {self.seen.get(EventType.CHILD_UP, 0)} child SAs up")
        # the members report their SAs with the next heartbeats
        end = time.monotonic() + 5
        while time.monotonic() < end:
            st = self.poll()
            if st and sum(m["child_sas"] for m in st["members"]) == want:
                break
            time.sleep(0.1)
        self.sas_before = self.control.try_request("sas", timeout=3.0) if self.control else None
        ike = _ike_sas(self.sas_before)
        where = ", ".join(f"{name} on {sa['member']}" for name, sa in sorted(ike.items()))
        self.event(f"IKE SA owners: {where}")

    def poll(self) -> dict[str, Any] | None:
        """One ``status``; updates the member views and notes what changed."""
        if self.control is None:
            return None
        st = self.control.try_request("status", timeout=1.0)
        if st is None:
            return None
        now = time.monotonic()
        dt = (now - self.last_poll) if self.last_poll else 0.0
        if dt >= 0.2 or not self.last_poll:
            self.last_poll = now
        self.epoch = st["cluster"]["epoch"]
        for m in st["members"]:
            v = self.views.setdefault(m["id"], MemberView(m["id"]))
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
        self.status = st
        return st

    def tick(self, live_refresh: Callable[[], None]) -> None:
        fo = self.fo
        self.read_events()
        st = self.poll()
        if st is not None and fo.killed_at is not None:
            v = self.views[fo.member]
            if fo.dead_at is None and not v.alive:
                self.milestone_dead(time.monotonic())
            if fo.rejoined_at is None and v.alive and v.pid != fo.pid:
                self.milestone_rejoined(time.monotonic(), v.pid, v.sender_id)
            share = SEGMENTS // self.s.members
            if fo.rejoined_at is not None and fo.balanced_at is None and v.segments >= share:
                self.milestone_balanced(time.monotonic(), v.segments)
            if fo.rejoined_at is not None and fo.balanced_at is None:
                v.note = f"rejoining {v.segments}/{share}"
            elif fo.balanced_at is not None:
                v.note = ""
            elif v.alive and fo.dead_at is None:
                v.note = "killed -9"
        live_refresh()

    def _since_kill(self, at: float) -> str:
        """"150 ms after the kill" (or before it)."""
        if self.fo.killed_at is None:
            raise RuntimeError("failover summary before the kill")
        ms = (at - self.fo.killed_at) * 1000
        span = f"{abs(ms):.0f} ms" if abs(ms) < 2000 else f"{abs(ms) / 1000:.1f} s"
        return f"{span} {'after' if ms >= 0 else 'before'} the kill"

    def read_events(self) -> None:
        """What the cluster's event stream holds since the last read."""
        if self.control is None:
            return
        while True:
            try:
                got = self.control.events(self.control.cursor, timeout=1.0)
            except ControlError:
                return
            self.control.cursor = got.next
            for logged in got.events:
                self.on_event(logged)
            if not got.events:
                return

    def on_event(self, logged: Logged) -> None:
        """One fact of the cluster: the view and the failover act take it in."""
        e, at = logged.event, logged.time + self.offset
        self.seen[e.type] = self.seen.get(e.type, 0) + 1
        if e.type is EventType.IKE_UP:
            self.ike_up[e.member] = self.ike_up.get(e.member, 0) + 1
        elif e.type in (EventType.IKE_FAILED, EventType.CHILD_FAILED):
            self.event(f"member {e.member}: {e.type.value} {e.conn} {e.child} {e.reason}",
                       "red", at=at)
        fo = self.fo
        if fo.killed_at is None or at < fo.killed_at - 1.0:
            if e.type is EventType.MEMBER_DEAD:
                self.unplanned(at, f"member {e.member} was declared dead before the kill, "
                                   "though not killed (missed heartbeats)")
            return
        m = fo.member
        if e.type is EventType.MEMBER_DEAD:
            if e.member != m:
                self.unplanned(at, f"member {e.member} was declared dead "
                                   f"{self._since_kill(at)}, though not killed (missed "
                                   "heartbeats)")
            elif fo.dead_at is None:
                self.milestone_dead(at)
        elif e.type is EventType.TAKEOVER and e.dead == m:
            fo.moved_to[e.member] = fo.moved_to.get(e.member, 0) + len(e.segments)
            fo.takeovers.append((e.member, len(e.segments), at))
            self.event(f"member {e.member} took over {len(e.segments)} segments of member {m} "
                       "(its backup replicas are live now)", "bold yellow", at=at)
        elif e.type is EventType.SEGMENTS_MOVED:
            if e.reason == "failover" and not fo.dead_epoch and fo.dead_at is not None:
                fo.dead_epoch = e.epoch
                took = ", ".join(f"member {k}: {n}" for k, n in sorted(fo.moved_to.items())) \
                    or "no member alive to take them"
                self.event(f"dispatcher: table epoch {e.epoch} moves the dead member's "
                           f"segments to their backups ({took})", at=at)
            elif e.reason == "autobalance" and e.member == m and fo.rejoined_at is not None:
                self.event(f"autobalance: epoch {e.epoch}, {len(e.segments)} segments on their "
                           f"way back to member {m}", at=at)
            elif e.reason == "balanced" and e.member == m and fo.rejoined_at is not None \
                    and fo.balanced_at is None:
                self.poll()
                self.milestone_balanced(at, self.views[m].segments)
        elif e.type is EventType.MEMBER_JOINED and e.member == m and fo.rejoined_at is None:
            self.poll()
            v = self.views.get(m)
            self.milestone_rejoined(at, v.pid if v is not None else 0, e.sender_id)
        elif e.type is EventType.CHILD_REKEYED:
            first = not fo.rekeyed
            fo.rekeyed[e.member] = fo.rekeyed.get(e.member, 0) + 1
            if first:
                self.event(f"member {e.member} rekeys a child SA it took over "
                           f"({e.conn}/{e.child} {e.child_spi} -> {e.new_spi}: "
                           "replay_after_failover = rekey)", at=at)

    def unplanned(self, at: float, text: str) -> None:
        self.others_dead.append((at, text))
        self.event(f"unplanned: {text}; its backups take over", "bold red", at=at)

    def milestone_dead(self, at: float) -> None:
        fo = self.fo
        fo.dead_at = at
        self.poll()
        self.event(f"dispatcher: member {fo.member} declared DEAD "
                   f"{self._since_kill(at)}; its {fo.segments} segments go to their backups",
                   "bold red", at=at)
        self.phase = "failover: the backups own the dead member's segments"
        self.snapshot("member dead, its backups took over")

    def milestone_rejoined(self, at: float, pid: int, sender_id: int) -> None:
        fo = self.fo
        fo.rejoined_at = at
        if fo.dead_at is None:
            fo.dead_at = at
        fo.new_pid, fo.new_sender_id = pid, sender_id
        self.event(f"member {fo.member} rejoined (pid {pid}) with a new IV sender id "
                   f"{sender_id} (was {fo.sender_id}), {self._since_kill(at)}; "
                   "autobalance starts", "yellow", at=at)
        self.phase = "rejoin: autobalance gives segments back"
        if self.sas_during is None and self.control is not None:
            self.sas_during = self.control.try_request("sas", timeout=3.0)

    def milestone_balanced(self, at: float, segments: int) -> None:
        fo = self.fo
        fo.balanced_at, fo.balanced_segments = at, segments
        st = self.poll()
        sync: dict[str, int] = next(
            (x["sync"] for x in (st or {}).get("members", []) if x["id"] == fo.member), {})
        fo.taken_back = [segments, sync.get("ike_sas_adopted", 0),
                         sync.get("child_sas_adopted", 0)]
        self.views[fo.member].note = ""
        segs = ", ".join(f"member {m.id}: {m.segments}"
                         for m in sorted(self.views.values(), key=lambda m: m.id))
        self.event(f"autobalance done: member {fo.member} has its share again ({segs}; "
                   f"epoch {self.epoch})", "green", at=at)
        self.phase = "balanced again; traffic goes on"
        self.snapshot("balanced again")

    def adopted(self) -> dict[int, tuple[int, int]]:
        """Every member's (IKE SAs, child SAs) adopted so far (its sync counters:
        what it took over, at a failover or a handover)."""
        st = self.status or {}
        return {m["id"]: (m["sync"].get("ike_sas_adopted", 0),
                          m["sync"].get("child_sas_adopted", 0))
                for m in st.get("members", [])}

    def kill(self) -> None:
        """SIGKILL to the member owning the most IKE SAs."""
        alive = [v for v in self.views.values() if v.alive]
        if not alive:
            raise DemoFailed("no member alive to kill")
        victim = max(alive, key=lambda v: (v.ike_sas, v.child_sas, -v.id))
        fo = self.fo
        fo.member, fo.pid, fo.sender_id = victim.id, victim.pid, victim.sender_id
        fo.ike_sas, fo.child_sas, fo.segments = victim.ike_sas, victim.child_sas, victim.segments
        fo.adopted_before = self.adopted()
        self.snapshot("before the kill")
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            raise DemoFailed(f"member {victim.id} (pid {victim.pid}) was not there to kill")\
                from None
        fo.killed_at = time.monotonic()
        victim.note = "killed -9"
        self.phase = f"kill -9 member {victim.id}"
        self.event(f"kill -9 member {victim.id} (pid {victim.pid}): it owns "
                   f"{victim.ike_sas} IKE SAs, carries {victim.child_sas} child SAs and "
                   f"{victim.segments} segments", "bold red")

    def show(self, peer: Proc) -> None:
        """The traffic act: live table, the kill, until the peer is done."""
        from rich.live import Live

        def run(refresh: Callable[[], None]) -> None:
            next_tick = time.monotonic()
            while True:
                e = self.peer_event(next_tick - time.monotonic())
                if e is not None:
                    kind = e["event"]
                    if kind == "traffic":
                        self.t0 = e["t0"]
                        self.phase = "traffic"
                        self.event(f"traffic: {self.s.pps:.0f} inner packets/s round-robin "
                                   f"through {len(e['children'])} children for "
                                   f"{self.s.traffic:g} s, each echoed back; kill in "
                                   f"{self.s.kill_after:g} s")
                    elif kind == "progress":
                        self.peer_sent, self.peer_echoed = e["sent"], e["echoed"]
                    elif kind == "done":
                        self.done = e
                        self.peer_sent, self.peer_echoed = e["sent"], e["echoed"]
                    elif kind == "exit" and self.done is None:
                        raise DemoFailed("our peer exited during the traffic\n"
                                         + peer.tail(TAIL_CHARS))
                    continue
                next_tick = time.monotonic() + 1.0 / REFRESH_HZ
                self.tick(refresh)
                self.check_deadlines()
                if (self.t0 is not None and self.fo.killed_at is None
                        and time.monotonic() >= self.t0 + self.s.kill_after):
                    self.kill()
                    refresh()
                if self.done is not None and not peer.alive() and (
                        self.fo.killed_at is None or self.fo.balanced_at is not None):
                    return

        if self.live_mode:
            with Live(self.render(), console=self.console, refresh_per_second=REFRESH_HZ,
                      transient=False) as live:
                run(lambda: live.update(self.render()))
        else:
            run(lambda: None)
        # the SAs once more, after everything settled
        self.sas_after = self.control.try_request("sas", timeout=3.0) if self.control else None
        self.tick(lambda: None)
        self.phase = "the end"
        self.snapshot("at the end")

    def check_deadlines(self) -> None:
        fo = self.fo
        if fo.killed_at is None:
            return
        since = time.monotonic() - fo.killed_at
        if fo.dead_at is None and since > DEAD_WITHIN_S:
            raise DemoFailed(f"member {fo.member} was killed {since:.1f} s ago and the "
                             "dispatcher has not declared it dead\n" + self.cluster_tail())
        if fo.rejoined_at is None and since > RESTART_WITHIN_S:
            raise DemoFailed(f"member {fo.member} was not restarted within "
                             f"{RESTART_WITHIN_S:g} s\n" + self.cluster_tail())
        if fo.balanced_at is None and since > BALANCED_WITHIN_S:
            raise DemoFailed(f"autobalance did not give member {fo.member} its segments back "
                             f"within {BALANCED_WITHIN_S:g} s\n" + self.cluster_tail())

    # -- the verdict -----------------------------------------------------------------------

    def verdict(self) -> tuple[list[str], list[str]]:
        """(summary lines, failures)."""
        s, fo, d = self.s, self.fo, self.done or {}
        lines: list[str] = []
        bad: list[str] = []
        want_ike, want_child = s.ike_sas, s.ike_sas * s.children
        lines.append(f"cluster        {s.members} members at {GW}:{self.gw_ports[0]}, "
                     f"{SEGMENTS} segments, final epoch {self.epoch}")
        lines.append(f"IKE SAs        {self.up.get('ike_sas_up', 0)}/{want_ike} up, "
                     f"{self.up.get('children_up', 0)}/{want_child} child SAs "
                     f"({', '.join(ESPS)})")
        if not d:
            lines.append(f"traffic        not finished: {self.peer_sent} packets sent, "
                         f"{self.peer_echoed} echoed back so far")
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
        k = fo.killed_at - self.t_start
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
        now = self.adopted()
        for member, segments, at in fo.takeovers:
            ike0, child0 = fo.adopted_before.get(member, (0, 0))
            ike1, child1 = now.get(member, (ike0, child0))
            lines.append(f"               member {member} took over {segments} segments: "
                         f"{ike1 - ike0} IKE SAs, {child1 - child0} child SAs "
                         f"({self._since_kill(at)})")
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
        lines += self._loss(bad)
        lines += self._same_sas(bad)
        return lines, bad

    def _loss(self, bad: list[str]) -> list[str]:
        fo, d = self.fo, self.done or {}
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
                             for t, _ in self.others_dead)]
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
                    if self.others_dead else "") + f"{n_stray} elsewhere"]
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

    def _same_sas(self, bad: list[str]) -> list[str]:
        before, after = _ike_sas(self.sas_before), _ike_sas(self.sas_after)
        during = _ike_sas(self.sas_during)
        fo = self.fo
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
        spis_before, spis_after = _child_spis(self.sas_before), _child_spis(self.sas_after)
        kept = len(spis_before & spis_after)
        lines.append(f"child SAs      {children_after} after the failover: {kept} unchanged, "
                     f"{len(spis_after - spis_before)} rekeyed by their new owner "
                     f"(replay_after_failover = rekey); "
                     f"{len(_esp_carriers(self.sas_after))} carried by the members")
        lines.append(f"drops          {self._drops()}")
        want = self.s.ike_sas
        if len(before) != want:
            bad.append(f"sas before the kill listed {len(before)} IKE SAs, not {want}")
        if len(same) != len(before) or len(after) != len(before):
            changed = sorted(set(before) ^ set(same)) or sorted(set(after) ^ set(before))
            bad.append(f"IKE SAs changed over the failover: {', '.join(changed) or '?'}")
        if children_after != want * self.s.children:
            bad.append(f"{children_after} child SAs after the failover, not "
                       f"{want * self.s.children}")
        return lines

    def causes(self) -> list[str]:
        """Members declared dead that we did not kill, and why that may be."""
        out = [text for _, text in self.others_dead]
        if out:
            with contextlib.suppress(OSError):
                out.append(f"the machine is busy? load average {os.getloadavg()[0]:.1f} on "
                           f"{os.cpu_count()} CPUs (a member is dead after 3 missed heartbeats, "
                           "150 ms by default)")
        return out

    def _drops(self) -> str:
        """The cluster's nonzero drop counters at the end (members as they are
        now: a restarted member starts from zero)."""
        st = self.status or {}
        parts = [f"dispatcher {k}={v}" for k, v in
                 sorted(st.get("dispatcher", {}).get("drops", {}).items()) if v]
        for m in st.get("members", []):
            parts += [f"member {m['id']} {k}={v}" for k, v in sorted(m["drops"].items()) if v]
        return ", ".join(parts) or "none"

    # -- all of it -------------------------------------------------------------------------

    def run(self) -> int:
        failure: str | None = None
        interrupted = False
        lines: list[str] = []
        bad: list[str] = []
        self.event(f"[bold]make demo[/]: a {self.s.members}-member cluster on "
                   f"loopback, our peer with {self.s.ike_sas} IKE SAs, traffic through an "
                   f"echo, and a member killed with SIGKILL after {self.s.kill_after:g} s "
                   "(Ctrl-C stops it cleanly)")
        try:
            with _signals_raise():
                try:
                    self.setup()
                    peer = self.start_peer()
                    self.wait_up(peer)
                    self.show(peer)
                    lines, bad = self.verdict()
                except DemoFailed as exc:
                    failure = str(exc)
                    with contextlib.suppress(Exception):
                        lines, _ = self.verdict()
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
        finally:
            # a second Ctrl-C must not leave processes behind; stopping is bounded
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                if self.control is not None:
                    self.control.close()
                started = len(self.procs)
                left = self.procs.close()
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        stopped = (f"stopped {started} process groups we started "
                   f"(echo, cluster with its members, peer)")
        if left:
            bad.append(f"still running after SIGKILL: {', '.join(left)}")
        self.console.print()
        self.console.print("[bold]Summary[/]")
        for line in lines:
            self.console.print("  " + line, markup=False)
        self.console.print(f"  processes      {stopped}; "
                           f"{'nothing left running' if not left else 'LEFT: ' + str(left)}",
                           markup=False)
        elapsed = self.now()
        if interrupted:
            self.console.print(f"  result         INTERRUPTED after {elapsed:.0f} s; "
                               f"logs in {self.workdir}", markup=False)
            return 130
        warnings = self.causes()
        for cause in warnings:
            self.console.print(f"  warning        {cause}", markup=False)
        if failure is not None or bad:
            reasons = [failure.splitlines()[0]] if failure else []
            reasons += bad
            self.console.print(f"  result         FAILED: {'; '.join(reasons)}", markup=False)
            if failure and "\n" in failure:
                self.console.print(failure.split("\n", 1)[1], markup=False)
            self.console.print(f"  logs and configs kept in {self.workdir}", markup=False)
            return 1
        note = f" (see the {len(warnings)} warnings above)" if warnings else ""
        self.console.print(f"  result         OK: every check passed in {elapsed:.0f} s{note}",
                           markup=False)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return 0


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo like Ctrl-C (everything gets stopped).
    Ctrl-C too, even where SIGINT came in ignored (a background job)."""
    def raise_(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    old = {sig: signal.signal(sig, raise_) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_cluster_demo(*, quick: bool = False, keep: bool = False, console: Any = None) -> int:
    """``make demo``: the whole show; 0 when every check passed."""
    schedule = QUICK if quick or os.environ.get("IPSEC_CLUSTER_DEMO_QUICK") == "1" else FULL
    return Demo(schedule, console=console, keep=keep).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.demo`` (``make demo``); ``peer ARGS``: the demo's peer process."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        return _peer_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=(
        "a self-contained demonstration (make demo): a 3-member cluster on loopback, "
        "our peer's traffic, a member killed and the failover"))
    parser.add_argument("--quick", action="store_true",
                        help="a shortened schedule (~20 s; also IPSEC_CLUSTER_DEMO_QUICK=1)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (configs, logs) also when it worked")
    parser.add_argument("--esp", action="store_true",
                        help="instead: the in-memory ESP demonstration (transforms, replay, IVs)")
    args = parser.parse_args(argv)
    if args.esp:
        from bench.esp_demo import run_demo

        return int(run_demo())
    return run_cluster_demo(quick=args.quick, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
