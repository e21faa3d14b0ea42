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

RESTART_DELAY_S = 0.5
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
            from dispatcher.metrics import start_metrics

            start_metrics(self.dispatcher, port)

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
