"""The demo's scenario: what happens and when (``make demo``, ``python -m bench.demo``).

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

The demo is this scenario (the acts above, recording what happened into
``facts.Facts``), a view (``view``: the table and the event lines) and a
verdict (``verdict``: the summary and its checks, functions of the facts) on
top of the harness (bench/harness/): its processes, configs and control
client are the ones the tests and the benchmarks use. Our peer is ``peer``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from bench.demo.facts import (
    BALANCED_WITHIN_S,
    CLUSTER_UP_S,
    DEAD_WITHIN_S,
    ESPS,
    FULL,
    GW,
    PEER,
    PEER_UP_S,
    PSK,
    QUICK,
    REFRESH_HZ,
    RESTART_WITHIN_S,
    SEGMENTS,
    TAIL_CHARS,
    Facts,
    Schedule,
    adopted,
    member_status,
)
from bench.demo.verdict import causes, ike_sas, verdict
from bench.demo.view import View
from bench.harness import configs
from bench.harness.control import ControlClient
from bench.harness.net import free_udp_ports
from bench.harness.procs import Proc, Procs, cli_argv, python_argv
from common.cluster.events import EventType, Logged
from dispatcher.operator import ControlError


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


class Scenario:
    """The demo's acts, run through the harness; what happened goes into
    ``self.f`` (the facts), what the operator sees through ``self.view``."""

    def __init__(self, schedule: Schedule, *, console: Any = None,
                 keep: bool = False) -> None:
        self.s = schedule
        self.f = Facts(schedule, t_start=time.monotonic())
        self.view = View(self.f, console)
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="ipsec-cluster-demo-"))
        self.procs = Procs(self.workdir)
        self.control: ControlClient | None = None
        #: time.monotonic() - time.time(): an event's time (Unix) on our clock
        self.offset = time.monotonic() - time.time()
        self.cluster: Proc | None = None
        self.peer_events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.config_path = self.workdir / "cluster.toml"
        self.peer_path = self.workdir / "peer.toml"

    # -- processes -------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], *, stdout_pipe: bool = False) -> Proc:
        return self.procs.start(name, argv, stdout_pipe=stdout_pipe)

    def cluster_tail(self) -> str:
        return self.cluster.tail(TAIL_CHARS) if self.cluster is not None else ""

    # -- the acts --------------------------------------------------------------------------

    def setup(self) -> None:
        ports = free_udp_ports(7, (GW, PEER))
        self.f.gw_ports = (ports[0], ports[1])
        peer_ports = (ports[2], ports[3])
        echo_port, gw_bind, peer_inside = ports[4], ports[5], ports[6]
        cluster, peer = _configs(self.s, gw_ports=self.f.gw_ports, peer_ports=peer_ports,
                                 echo_port=echo_port, gw_bind=gw_bind, peer_inside=peer_inside,
                                 run=self.workdir / "run")
        self.config_path.write_text(cluster)
        self.peer_path.write_text(peer)
        gw = self.f.gw_ports
        self.view.event(f"work directory {self.workdir} (configs and logs); cluster at "
                        f"{GW} ports {gw[0]}/{gw[1]}, peer at {PEER} ports "
                        f"{peer_ports[0]}/{peer_ports[1]}, inner echo at {GW}:{echo_port}")
        self.start("echo", python_argv("dispatcher.peer", "echo", f"{GW}:{echo_port}"))
        self.cluster = self.start("cluster", cli_argv("run", "--config", str(self.config_path)))
        self.control = ControlClient(config=self.config_path)
        self.view.event(f"started the cluster: dispatcher pid {self.cluster.pid} with "
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
        segs = ", ".join(f"member {v.id}: {v.segments}" for v in self.view.members.values())
        self.view.event(f"{self.s.members} members joined, segment table epoch {self.f.epoch} "
                        f"({segs} segments of {SEGMENTS})", "green")

    def start_peer(self) -> Proc:
        n = self.s.ike_sas * self.s.children
        peer = self.start("peer", python_argv("bench.demo", "peer", "--config",
                                              str(self.peer_path), "--pps", str(self.s.pps),
                                              "--seconds", str(self.s.traffic), "--size",
                                              str(self.s.size)),
                          stdout_pipe=True)
        self.view.event(f"started our peer (pid {peer.pid}): {self.s.ike_sas} IKE SAs with "
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
                self.f.up = e
                break
        want = self.s.ike_sas * self.s.children
        if not e["ok"] or e["children_up"] != want:
            raise DemoFailed(f"our peer: {e.get('summary')}\n" + peer.tail(TAIL_CHARS) + "\n"
                             + self.cluster_tail())
        self.view.event(f"{e['ike_sas_up']} IKE SAs and {e['children_up']} child SAs up in "
                        f"{e['elapsed_s']:.2f} s", "green")
        # the cluster's side of it: its events, per member that owns the IKE SAs
        end = time.monotonic() + 5
        while time.monotonic() < end and self.f.seen.get(EventType.CHILD_UP, 0) < want:
            self.read_events()
            time.sleep(0.1)
        per = ", ".join(f"member {m}: {n}" for m, n in sorted(self.f.ike_up.items()))
        self.view.event(f"the cluster's events: {self.f.seen.get(EventType.IKE_UP, 0)} IKE SAs up "
                        f"({per}), {self.f.seen.get(EventType.CHILD_UP, 0)} child SAs up")
        # the members report their SAs with the next heartbeats
        end = time.monotonic() + 5
        while time.monotonic() < end:
            st = self.poll()
            if st and sum(m["child_sas"] for m in st["members"]) == want:
                break
            time.sleep(0.1)
        self.f.sas_before = self.control.try_request("sas", timeout=3.0) if self.control else None
        ike = ike_sas(self.f.sas_before)
        where = ", ".join(f"{name} on {sa['member']}" for name, sa in sorted(ike.items()))
        self.view.event(f"IKE SA owners: {where}")

    def poll(self) -> dict[str, Any] | None:
        """One ``status``: the facts and the member views take it in."""
        if self.control is None:
            return None
        st = self.control.try_request("status", timeout=1.0)
        if st is None:
            return None
        self.f.epoch = st["cluster"]["epoch"]
        self.view.update(st)
        self.f.status = st
        return st

    def tick(self, live_refresh: Callable[[], None]) -> None:
        fo = self.f.fo
        self.read_events()
        st = self.poll()
        if st is not None and fo.killed_at is not None:
            v = member_status(st, fo.member)
            if v is None:
                raise KeyError(fo.member)
            if fo.dead_at is None and not v["alive"]:
                self.milestone_dead(time.monotonic())
            if fo.rejoined_at is None and v["alive"] and v["pid"] != fo.pid:
                self.milestone_rejoined(time.monotonic(), v["pid"], v["sender_id"])
            share = SEGMENTS // self.s.members
            if fo.rejoined_at is not None and fo.balanced_at is None and v["segments"] >= share:
                self.milestone_balanced(time.monotonic(), v["segments"])
        live_refresh()

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
        self.f.seen[e.type] = self.f.seen.get(e.type, 0) + 1
        if e.type is EventType.IKE_UP:
            self.f.ike_up[e.member] = self.f.ike_up.get(e.member, 0) + 1
        elif e.type in (EventType.IKE_FAILED, EventType.CHILD_FAILED):
            self.view.event(f"member {e.member}: {e.type.value} {e.conn} {e.child} {e.reason}",
                            "red", at=at)
        fo = self.f.fo
        if fo.killed_at is None or at < fo.killed_at - 1.0:
            if e.type is EventType.MEMBER_DEAD:
                self.unplanned(at, f"member {e.member} was declared dead before the kill, "
                                   "though not killed (missed heartbeats)")
            return
        m = fo.member
        if e.type is EventType.MEMBER_DEAD:
            if e.member != m:
                self.unplanned(at, f"member {e.member} was declared dead "
                                   f"{fo.since_kill(at)}, though not killed (missed "
                                   "heartbeats)")
            elif fo.dead_at is None:
                self.milestone_dead(at)
        elif e.type is EventType.TAKEOVER and e.dead == m:
            fo.moved_to[e.member] = fo.moved_to.get(e.member, 0) + len(e.segments)
            fo.takeovers.append((e.member, len(e.segments), at))
            self.view.event(f"member {e.member} took over {len(e.segments)} segments of member {m} "
                            "(its backup replicas are live now)", "bold yellow", at=at)
        elif e.type is EventType.SEGMENTS_MOVED:
            if e.reason == "failover" and not fo.dead_epoch and fo.dead_at is not None:
                fo.dead_epoch = e.epoch
                took = ", ".join(f"member {k}: {n}" for k, n in sorted(fo.moved_to.items())) \
                    or "no member alive to take them"
                self.view.event(f"dispatcher: table epoch {e.epoch} moves the dead member's "
                                f"segments to their backups ({took})", at=at)
            elif e.reason == "autobalance" and e.member == m and fo.rejoined_at is not None:
                self.view.event(f"autobalance: epoch {e.epoch}, {len(e.segments)} segments on "
                                f"their way back to member {m}", at=at)
            elif e.reason == "balanced" and e.member == m and fo.rejoined_at is not None \
                    and fo.balanced_at is None:
                self.poll()
                v = member_status(self.f.status, m)
                self.milestone_balanced(at, v["segments"] if v is not None else 0)
        elif e.type is EventType.MEMBER_JOINED and e.member == m and fo.rejoined_at is None:
            self.poll()
            v = member_status(self.f.status, m)
            self.milestone_rejoined(at, v["pid"] if v is not None else 0, e.sender_id)
        elif e.type is EventType.CHILD_REKEYED:
            first = not fo.rekeyed
            fo.rekeyed[e.member] = fo.rekeyed.get(e.member, 0) + 1
            if first:
                self.view.event(f"member {e.member} rekeys a child SA it took over "
                                f"({e.conn}/{e.child} {e.child_spi} -> {e.new_spi}: "
                                "replay_after_failover = rekey)", at=at)

    def unplanned(self, at: float, text: str) -> None:
        self.f.others_dead.append((at, text))
        self.view.event(f"unplanned: {text}; its backups take over", "bold red", at=at)

    def milestone_dead(self, at: float) -> None:
        fo = self.f.fo
        fo.dead_at = at
        self.poll()
        self.view.event(f"dispatcher: member {fo.member} declared DEAD "
                        f"{fo.since_kill(at)}; its {fo.segments} segments go to their "
                        "backups",
                        "bold red", at=at)
        self.f.phase = "failover: the backups own the dead member's segments"
        self.view.snapshot("member dead, its backups took over")

    def milestone_rejoined(self, at: float, pid: int, sender_id: int) -> None:
        fo = self.f.fo
        fo.rejoined_at = at
        if fo.dead_at is None:
            fo.dead_at = at
        fo.new_pid, fo.new_sender_id = pid, sender_id
        self.view.event(f"member {fo.member} rejoined (pid {pid}) with a new IV sender id "
                        f"{sender_id} (was {fo.sender_id}), {fo.since_kill(at)}; "
                        "autobalance starts", "yellow", at=at)
        self.f.phase = "rejoin: autobalance gives segments back"
        if self.f.sas_during is None and self.control is not None:
            self.f.sas_during = self.control.try_request("sas", timeout=3.0)

    def milestone_balanced(self, at: float, segments: int) -> None:
        fo = self.f.fo
        fo.balanced_at, fo.balanced_segments = at, segments
        st = self.poll()
        sync: dict[str, int] = next(
            (x["sync"] for x in (st or {}).get("members", []) if x["id"] == fo.member), {})
        fo.taken_back = [segments, sync.get("ike_sas_adopted", 0),
                         sync.get("child_sas_adopted", 0)]
        self.view.event(f"autobalance done: member {fo.member} has its share again "
                        f"({self.view.segments()}; "
                        f"epoch {self.f.epoch})", "green", at=at)
        self.f.phase = "balanced again; traffic goes on"
        self.view.snapshot("balanced again")

    def kill(self) -> None:
        """SIGKILL to the member owning the most IKE SAs (at the last ``status``)."""
        alive = [m for m in (self.f.status or {}).get("members", []) if m["alive"]]
        if not alive:
            raise DemoFailed("no member alive to kill")
        victim = max(alive, key=lambda m: (m["ike_sas"], m["child_sas"], -m["id"]))
        fo = self.f.fo
        fo.member, fo.pid, fo.sender_id = victim["id"], victim["pid"], victim["sender_id"]
        fo.ike_sas, fo.child_sas = victim["ike_sas"], victim["child_sas"]
        fo.segments = victim["segments"]
        fo.adopted_before = adopted(self.f.status)
        self.view.snapshot("before the kill")
        try:
            os.kill(fo.pid, signal.SIGKILL)
        except ProcessLookupError:
            raise DemoFailed(f"member {fo.member} (pid {fo.pid}) was not there to kill")\
                from None
        fo.killed_at = time.monotonic()
        self.f.phase = f"kill -9 member {fo.member}"
        self.view.event(f"kill -9 member {fo.member} (pid {fo.pid}): it owns "
                        f"{fo.ike_sas} IKE SAs, carries {fo.child_sas} child SAs and "
                        f"{fo.segments} segments", "bold red")

    def show(self, peer: Proc) -> None:
        """The traffic act: live table, the kill, until the peer is done."""
        def run(refresh: Callable[[], None]) -> None:
            next_tick = time.monotonic()
            while True:
                e = self.peer_event(next_tick - time.monotonic())
                if e is not None:
                    kind = e["event"]
                    if kind == "traffic":
                        self.f.t0 = e["t0"]
                        self.f.phase = "traffic"
                        self.view.event(f"traffic: {self.s.pps:.0f} inner packets/s round-robin "
                                        f"through {len(e['children'])} children for "
                                        f"{self.s.traffic:g} s, each echoed back; kill in "
                                        f"{self.s.kill_after:g} s")
                    elif kind == "progress":
                        self.f.peer_sent, self.f.peer_echoed = e["sent"], e["echoed"]
                    elif kind == "done":
                        self.f.done = e
                        self.f.peer_sent, self.f.peer_echoed = e["sent"], e["echoed"]
                    elif kind == "exit" and self.f.done is None:
                        raise DemoFailed("our peer exited during the traffic\n"
                                         + peer.tail(TAIL_CHARS))
                    continue
                next_tick = time.monotonic() + 1.0 / REFRESH_HZ
                self.tick(refresh)
                self.check_deadlines()
                if (self.f.t0 is not None and self.f.fo.killed_at is None
                        and time.monotonic() >= self.f.t0 + self.s.kill_after):
                    self.kill()
                    refresh()
                if self.f.done is not None and not peer.alive() and (
                        self.f.fo.killed_at is None or self.f.fo.balanced_at is not None):
                    return

        self.view.live(run)
        # the SAs once more, after everything settled
        self.f.sas_after = self.control.try_request("sas", timeout=3.0) if self.control else None
        self.tick(lambda: None)
        self.f.phase = "the end"
        self.view.snapshot("at the end")

    def check_deadlines(self) -> None:
        fo = self.f.fo
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

    # -- all of it -------------------------------------------------------------------------

    def run(self) -> int:
        failure: str | None = None
        interrupted = False
        lines: list[str] = []
        bad: list[str] = []
        self.view.event(f"[bold]make demo[/]: a {self.s.members}-member cluster on "
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
                    lines, bad = verdict(self.f)
                except DemoFailed as exc:
                    failure = str(exc)
                    with contextlib.suppress(Exception):
                        lines, _ = verdict(self.f)
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
        self.view.summary(lines)
        self.view.line(f"processes      {stopped}; "
                       f"{'nothing left running' if not left else 'LEFT: ' + str(left)}")
        elapsed = self.view.now()
        if interrupted:
            self.view.line(f"result         INTERRUPTED after {elapsed:.0f} s; "
                           f"logs in {self.workdir}")
            return 130
        warnings = causes(self.f)
        for cause in warnings:
            self.view.line(f"warning        {cause}")
        if failure is not None or bad:
            reasons = [failure.splitlines()[0]] if failure else []
            reasons += bad
            self.view.line(f"result         FAILED: {'; '.join(reasons)}")
            if failure and "\n" in failure:
                self.view.line(failure.split("\n", 1)[1], indent="")
            self.view.line(f"logs and configs kept in {self.workdir}")
            return 1
        note = f" (see the {len(warnings)} warnings above)" if warnings else ""
        self.view.line(f"result         OK: every check passed in {elapsed:.0f} s{note}")
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
    return Scenario(schedule, console=console, keep=keep).run()


