"""``ipsec-cluster run`` with ``members > 1`` (or a ``sync`` endpoint): the
dispatcher process starts the member processes, supervises them (a member
that exits is started again, with a new IV sender id), serves the control API
(dispatcher/control.py) by relaying to the members, exports Prometheus
metrics, reloads the connections on SIGHUP, and stops everything cleanly on
SIGINT/SIGTERM (every IKE SA deleted with its peer first)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from common.cluster.events import EventLog
from common.cluster.stats import StatusReport
from common.config import Config
from common.errors import StartupError
from dispatcher.cluster import Dispatcher
from dispatcher.control import connections_view, serve
from dispatcher.control import control_endpoint as control_endpoint  # (cli, tests, demo)
from dispatcher.control import run_dir as run_dir
from dispatcher.startup import bind_error
from dispatcher.trust import KeyRing, secure_run_dir
from member.main import load_certificate

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
#: a clean stop: how long the members' Deletes (and the peers' answers) get
STOP_GRACE_S = 1.0
#: start_action = "start": how long we wait for the members to join first
START_WAIT_S = 10.0
SOCKETS = ("control.ipc", "members.ipc")
#: how often the supervisor looks at its members' processes (the exit of a
#: member is seen at once through its pidfd; this poll is the fallback where
#: pidfd_open(2) is missing, Linux < 5.3, and starts the restarts)
POLL_S = 0.2


def members_endpoint(config: Config, config_path: str) -> str:
    if config.cluster.sync:
        return config.cluster.sync
    return f"ipc://{run_dir(config, config_path) / 'members.ipc'}"


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
        if proc.stderr is not None:
            threading.Thread(target=self._copy, args=(proc.stderr,), daemon=True,
                             name=f"stderr-{proc.pid}").start()

    def _copy(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace")
            if text.strip():
                self.last_line = text.strip()
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(text)
                sys.stderr.flush()


class Supervisor:
    #: the command of a member (tests replace it)
    member_command: tuple[str, ...] = (sys.executable, "-m", "dispatcher.cli", "member")
    #: learn of a member's exit through its pidfd, at once (False: only the
    #: POLL_S poll, as where pidfd_open(2) is missing; the benches compare)
    use_pidfd: bool = True

    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.dir = run_dir(config, config_path)
        secure_run_dir(self.dir, SOCKETS)
        endpoint = members_endpoint(config, config_path)
        # CURVE on every transport (docs/design.md "Trust model"): without
        # configured keys (ipc://) a key pair of this run; the members we
        # start get a key pair each; members started by hand use their key
        # files, authorized one member id each (memberN.key).
        self.keys = KeyRing()
        curve = None
        if endpoint.startswith("tcp://") or config.cluster.curve_secret_key:
            public, secret, allowed = load_server_curve(config, config_path)
            curve = (public, secret)
            self.keys.load_authorized(Path(allowed))
        # Members we start on this host get their own steered sockets
        # (cluster.data_path, docs/routing.md "The data path on one host").
        local = tuple(range(1, config.cluster.members + 1)) \
            if endpoint.startswith("ipc://") else ()
        self.dispatcher = Dispatcher(config, endpoint, curve=curve, keys=self.keys,
                                     local_members=local)
        # We start the members on this host: each may get its own TUN device
        # (cleartext through the kernel; the dispatcher decides, member/tuns.py)
        self.dispatcher.want_member_tuns = True
        self.dispatcher.on_member_dead = self._declared_dead
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.incarnations: dict[int, _Member] = {}
        self.backoff: dict[int, Backoff] = {}
        #: member id -> when (monotonic) it is to be started again
        self.restart_at: dict[int, float] = {}
        #: pids we ended because they stalled: not a failure of the member's
        #: start (a loaded machine must not make us give up)
        self.stalled: set[int] = set()
        self.stopping = False
        #: the one line why we stopped on our own (a member that keeps failing)
        self.gave_up: str | None = None
        self._stop_requested = asyncio.Event()
        #: how reload reads the file (the CLI's, set by it: one StartupError line)
        self.read_config: Callable[[str], Config] = lambda path: config
        self._reloading: asyncio.Future[None] | None = None
        #: pid -> the pidfd of a member process we watch (closed once it exited)
        self.pidfds: dict[int, int] = {}
        #: why exits are polled instead (logged once), None while pidfds work
        self._no_pidfd: str | None = None

    def new_backoff(self) -> Backoff:
        return Backoff()

    def _spawn(self, member_id: int) -> None:
        endpoint = members_endpoint(self.config, self.config_path)
        if endpoint.startswith("tcp://"):
            endpoint = endpoint.replace("tcp://0.0.0.0", "tcp://127.0.0.1")
        argv = [*self.member_command, "--config", self.config_path,
                "--id", str(member_id), "--connect", endpoint, "--key-stdin"]
        # its sockets of the steered groups (the same for every incarnation)
        fds = self.dispatcher.member_fds(member_id)
        for port, fd in sorted(fds.items()):
            argv += ["--udp-fd", f"{port}={fd}"]
        # Its TUN device: the same one for every incarnation of this id, held
        # by the dispatcher (docs/routing.md "Host routes")
        tun_fd = self.dispatcher.member_tun_fd(member_id)
        if tun_fd is not None:
            argv += ["--tun-fd", str(tun_fd)]
        # A key pair for this incarnation only: the secret goes down a pipe
        # (never argv or the environment, which other local users can read).
        public, secret = zmq.curve_keypair()
        self.keys.register_local(member_id, public)
        env = dict(os.environ)
        env.pop(PARENT_ENV, None)
        keep = bool(os.environ.get(KEEP_MEMBERS_ENV))
        if not keep:
            env[PARENT_ENV] = str(os.getpid())  # the member dies with us
        # stderr through us (its last line names why it failed), unless the
        # member is to outlive us: then a pipe to nobody would break its logs
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env,
                                stderr=None if keep else subprocess.PIPE,
                                pass_fds=(*fds.values(), *(() if tun_fd is None else (tun_fd,))))
        if proc.stdin is not None:
            # a member that exited at once: its exit is handled by _watch
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(b" ".join((public, secret, self.dispatcher.curve[0])) + b"\n")
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        self.procs[member_id] = proc
        self.incarnations[member_id] = _Member(proc)
        self._watch_exit(member_id, proc)
        log.info("started member %d (pid %d)", member_id, proc.pid)

    async def _watch(self) -> None:
        """Every POLL_S: start the members whose restart delay is over, end
        the ones declared dead that still run, and catch any exit the
        pidfds did not report (without pidfds: every exit, up to POLL_S late)."""
        try:
            while not self.stopping:
                await asyncio.sleep(POLL_S)
                now = time.monotonic()
                for member_id, proc in list(self.procs.items()):
                    if member_id in self.restart_at:
                        if now >= self.restart_at[member_id] and not self.stopping:
                            del self.restart_at[member_id]
                            self._spawn(member_id)
                        continue
                    self._end_if_declared_dead(member_id, proc)
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

    def _declared_dead(self, member_id: int) -> None:
        """The dispatcher declared a member dead: a process that still runs
        (stalled: heartbeats missed) ends now, not at the next poll: its
        segments have new owners, and it holds sockets of the cluster's
        address it could still send from once it wakes."""
        proc = self.procs.get(member_id)
        if proc is not None and member_id not in self.restart_at:
            self._end_if_declared_dead(member_id, proc)

    def _end_if_declared_dead(self, member_id: int, proc: subprocess.Popen[bytes]) -> None:
        info = self.dispatcher.members.get(member_id)
        if (info is not None and not info.alive and info.pid == proc.pid
                and proc.poll() is None):
            # Declared dead but still running (stalled, not crashed): its
            # segments moved on; end this incarnation so that it rejoins as
            # a new one (new IV sender id, docs/failover.md).
            log.warning("member %d (pid %d) was declared dead but still runs; "
                        "restarting it", member_id, proc.pid)
            proc.kill()
            proc.wait()
            self.stalled.add(proc.pid)

    def _exited(self, member_id: int, proc: subprocess.Popen[bytes], now: float) -> None:
        """A member exited: fence it, and start it again after its backoff
        delay, or give up (the whole supervisor stops: one StartupError line,
        exit status 2)."""
        self.dispatcher.fence(member_id, proc.pid)
        inc = self.incarnations.get(member_id)
        ran_s = now - inc.started if inc is not None else 0.0
        backoff = self.backoff.setdefault(member_id, self.new_backoff())
        if proc.pid in self.stalled:
            self.stalled.discard(proc.pid)
            delay: float | None = backoff.initial_s
        else:
            delay = backoff.exited(ran_s)
        if delay is None:
            last = inc.last_line if inc is not None and inc.last_line else "no output"
            code = proc.returncode
            how = f"killed by signal {-code}" if code < 0 else f"last exit status {code}"
            self.gave_up = (f"member {member_id} failed {backoff.failures} times in a row, "
                            f"{how}: {last[:300]}")
            self.stop()
            return
        log.warning("member %d (pid %d) exited with %s after %.1f s; starting it again "
                    "in %.1f s", member_id, proc.pid, proc.returncode, ran_s, delay)
        self.restart_at[member_id] = now + delay

    async def _control(self) -> None:
        """The control API (dispatcher/control.py), relayed to the members."""
        await serve(self, control_endpoint(self.config, self.config_path),
                    lambda: self.stopping)

    # -- Backend (dispatcher/control.py) --------------------------------------------

    def status_report(self) -> StatusReport:
        return self.dispatcher.status_report()

    def connections(self) -> list[dict[str, Any]]:
        return connections_view(self.config)

    @property
    def events(self) -> EventLog:
        return self.dispatcher.events

    async def ask(self, req: dict[str, Any], *, one: bool = False) -> list[dict[str, Any]]:
        return await self.dispatcher.control(req, one=one)

    async def reload(self) -> dict[str, Any]:
        """The file checked here first (a bad one changes nothing), then every
        member re-reads it (the same path: members run with our --config)."""
        try:
            new = self.read_config(self.config_path)
        except StartupError as exc:
            return {"ok": False, "error": str(exc)}
        if new.cluster != self.config.cluster:
            return {"ok": False, "error": f"{self.config_path}: [cluster] changed: reload "
                                          "takes connections only (restart for the rest)"}
        self.config = new
        self.dispatcher.reconfigure(new)
        answers = await self.dispatcher.control({"cmd": "reload"})
        failed = [a for a in answers if not a.get("ok")]
        if failed:
            return {"ok": False, "error": f"member {failed[0].get('member')}: "
                                          f"{failed[0].get('error')}"}
        first = answers[0]
        log.info("reloaded %s: %s", self.config_path,
                 {k: first.get(k) for k in ("added", "changed", "removed")})
        return {"ok": True, "added": first.get("added", []), "changed": first.get("changed", []),
                "removed": first.get("removed", []), "members": answers}

    def _sighup(self) -> None:
        self._reloading = asyncio.ensure_future(self._sighup_reload())

    async def _sighup_reload(self) -> None:
        result = await self.reload()
        log.info("SIGHUP: reload: %s", result.get("error") or "done")

    async def _start_connections(self) -> None:
        """``start_action = "start"``: once the members are in, one of them
        initiates (its SPIs route the answers to it)."""
        if not any(ch.start_action == "start" and conn.remote_addrs
                   for conn in self.config.connections.values()
                   for ch in conn.children.values()):
            return
        for _ in range(int(START_WAIT_S / 0.1)):
            alive = [i for i in self.dispatcher.members.values() if i.alive]
            if len(alive) >= self.config.cluster.members:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)   # the table reaches every member
        answers = await self.dispatcher.control({"cmd": "start"}, one=True)
        log.info("start_action: %s", answers)

    async def _delete_all(self) -> None:
        """A clean stop: every member deletes its IKE SAs with the peers (a
        member killed for a handover does not: that path is os._exit)."""
        answers = await self.dispatcher.control({"cmd": "shutdown"}, timeout=STOP_GRACE_S)
        n = sum(int(a.get("done", 0)) for a in answers)
        if n:
            log.info("stopping: %d IKE SA(s) deleted with their peers", n)
            await asyncio.sleep(STOP_GRACE_S)   # their Deletes out, the answers in

    def _metrics(self) -> None:
        port = self.config.cluster.metrics_port
        if port:
            from dispatcher.metrics import start_metrics

            start_metrics(self.dispatcher.status_report, port,
                          self.config.cluster.metrics_address)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self._metrics()  # first: a port in use stops us before anything else started
        try:
            try:
                await self.dispatcher.start()
            except zmq.ZMQError as exc:  # the members' endpoint (cluster.sync)
                raise bind_error(self.dispatcher.endpoint, f"{self.config_path}: cluster.sync",
                                 exc) from None
        except BaseException:
            # e.g. a TUN without CAP_NET_ADMIN after the members' socket was
            # bound: leave no socket and no run folder behind
            self.dispatcher.close()
            self._remove_run_dir()
            raise
        _private(self.dispatcher.endpoint)
        for member_id in range(1, self.config.cluster.members + 1):
            self._spawn(member_id)
        tasks = [asyncio.ensure_future(self.dispatcher._members_loop()),
                 asyncio.ensure_future(self.dispatcher._monitor()),
                 asyncio.ensure_future(self.dispatcher._watch_handshakes()),
                 asyncio.ensure_future(self._watch()),
                 asyncio.ensure_future(self._control()),
                 asyncio.ensure_future(self._start_connections())]
        try:
            waits = [asyncio.ensure_future(self._stop_requested.wait()),
                     asyncio.ensure_future(self.dispatcher._stop.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self._stop_requested.is_set():
                await self._delete_all()
        finally:
            self.dispatcher.stop()
            self.stopping = True
            for t in tasks:
                t.cancel()
            self._stop_members()
            self.dispatcher.close()
            self._remove_run_dir()
        if self.gave_up is not None:
            raise StartupError(self.gave_up)
        return 0

    def _remove_run_dir(self) -> None:
        """Our sockets go with us (not a configured ``control`` folder)."""
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
        log.info("all members stopped")


def _private(endpoint: str) -> None:
    """An ipc:// socket file only we can connect to (besides its 0700 folder)."""
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.chmod(endpoint[len("ipc://"):], 0o600)


def load_server_curve(config: Config, config_path: str) -> tuple[bytes, bytes, str]:
    """The dispatcher's CURVE keys and the folder of members' public keys."""

    c = config.cluster
    base = Path(config_path).parent
    if not c.curve_secret_key:
        raise StartupError(f"{config_path}: cluster.sync is tcp:// but "
                           "cluster.curve_secret_key is not set (make keys with "
                           "`ipsec-cluster keygen`)")
    public, secret = load_certificate(config_path, "curve_secret_key", base / c.curve_secret_key)
    if secret is None:
        raise StartupError(f"{config_path}: cluster.curve_secret_key: {c.curve_secret_key} "
                           "holds no secret key (use NAME.key_secret from keygen)")
    allowed = base / (c.curve_authorized or "authorized")
    if not allowed.is_dir():
        raise StartupError(f"{config_path}: cluster.curve_authorized: "
                           f"expected a folder of member public keys, got {allowed}")
    return public, secret, str(allowed)
