"""``ipsec-cluster run`` with ``members > 1`` (or a ``sync`` endpoint): a
small supervisor process that is not the dispatcher.

It holds what must outlive a dispatcher (docs/design.md "Processes"): the
cluster's UDP sockets (every socket of the steered SO_REUSEPORT groups, slot
0 included: the kernel keeps steering while they are open, and first
IKE_SA_INITs queue on slot 0 while no dispatcher reads it), the inside TUN
device with its policy rules, the members' TUN devices (and so the routes
through them), the dispatcher's CURVE key pair and the run directory. It
starts the dispatcher (``ipsec-cluster dispatcher``, dispatcher/process.py)
and the members as its own children, hands the dispatcher what it holds
(dispatcher/handoff.py) and every member's key, restarts either when it
exits (with a backoff), tells the dispatcher of every member's exit at once
(its pidfd: the fence) and ends a member the dispatcher declared dead.
A dispatcher's death (kill -9) ends no member and no SA: the members are
not its children, and the next dispatcher adopts them.

SIGINT/SIGTERM stop everything cleanly: the dispatcher has the members
delete every IKE SA with its peer first, then the members, the dispatcher,
and last what the supervisor holds (sockets, devices, routes, rules). SIGHUP
is passed to the dispatcher (it reloads the connections).

Two dispatcher hosts (docs/failover.md "Two dispatcher hosts"): with
``cluster.role = "standby"`` the dispatcher starts as the standby; SIGUSR1
(keepalived's notify on MASTER) makes it active, SIGUSR2 (BACKUP, FAULT)
ends an active one and starts a standby in its place (nothing deleted: the
members follow the other host). Our pid is in ``supervisor.pid`` in the run
directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from common.cluster.segments import SegmentTable
from common.config import Config
from common.errors import StartupError
from dispatcher.cluster import CONTROL_TIMEOUT_S, open_ports
from dispatcher.control import control_endpoint as control_endpoint  # (cli, tests, demo)
from dispatcher.control import run_dir as run_dir
from dispatcher.handoff import OPS_TO_SUPERVISOR, Channel, GroupFds, Handoff
from dispatcher.process import STOP_GRACE_S, load_server_curve
from dispatcher.process import members_endpoint as members_endpoint  # (tests)
from dispatcher.trust import secure_run_dir
from member.inside import make_inside
from member.reuseport import SteeringGroup
from member.tun import TunDevice, TunError
from member.tuns import MemberTuns

log = logging.getLogger("ipsec_cluster.supervisor")

#: a member that exits is started again after a delay that doubles from
#: RESTART_DELAY_S up to RESTART_DELAY_MAX_S; a member that ran STABLE_RUN_S
#: without failing starts the series again, and after GIVE_UP_AFTER quick
#: failures in a row the supervisor stops (one line naming the member)
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0
STABLE_RUN_S = 60.0
GIVE_UP_AFTER = 8
#: set (to 1) to leave the members running when the supervisor dies
#: (off by default: members die with their supervisor, member/process.py)
KEEP_MEMBERS_ENV = "IPSEC_CLUSTER_KEEP_MEMBERS"
#: the supervisor's pid, handed to the members it starts
PARENT_ENV = "IPSEC_CLUSTER_SUPERVISOR_PID"
#: a dispatcher that exits is started again after DISPATCHER_RESTART_S (at
#: once: established SAs do not need it, new IKE SAs do), doubling on quick
#: failures in a row like a member's
DISPATCHER_RESTART_S = 0.05
#: how long a started member's key may take to reach the dispatcher
KEY_ACK_S = 2.0
#: a clean stop: how long the dispatcher may take for the Deletes, then SIGKILL
DISPATCHER_STOP_S = STOP_GRACE_S + CONTROL_TIMEOUT_S + 3.0
SOCKETS = ("control.ipc", "members.ipc")
#: our pid, for keepalived's notify scripts (SIGUSR1: active, SIGUSR2: standby)
PID_FILE = "supervisor.pid"
#: how often the supervisor looks at its members' processes (the exit of a
#: member is seen at once through its pidfd; this poll is the fallback where
#: pidfd_open(2) is missing, Linux < 5.3, and starts the restarts)
POLL_S = 0.2


@dataclass(slots=True)
class Backoff:
    """Restart delays of one member: exponential, reset by a stable run."""

    initial_s: float = RESTART_DELAY_S
    max_s: float = RESTART_DELAY_MAX_S
    stable_s: float = STABLE_RUN_S
    give_up_after: int = GIVE_UP_AFTER
    failures: int = 0

    def exited(self, ran_s: float) -> float | None:
        """The delay before the next start, or None: give up."""
        if ran_s >= self.stable_s:
            self.failures = 0
        self.failures += 1
        if self.failures > self.give_up_after:
            return None
        return float(min(self.max_s, self.initial_s * 2.0 ** (self.failures - 1)))


class _Member:
    """One member incarnation: its process, start time and last stderr line
    (a thread copies its stderr to ours and keeps the last line)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.started = time.monotonic()
        self.last_line = ""
        self.copier: threading.Thread | None = None
        if proc.stderr is not None:
            self.copier = threading.Thread(target=self._copy, args=(proc.stderr,), daemon=True,
                                           name=f"stderr-{proc.pid}")
            self.copier.start()

    def last(self) -> str:
        """Its last stderr line, once the copy has read all of it (the exit
        may be seen before the pipe's end)."""
        if self.copier is not None:
            self.copier.join(timeout=1.0)
        return self.last_line

    def _copy(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace")
            if text.strip():
                self.last_line = text.strip()
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(text)
                sys.stderr.flush()


class _DispatcherInc:
    """One dispatcher incarnation: its process, our end of its channel,
    whether it said ``ready`` (or why it failed)."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.proc = proc
        self.channel = channel
        self.started = time.monotonic()
        self.ready = False
        self.error = ""
        #: set when it is ready or gone (the first start waits on it)
        self.settled = asyncio.Event()
        self.key_waiters: dict[int, asyncio.Future[None]] = {}
        self.task: asyncio.Future[None] | None = None
        #: the run's first: its failure to start is the run's (a StartupError)
        self.first = False
        #: ended by us to stand down (a standby starts at once, no backoff)
        self.deposed = False


class Supervisor:
    #: keep a warm spare dispatcher (tests turn it off to measure without)
    use_spare = True
    #: the command of a member (tests replace it)
    member_command: tuple[str, ...] = (sys.executable, "-m", "dispatcher.cli", "member")
    #: the command of the dispatcher (tests replace it)
    dispatcher_command: tuple[str, ...] = (sys.executable, "-m", "dispatcher.cli", "dispatcher")
    #: learn of a member's exit through its pidfd, at once (False: only the
    #: POLL_S poll, as where pidfd_open(2) is missing; the benches compare)
    use_pidfd: bool = True

    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.dir = run_dir(config, config_path)
        secure_run_dir(self.dir, SOCKETS)
        self.endpoint = members_endpoint(config, config_path)
        # CURVE on every transport (docs/design.md "Trust model"): without
        # configured keys (ipc://) a key pair of this run, the same for every
        # dispatcher incarnation (members keep it across a restart); the
        # members we start get a key pair each.
        if self.endpoint.startswith("tcp://") or config.cluster.curve_secret_key:
            public, secret, _ = load_server_curve(config, config_path)
            self.curve = (public, secret)
        else:
            self.curve = zmq.curve_keypair()
        #: the members we start on this host (their own steered sockets)
        self.local = tuple(range(1, config.cluster.members + 1)) \
            if self.endpoint.startswith("ipc://") else ()
        # what outlives a dispatcher (opened in ``run``)
        self.groups: dict[int, SteeringGroup] = {}
        self.plain: dict[int, socket.socket] = {}
        self.steering_off = ""
        self.inside: TunDevice | None = None
        self.tuns: MemberTuns | None = None
        self.tuns_off = ""
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.incarnations: dict[int, _Member] = {}
        #: member id -> the public key of its current incarnation
        self.member_keys: dict[int, bytes] = {}
        self.backoff: dict[int, Backoff] = {}
        #: member id -> when (monotonic) it is to be started again
        self.restart_at: dict[int, float] = {}
        #: pids we ended because they stalled: not a failure of the member's
        #: start (a loaded machine must not make us give up)
        self.stalled: set[int] = set()
        self.dispatcher: _DispatcherInc | None = None
        self.dispatcher_backoff = Backoff(initial_s=DISPATCHER_RESTART_S)
        self.dispatcher_restart_at: float | None = None
        #: the warm spare dispatcher: started, waiting for a handoff
        self.spare: tuple[subprocess.Popen[bytes], socket.socket] | None = None
        self._restarting: asyncio.Future[Any] | None = None
        #: dispatcher incarnations started so far
        self.dispatchers = 0
        self.stopping = False
        #: the one line why we stopped on our own (a process that keeps failing)
        self.gave_up: str | None = None
        self._stop_requested = asyncio.Event()
        #: how reload reads the file (the dispatcher's now; kept for the CLI)
        self.read_config: Callable[[str], Config] = lambda path: config
        #: pid -> the pidfd of a member process we watch (closed once it exited)
        self.pidfds: dict[int, int] = {}
        #: why exits are polled instead (logged once), None while pidfds work
        self._no_pidfd: str | None = None
        #: two dispatcher hosts: the role our dispatcher has (a restarted one
        #: gets it in its handoff)
        self.role: str = config.cluster.role

    def new_backoff(self) -> Backoff:
        return Backoff()

    # -- what outlives a dispatcher ----------------------------------------------------

    def _open(self) -> None:
        """The ports, the inside TUN and the members' TUN devices; a
        StartupError (one line) for what cannot be had."""
        c = self.config.cluster
        self.groups, self.plain, self.steering_off = open_ports(
            self.config, self.local, SegmentTable(c.segment_bits))
        if c.inside.kind == "tun":
            address = str(c.inside_address) if c.inside_address is not None else None
            routes = [n for conn in self.config.connections.values()
                      for ch in conn.children.values() for n in ch.remote_nets]
            made = make_inside(c.inside, address=address, routes=routes)
            if isinstance(made, TunDevice):
                made.open()
                self.inside = made
        inside = self.inside
        if inside is None:
            self.tuns_off = f"the inside is {c.inside.kind}, not a TUN device"
        elif not self.endpoint.startswith("ipc://"):
            self.tuns_off = f"members may join from other hosts ({self.endpoint})"
        else:
            tuns = MemberTuns(inside.name, c.members, inside.mtu)
            try:
                tuns.open()
            except (TunError, OSError, subprocess.SubprocessError) as exc:
                self.tuns_off = f"cannot create the per-member TUN devices: {exc}"
            else:
                self.tuns = tuns

    def _close(self) -> None:
        """A clean stop, last: the sockets (the groups go), the members' TUN
        devices (the kernel removes them with every route through them), the
        inside TUN with its routes and rules."""
        for group in self.groups.values():
            group.close()
        for sock in self.plain.values():
            sock.close()
        self.groups, self.plain = {}, {}
        if self.tuns is not None:
            self.tuns.close()
            self.tuns = None
        if self.inside is not None:
            self.inside.close()
            self.inside = None

    def _handoff(self) -> Handoff:
        running = {m: p.pid for m, p in self.procs.items()
                   if m not in self.restart_at and p.poll() is None}
        tuns = dict(self.tuns.devices) if self.tuns is not None else {}
        return Handoff(
            supervisor_pid=os.getpid(), curve_public=self.curve[0].decode(),
            curve_secret=self.curve[1].decode(),
            member_keys={m: k.decode() for m, k in self.member_keys.items()},
            running=running, first=self.dispatchers == 1,
            groups=[GroupFds(port, g.address[0], g.natt, [s.fileno() for s in g.sockets],
                             list(g.members)) for port, g in sorted(self.groups.items())],
            plain={port: s.fileno() for port, s in self.plain.items()},
            steering_off=self.steering_off,
            inside_fd=self.inside.fd if self.inside is not None else None,
            inside_name=self.inside.name if self.inside is not None else "",
            tuns=tuns, tuns_base=self.tuns.base if self.tuns is not None else "",
            tuns_mtu=self.tuns.mtu if self.tuns is not None else 0, tuns_off=self.tuns_off,
            role=self.role)

    # -- the dispatcher ------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(PARENT_ENV, None)
        if not os.environ.get(KEEP_MEMBERS_ENV):
            env[PARENT_ENV] = str(os.getpid())  # the child dies with us
        return env

    def _spawn_dispatcher(self, *, spare: bool) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """A dispatcher process and our end of its channel. ``spare``: it
        starts, imports and reads the config, then waits for its handoff
        as long as it takes (the warm spare)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [*self.dispatcher_command, "--config", self.config_path,
                "--channel-fd", str(theirs.fileno()), *(["--spare"] if spare else [])]
        try:
            proc = subprocess.Popen(argv, env=self._child_env(),
                                    pass_fds=(theirs.fileno(), *self._handoff().fds()))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return proc, ours

    def _make_spare(self) -> None:
        """Keep one dispatcher process started and waiting (its Python
        start-up, 0.6 s on an idle machine and several seconds on a loaded
        one, is then paid before a dispatcher dies, not after)."""
        if self.spare is not None or self.stopping or not self.use_spare:
            return
        try:
            self.spare = self._spawn_dispatcher(spare=True)
        except OSError as exc:
            log.warning("no warm spare dispatcher: %s", exc)

    def _drop_spare(self) -> None:
        spare, self.spare = self.spare, None
        if spare is None:
            return
        proc, ours = spare
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def _start_dispatcher(self) -> _DispatcherInc:
        """A dispatcher incarnation, handed what we hold over a socketpair:
        the warm spare when one waits, else a new process."""
        self.dispatchers += 1
        spare, self.spare = self.spare, None
        if spare is not None and spare[0].poll() is None:
            proc, ours = spare
        else:
            if spare is not None:
                spare[1].close()
            proc, ours = self._spawn_dispatcher(spare=False)
        handoff = self._handoff()
        channel = Channel(ours, OPS_TO_SUPERVISOR)
        await channel.open()
        channel.send(handoff.to_json())
        inc = _DispatcherInc(proc, channel)
        inc.first = self.dispatchers == 1
        self.dispatcher = inc
        inc.task = asyncio.ensure_future(self._dispatcher_loop(inc))
        # (the first start is the run's own: an error at start stays one line)
        log.log(logging.DEBUG if inc.first else logging.INFO,
                "started the dispatcher (pid %d)%s", proc.pid,
                 f", adopting members {sorted(handoff.running)}" if handoff.running else "")
        return inc

    async def _dispatcher_loop(self, inc: _DispatcherInc) -> None:
        """The dispatcher's messages until its channel closes (it ended)."""
        while True:
            msg = await inc.channel.read()
            if msg is None:
                break
            try:
                self._from_dispatcher(inc, msg)
            except (TypeError, ValueError):
                inc.channel.refused += 1
        inc.channel.close()
        while inc.proc.poll() is None:   # (its channel closes as it exits)
            await asyncio.sleep(0.01)
        inc.settled.set()
        for fut in inc.key_waiters.values():
            if not fut.done():
                fut.set_result(None)
        if self.dispatcher is inc:
            self.dispatcher = None
        if not self.stopping and (inc.ready or not inc.first):
            self._dispatcher_exited(inc)

    def _from_dispatcher(self, inc: _DispatcherInc, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "ready":
            inc.ready = True
            inc.settled.set()
            self._make_spare()
        elif op == "failed":
            inc.error = str(msg.get("error", ""))[:1000]
        elif op == "key_ok":
            fut = inc.key_waiters.pop(int(msg.get("member", 0)), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif op == "dead":
            self._declared_dead(int(msg.get("member", 0)), int(msg.get("pid", 0)))
        elif op == "deposed":
            self._restart_deposed(inc)

    def set_role(self, role: str, why: str) -> None:
        """Two dispatcher hosts: become active (the dispatcher starts
        collecting the members' reattach claims) or stand down (the active
        dispatcher is ended at once, nothing deleted, and a standby starts in
        its place: it knows nothing a deposed one held)."""
        if role == self.role or self.stopping:
            return
        log.warning("role %s -> %s (%s)", self.role, role, why)
        self.role = role
        inc = self.dispatcher
        if inc is None or inc.proc.poll() is not None:
            return    # (the next one starts with the new role)
        if role == "active":
            inc.channel.send({"op": "activate"})
            return
        inc.deposed = True
        inc.proc.kill()

    def _restart_deposed(self, inc: _DispatcherInc) -> None:
        """Our dispatcher learnt from a member that another one was activated
        after it: it ends (nothing deleted), and the next one starts in our
        role: a standby, or, while keepalived says we hold the address, a new
        activation (its rebuild takes a term above every one the members
        report)."""
        if inc.proc.poll() is None and not self.stopping:
            log.warning("the dispatcher (pid %d) was deposed (a member reported a newer "
                        "term); starting a new %s one", inc.proc.pid, self.role)
            inc.deposed = True
            inc.proc.kill()

    def _dispatcher_exited(self, inc: _DispatcherInc) -> None:
        now = time.monotonic()
        if inc.deposed:
            self.dispatcher_restart_at = now
            return
        ran_s = now - inc.started
        code = inc.proc.returncode
        delay = self.dispatcher_backoff.exited(ran_s)
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        if delay is None:
            self.gave_up = (f"the dispatcher failed {self.dispatcher_backoff.failures} times in "
                            f"a row, last {how}: {inc.error or 'no output'}")
            self.stop()
            return
        if self.spare is not None and delay <= self.dispatcher_backoff.initial_s:
            # the warm spare takes over now (not at the next poll)
            log.warning("the dispatcher (pid %d) ended (%s) after %.1f s; the members and "
                        "their SAs go on; the spare (pid %d) takes over", inc.proc.pid, how,
                        ran_s, self.spare[0].pid)
            self._restarting = asyncio.ensure_future(self._start_dispatcher())
            return
        log.warning("the dispatcher (pid %d) ended (%s) after %.1f s; the members and their "
                    "SAs go on; starting it again in %.2f s", inc.proc.pid, how, ran_s, delay)
        self.dispatcher_restart_at = now + delay

    async def _tell_key(self, member_id: int, public: bytes) -> None:
        """The dispatcher learns a member's key before the member connects
        (a dispatcher started later has it in its handoff)."""
        inc = self.dispatcher
        if inc is None or not inc.ready:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inc.key_waiters[member_id] = fut
        if inc.channel.send({"op": "key", "member": member_id, "public": public.decode()}):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, KEY_ACK_S)

    def _fence(self, member_id: int, pid: int) -> None:
        inc = self.dispatcher
        if inc is not None:
            inc.channel.send({"op": "exited", "member": member_id, "pid": pid})

    # -- members ----------------------------------------------------------------------------

    async def _spawn(self, member_id: int) -> None:
        endpoint = self.endpoint
        if endpoint.startswith("tcp://"):
            endpoint = endpoint.replace("tcp://0.0.0.0", "tcp://127.0.0.1")
        argv = [*self.member_command, "--config", self.config_path,
                "--id", str(member_id), "--connect", endpoint, "--key-stdin"]
        # its sockets of the steered groups (the same for every incarnation)
        fds = {port: g.socket_of(member_id).fileno() for port, g in self.groups.items()
               if member_id in g.members}
        for port, fd in sorted(fds.items()):
            argv += ["--udp-fd", f"{port}={fd}"]
        # Its TUN device: the same one for every incarnation of this id, held
        # by us (docs/routing.md "Host routes")
        tun_fd = self.tuns.fd(member_id) if self.tuns is not None else None
        if tun_fd is not None:
            argv += ["--tun-fd", str(tun_fd)]
        # A key pair for this incarnation only: the secret goes down a pipe
        # (never argv or the environment, which other local users can read).
        public, secret = zmq.curve_keypair()
        self.member_keys[member_id] = public
        await self._tell_key(member_id, public)
        if self.stopping:
            return
        keep = bool(os.environ.get(KEEP_MEMBERS_ENV))
        # stderr through us (its last line names why it failed), unless the
        # member is to outlive us: then a pipe to nobody would break its logs
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env=self._child_env(),
                                stderr=None if keep else subprocess.PIPE,
                                pass_fds=(*fds.values(), *(() if tun_fd is None else (tun_fd,))))
        if proc.stdin is not None:
            # a member that exited at once: its exit is handled by _watch
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(b" ".join((public, secret, self.curve[0])) + b"\n")
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        self.procs[member_id] = proc
        self.incarnations[member_id] = _Member(proc)
        self._watch_exit(member_id, proc)
        log.info("started member %d (pid %d)", member_id, proc.pid)

    async def _watch(self) -> None:
        """Every POLL_S: start the members (and the dispatcher) whose restart
        delay is over, and catch any member exit the pidfds did not report
        (without pidfds: every exit, up to POLL_S late)."""
        try:
            while not self.stopping:
                await asyncio.sleep(POLL_S)
                now = time.monotonic()
                at = self.dispatcher_restart_at
                if at is not None and now >= at and not self.stopping:
                    self.dispatcher_restart_at = None
                    await self._start_dispatcher()
                for member_id, proc in list(self.procs.items()):
                    if member_id in self.restart_at:
                        if now >= self.restart_at[member_id] and not self.stopping:
                            del self.restart_at[member_id]
                            await self._spawn(member_id)
                        continue
                    if proc.poll() is not None and not self.stopping:
                        self._exited(member_id, proc, now)
        finally:
            for pid in list(self.pidfds):
                self._unwatch(pid)

    def _watch_exit(self, member_id: int, proc: subprocess.Popen[bytes]) -> None:
        """Learn of this process's exit at once: its pidfd becomes readable
        when it ends (Linux >= 5.3), so a kill -9 fences the member without
        waiting for the poll or for missed heartbeats. Without pidfds (said
        once in the log) the poll in ``_watch`` sees it, up to POLL_S late."""
        if self._no_pidfd is not None:
            return
        try:
            if not self.use_pidfd:
                raise OSError("turned off")
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError) as exc:
            self._no_pidfd = str(exc)
            log.info("member exits are seen by polling every %.1f s (pidfd: %s)", POLL_S,
                     self._no_pidfd)
            return
        self.pidfds[proc.pid] = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._pidfd_ready, member_id, proc)

    def _unwatch(self, pid: int) -> None:
        pidfd = self.pidfds.pop(pid, None)
        if pidfd is None:
            return
        with contextlib.suppress(RuntimeError):  # (no loop running any more)
            asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)

    def _pidfd_ready(self, member_id: int, proc: subprocess.Popen[bytes]) -> None:
        """The process ended: reap it and fence the member now (unless the
        poll or a stop got there first). Its pidfd is done either way (a
        process not reapable yet, which should not happen, is the poll's)."""
        self._unwatch(proc.pid)
        if proc.poll() is None:
            return
        if (not self.stopping and self.procs.get(member_id) is proc
                and member_id not in self.restart_at):
            self._exited(member_id, proc, time.monotonic())

    def _declared_dead(self, member_id: int, pid: int) -> None:
        """The dispatcher declared a member dead: a process that still runs
        (stalled: heartbeats missed) ends now: its segments have new owners,
        and it holds sockets of the cluster's address it could still send
        from once it wakes. Its exit then fences it and starts the next."""
        proc = self.procs.get(member_id)
        if (proc is None or proc.pid != pid or member_id in self.restart_at
                or proc.poll() is not None):
            return
        # Declared dead but still running (stalled, not crashed): its
        # segments moved on; end this incarnation so that it rejoins as a
        # new one (new IV sender id, docs/failover.md).
        log.warning("member %d (pid %d) was declared dead but still runs; "
                    "restarting it", member_id, proc.pid)
        proc.kill()
        proc.wait()
        self.stalled.add(proc.pid)
        self._pidfd_ready(member_id, proc)

    def _exited(self, member_id: int, proc: subprocess.Popen[bytes], now: float) -> None:
        """A member exited: fence it, and start it again after its backoff
        delay, or give up (the whole supervisor stops: one StartupError line,
        exit status 2)."""
        self._fence(member_id, proc.pid)
        inc = self.incarnations.get(member_id)
        ran_s = now - inc.started if inc is not None else 0.0
        backoff = self.backoff.setdefault(member_id, self.new_backoff())
        if proc.pid in self.stalled:
            self.stalled.discard(proc.pid)
            delay: float | None = backoff.initial_s
        else:
            delay = backoff.exited(ran_s)
        if delay is None:
            last = (inc.last() if inc is not None else "") or "no output"
            code = proc.returncode
            how = f"killed by signal {-code}" if code < 0 else f"last exit status {code}"
            self.gave_up = (f"member {member_id} failed {backoff.failures} times in a row, "
                            f"{how}: {last[:300]}")
            self.stop()
            return
        log.warning("member %d (pid %d) exited with %s after %.1f s; starting it again "
                    "in %.1f s", member_id, proc.pid, proc.returncode, ran_s, delay)
        self.restart_at[member_id] = now + delay

    # -- life ---------------------------------------------------------------------------

    def _sighup(self) -> None:
        inc = self.dispatcher
        if inc is not None and inc.proc.poll() is None:
            inc.proc.send_signal(signal.SIGHUP)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        loop.add_signal_handler(signal.SIGUSR1, self.set_role, "active", "SIGUSR1")
        loop.add_signal_handler(signal.SIGUSR2, self.set_role, "standby", "SIGUSR2")
        tasks: list[asyncio.Future[Any]] = []
        try:
            try:
                self._open()
                inc = await self._start_dispatcher()
                await inc.settled.wait()
                if not inc.ready:
                    code = inc.proc.returncode
                    raise StartupError(inc.error or f"the dispatcher exited with {code} "
                                                    "before it was ready")
            except BaseException:
                # leave no socket, device and no run folder behind
                await self._stop_dispatcher()
                self._close()
                self._remove_run_dir()
                raise
            with contextlib.suppress(OSError):
                (self.dir / PID_FILE).write_text(f"{os.getpid()}\n")
            for member_id in range(1, self.config.cluster.members + 1):
                await self._spawn(member_id)
            tasks.append(asyncio.ensure_future(self._watch()))
            await self._stop_requested.wait()
        finally:
            self.stopping = True
            for t in tasks:
                t.cancel()
            await self._stop_dispatcher()
            self._stop_members()
            self._close()
            self._remove_run_dir()
        if self.gave_up is not None:
            raise StartupError(self.gave_up)
        return 0

    async def _stop_dispatcher(self) -> None:
        """A ready dispatcher has the members delete their IKE SAs first (the
        ``stop`` message); one that is not ready gets SIGTERM. SIGKILL if it
        takes too long. The spare goes at once."""
        self._drop_spare()
        inc = self.dispatcher
        if inc is None or inc.proc.poll() is not None:
            return
        if inc.ready and inc.channel.send({"op": "stop"}):
            wait_s = DISPATCHER_STOP_S
        else:
            inc.proc.send_signal(signal.SIGTERM)
            wait_s = 3.0
        end = time.monotonic() + wait_s
        while inc.proc.poll() is None and time.monotonic() < end:
            await asyncio.sleep(0.02)
        if inc.proc.poll() is None:
            inc.proc.kill()
            inc.proc.wait()

    def _remove_run_dir(self) -> None:
        """Our sockets go with us (not a configured ``control`` folder)."""
        with contextlib.suppress(OSError):
            (self.dir / PID_FILE).unlink()
        if self.config.cluster.control:
            return
        for name in SOCKETS:
            with contextlib.suppress(OSError):
                (self.dir / name).unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def stop(self) -> None:
        """SIGTERM/SIGINT: the Deletes first (``run``), then the members (no
        member is restarted from here on: one that got SIGTERM too is gone)."""
        self.stopping = True
        self._stop_requested.set()

    def _stop_members(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.procs:
            log.info("all members stopped")
