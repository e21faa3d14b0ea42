"""``ipsec-cluster run`` with ``members > 1`` (or a ``sync`` endpoint): the
dispatcher process starts the member processes, supervises them (a member
that exits is started again, with a new IV sender id), serves ``status`` and
``sas`` on a control socket, exports Prometheus metrics, and stops everything
cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from common.config import Config
from common.errors import StartupError
from dispatcher.cluster import Dispatcher
from dispatcher.startup import bind_error, load_certificate
from dispatcher.trust import KeyRing, secure_run_dir

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
SOCKETS = ("control.ipc", "members.ipc")


def run_dir(config: Config, config_path: str) -> Path:
    """Where a running cluster keeps its sockets: ``cluster.control`` or a
    folder derived from the config file's absolute path, so that ``status``
    and ``sas`` find the cluster through the same ``--config``."""
    if config.cluster.control:
        return Path(config.cluster.control)
    digest = hashlib.sha256(str(Path(config_path).resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"ipsec-cluster-{digest}"  # noqa: S108 - a per-config folder, 0700


def control_endpoint(config: Config, config_path: str) -> str:
    return f"ipc://{run_dir(config, config_path) / 'control.ipc'}"


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

    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.dir = run_dir(config, config_path)
        secure_run_dir(self.dir, SOCKETS)
        endpoint = members_endpoint(config, config_path)
        # CURVE on every transport (DESIGN.md "Trust model"): without
        # configured keys (ipc://) a key pair of this run; the members we
        # start get a key pair each; members started by hand use their key
        # files, authorized one member id each (memberN.key).
        self.keys = KeyRing()
        curve = None
        if endpoint.startswith("tcp://") or config.cluster.curve_secret_key:
            public, secret, allowed = load_server_curve(config, config_path)
            curve = (public, secret)
            self.keys.load_authorized(Path(allowed))
        self.dispatcher = Dispatcher(config, endpoint, curve=curve, keys=self.keys)
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

    def new_backoff(self) -> Backoff:
        return Backoff()

    def _spawn(self, member_id: int) -> None:
        endpoint = members_endpoint(self.config, self.config_path)
        if endpoint.startswith("tcp://"):
            endpoint = endpoint.replace("tcp://0.0.0.0", "tcp://127.0.0.1")
        argv = [*self.member_command, "--config", self.config_path,
                "--id", str(member_id), "--connect", endpoint, "--key-stdin"]
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
                                stderr=None if keep else subprocess.PIPE)
        if proc.stdin is not None:
            # a member that exited at once: its exit is handled by _watch
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(b" ".join((public, secret, self.dispatcher.curve[0])) + b"\n")
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        self.procs[member_id] = proc
        self.incarnations[member_id] = _Member(proc)
        log.info("started member %d (pid %d)", member_id, proc.pid)

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.2)
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

    def _end_if_declared_dead(self, member_id: int, proc: subprocess.Popen[bytes]) -> None:
        info = self.dispatcher.members.get(member_id)
        if (info is not None and not info.alive and info.pid == proc.pid
                and proc.poll() is None):
            # Declared dead but still running (stalled, not crashed): its
            # segments moved on; end this incarnation so that it rejoins as
            # a new one (new IV sender id, DESIGN.md).
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
        ctx = zmq.asyncio.Context.instance()
        rep = ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        rep.bind(control_endpoint(self.config, self.config_path))
        _private(control_endpoint(self.config, self.config_path))
        try:
            while not self.stopping:
                request = await rep.recv()
                answer: dict[str, Any]
                if request == b"status":
                    answer = self.dispatcher.status()
                elif request == b"sas":
                    answer = await self.dispatcher.sas()
                else:
                    answer = {"error": f"unknown request {request[:32]!r}"}
                await rep.send(json.dumps(answer).encode())
        finally:
            rep.close(linger=0)

    def _metrics(self) -> None:
        port = self.config.cluster.metrics_port
        if port:
            from dispatcher.metrics import dispatcher_status, start_metrics

            start_metrics(lambda: dispatcher_status(self.dispatcher), port,
                          self.config.cluster.metrics_address)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        self._metrics()  # first: a port in use stops us before anything else started
        try:
            await self.dispatcher.start()
        except zmq.ZMQError as exc:  # the members' endpoint (cluster.sync)
            raise bind_error(self.dispatcher.endpoint, f"{self.config_path}: cluster.sync",
                             exc) from None
        _private(self.dispatcher.endpoint)
        for member_id in range(1, self.config.cluster.members + 1):
            self._spawn(member_id)
        tasks = [asyncio.ensure_future(self.dispatcher._members_loop()),
                 asyncio.ensure_future(self.dispatcher._monitor()),
                 asyncio.ensure_future(self.dispatcher._watch_handshakes()),
                 asyncio.ensure_future(self._watch()),
                 asyncio.ensure_future(self._control())]
        try:
            await self.dispatcher._stop.wait()
        finally:
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
        self.stopping = True
        self.dispatcher.stop()

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


def load_member_curve(config: Config, config_path: str) -> tuple[bytes, bytes, bytes]:

    c = config.cluster
    base = Path(config_path).parent
    if not c.curve_secret_key or not c.curve_server_key:
        raise StartupError(f"{config_path}: a member on tcp:// needs "
                           "cluster.curve_secret_key and cluster.curve_server_key")
    public, secret = load_certificate(config_path, "curve_secret_key", base / c.curve_secret_key)
    server, _ = load_certificate(config_path, "curve_server_key", base / c.curve_server_key)
    if secret is None:
        raise StartupError(f"{config_path}: cluster.curve_secret_key: {c.curve_secret_key} "
                           "holds no secret key (use NAME.key_secret from keygen)")
    return public, secret, server


def read_key_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """(our public key, our secret key, the dispatcher's public key), z85,
    as the supervisor writes them to a member's stdin."""
    parts = line.split()
    if len(parts) != 3 or any(len(p) != 40 for p in parts):
        raise StartupError("--key-stdin: expected one line 'public secret server' of z85 "
                           "CURVE keys on stdin (the supervisor writes it)")
    return parts[0], parts[1], parts[2]


def run_member(config: Config, config_path: str, member_id: int, endpoint: str, *,
               key_stdin: bool = False) -> int:
    from member.process import MemberProcess

    if not endpoint.startswith(("ipc://", "tcp://")):
        raise StartupError(f"--connect {endpoint}: not an endpoint (expected the "
                           "dispatcher's ipc://PATH or tcp://HOST:PORT)")
    if key_stdin:
        curve = read_key_line(sys.stdin.buffer.readline(256))
    elif endpoint.startswith("tcp://") or config.cluster.curve_secret_key:
        curve = load_member_curve(config, config_path)
    else:
        raise StartupError(f"a member on {endpoint} needs its CURVE key: members on the "
                           "dispatcher's host are started by `ipsec-cluster run` (which "
                           "hands each its key), others need cluster.curve_secret_key "
                           "and cluster.curve_server_key")
    proc = MemberProcess(config, member_id, endpoint, curve=curve)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: os._exit(0))
        await proc.run()

    with contextlib.suppress(KeyboardInterrupt):
        _run(main())
    return 0


def _run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(coro)
        return
    uvloop.run(coro)
