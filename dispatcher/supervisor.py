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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from common.config import Config
from common.errors import StartupError
from dispatcher.cluster import Dispatcher
from dispatcher.control import connections_view, serve
from dispatcher.control import control_endpoint as control_endpoint  # (cli, tests, demo)
from dispatcher.control import run_dir as run_dir
from dispatcher.startup import bind_error, load_certificate
from dispatcher.trust import KeyRing, secure_run_dir

log = logging.getLogger("ipsec_cluster.supervisor")

RESTART_DELAY_S = 0.5
#: a clean stop: how long the members' Deletes (and the peers' answers) get
STOP_GRACE_S = 1.0
#: start_action = "start": how long we wait for the members to join first
START_WAIT_S = 10.0
SOCKETS = ("control.ipc", "members.ipc")


def members_endpoint(config: Config, config_path: str) -> str:
    if config.cluster.sync:
        return config.cluster.sync
    return f"ipc://{run_dir(config, config_path) / 'members.ipc'}"


class Supervisor:
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
        self.stopping = False
        self._stop_requested = asyncio.Event()
        #: how reload reads the file (the CLI's, set by it: one StartupError line)
        self.read_config: Callable[[str], Config] = lambda path: config
        self._reloading: asyncio.Future[None] | None = None

    def _spawn(self, member_id: int) -> None:
        endpoint = members_endpoint(self.config, self.config_path)
        if endpoint.startswith("tcp://"):
            endpoint = endpoint.replace("tcp://0.0.0.0", "tcp://127.0.0.1")
        argv = [sys.executable, "-m", "dispatcher.cli", "member", "--config", self.config_path,
                "--id", str(member_id), "--connect", endpoint, "--key-stdin"]
        # A key pair for this incarnation only: the secret goes down a pipe
        # (never argv or the environment, which other local users can read).
        public, secret = zmq.curve_keypair()
        self.keys.register_local(member_id, public)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(b" ".join((public, secret, self.dispatcher.curve[0])) + b"\n")
            proc.stdin.close()
        self.procs[member_id] = proc
        log.info("started member %d (pid %d)", member_id, proc.pid)

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.2)
            for member_id, proc in list(self.procs.items()):
                info = self.dispatcher.members.get(member_id)
                if (info is not None and not info.alive and info.pid == proc.pid
                        and proc.poll() is None):
                    # Declared dead but still running (stalled, not crashed):
                    # its segments moved on; end this incarnation so that it
                    # rejoins as a new one (new IV sender id, DESIGN.md).
                    log.warning("member %d (pid %d) was declared dead but still runs; "
                                "restarting it", member_id, proc.pid)
                    proc.kill()
                    proc.wait()
                if proc.poll() is not None and not self.stopping:
                    log.warning("member %d (pid %d) exited with %s; starting it again",
                                member_id, proc.pid, proc.returncode)
                    self.dispatcher.fence(member_id, proc.pid)
                    await asyncio.sleep(RESTART_DELAY_S)
                    if not self.stopping:
                        self._spawn(member_id)

    async def _control(self) -> None:
        """The control API (dispatcher/control.py), relayed to the members."""
        await serve(self, control_endpoint(self.config, self.config_path),
                    lambda: self.stopping)

    # -- Backend (dispatcher/control.py) --------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.dispatcher.status()

    def connections(self) -> list[dict[str, Any]]:
        return connections_view(self.config)

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

            start_metrics(self.dispatcher, port)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
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
    proc.config_path = config_path

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
