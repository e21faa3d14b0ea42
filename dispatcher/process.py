"""The dispatcher process of a cluster (``ipsec-cluster dispatcher``, started
by the supervisor of ``ipsec-cluster run``, dispatcher/supervisor.py).

It is the cluster's control plane: the membership, the segment table, the
first IKE_SA_INITs, the control API (dispatcher/control.py) and the metrics.
What must outlive it (the steered sockets, the TUN devices and their routes,
its CURVE key pair) it gets from the supervisor at its start
(dispatcher/handoff.py), and it does not start or stop members: the
supervisor does, and tells it of every member's key and exit over their
channel. So a dispatcher may die (kill -9) without ending a member or an
established SA: the kernel keeps steering ESP to the members meanwhile, and
the next incarnation adopts the running members (``Dispatcher.adopting``).

SIGTERM or SIGINT end this process without deleting anything (the
supervisor starts the next one); a clean stop of the cluster is the
supervisor's ``stop`` message: every IKE SA is deleted with its peer first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from common.cluster.events import EventLog
from common.cluster.stats import StatusReport
from common.config import Config
from common.errors import StartupError
from dispatcher.cluster import Dispatcher
from dispatcher.control import connections_view, control_endpoint, run_dir, serve
from dispatcher.handoff import OPS_TO_DISPATCHER, Channel, Handoff, take
from dispatcher.startup import bind_error
from dispatcher.trust import KeyRing
from member.main import load_certificate

log = logging.getLogger("ipsec_cluster.dispatcher")

#: a clean stop: how long the members' Deletes (and the peers' answers) get
STOP_GRACE_S = 1.0
#: start_action = "start": how long we wait for the members to join first
START_WAIT_S = 10.0
#: how long the handoff may take to arrive
HANDOFF_TIMEOUT_S = 10.0


def members_endpoint(config: Config, config_path: str) -> str:
    if config.cluster.sync:
        return config.cluster.sync
    return f"ipc://{run_dir(config, config_path) / 'members.ipc'}"


def adopt_wait_s(config: Config) -> float:
    """How long a restarted dispatcher waits for the running members to come
    back before it takes the missing ones for dead: twice the time heartbeats
    take to declare one dead, and at least 2 s."""
    c = config.cluster
    return max(2.0, 2.0 * c.dead_after * c.heartbeat_interval)


class DispatcherProcess:
    """One dispatcher incarnation under a supervisor: the ``Dispatcher``
    built on what the supervisor hands over, its control API and metrics, and
    its end of the channel."""

    def __init__(self, config: Config, config_path: str, channel: Channel, *,
                 spare: bool = False) -> None:
        self.config = config
        #: a warm spare: the handoff comes when the dispatcher before us dies
        self.spare = spare
        self.config_path = config_path
        self.channel = channel
        self.dispatcher: Dispatcher | None = None
        self.stopping = False
        self._stop = asyncio.Event()
        #: a clean stop of the cluster (the supervisor's ``stop``)
        self._clean_stop = False
        #: how reload reads the file (the CLI's, set by it: one StartupError line)
        self.read_config: Callable[[str], Config] = lambda path: config
        self._reloading: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Future[Any]] = []

    # -- start -------------------------------------------------------------------------

    async def _handoff(self) -> Handoff:
        try:
            msg = await asyncio.wait_for(self.channel.read(),
                                         None if self.spare else HANDOFF_TIMEOUT_S)
        except TimeoutError:
            msg = None
        if msg is None or msg.get("op") != "handoff":
            raise StartupError("the dispatcher got no handoff from its supervisor (it is "
                               "started by `ipsec-cluster run`, not by hand)")
        try:
            return Handoff.from_json(msg)
        except ValueError as exc:
            raise StartupError(f"the dispatcher's handoff is unusable: {exc}") from None

    def _build(self, handoff: Handoff) -> Dispatcher:
        config = self.config
        endpoint = members_endpoint(config, self.config_path)
        keys = KeyRing()
        if endpoint.startswith("tcp://") or config.cluster.curve_secret_key:
            _, _, allowed = load_server_curve(config, self.config_path)
            keys.load_authorized(Path(allowed))
        for member_id, public in sorted(handoff.member_keys.items()):
            keys.register_local(member_id, public.encode())
        try:
            handed = take(handoff, config)
        except ValueError as exc:
            raise StartupError(f"the dispatcher's handoff is unusable: {exc}") from None
        local = tuple(range(1, config.cluster.members + 1)) \
            if endpoint.startswith("ipc://") else ()
        d = Dispatcher(config, endpoint, keys=keys, local_members=local,
                       curve=(handoff.curve_public.encode(), handoff.curve_secret.encode()))
        d.handed = handed
        d.supervisor_pid = handoff.supervisor_pid
        d.want_member_tuns = True
        d.adopting = bool(handoff.running) and bool(handed.groups or handed.tuns)
        d.on_member_dead = self._declared_dead
        d.role = handoff.role
        d.on_deposed = self._deposed
        return d

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        await self.channel.open()
        try:
            handoff = await self._handoff()
            d = self.dispatcher = self._build(handoff)
            self._metrics()
            try:
                await d.start()
            except zmq.ZMQError as exc:  # the members' endpoint (cluster.sync)
                raise bind_error(d.endpoint, f"{self.config_path}: cluster.sync", exc) from None
        except StartupError as exc:
            if not self.channel.send({"op": "failed", "error": str(exc)}):
                raise
            await asyncio.sleep(0.05)   # (the line out before we go)
            if self.dispatcher is not None:
                self.dispatcher.close()
            return 2
        if d.adopting:
            d.adopt_deadline = loop.time() + adopt_wait_s(self.config)
            log.info("adopting the running members %s (until they are back, at most %.1f s)",
                     sorted(handoff.running), adopt_wait_s(self.config))
        _private(d.endpoint)
        self._tasks = [asyncio.ensure_future(d._members_loop()),
                       asyncio.ensure_future(d._monitor()),
                       asyncio.ensure_future(d._watch_handshakes()),
                       asyncio.ensure_future(self._control()),
                       asyncio.ensure_future(self._channel_loop())]
        if handoff.first:
            self._tasks.append(asyncio.ensure_future(self._start_connections()))
        self.channel.send({"op": "ready", "pid": os.getpid()})
        try:
            await self._stop.wait()
            if self._clean_stop:
                await self._delete_all()
        finally:
            self.stopping = True
            d.stop()
            for t in self._tasks:
                t.cancel()
            d.close()
            self.channel.close()
        return 0

    def stop(self) -> None:
        """SIGTERM/SIGINT: this incarnation ends (nothing deleted)."""
        self._stop.set()

    def _metrics(self) -> None:
        port = self.config.cluster.metrics_port
        if port and self.dispatcher is not None:
            from dispatcher.metrics import start_metrics

            start_metrics(self.dispatcher.status_report, port,
                          self.config.cluster.metrics_address)

    # -- the channel ---------------------------------------------------------------------

    async def _channel_loop(self) -> None:
        """The supervisor's messages; at EOF it is gone (we die with it,
        PR_SET_PDEATHSIG, unless told to outlive it)."""
        while True:
            msg = await self.channel.read()
            if msg is None:
                log.warning("the supervisor's channel closed")
                return
            self._from_supervisor(msg)

    def _from_supervisor(self, msg: dict[str, Any]) -> None:
        d = self.dispatcher
        if d is None:
            return
        op = msg["op"]
        try:
            if op == "key":
                member_id, public = int(msg["member"]), str(msg["public"])
                d.keys.register_local(member_id, public.encode())
                self.channel.send({"op": "key_ok", "member": member_id})
            elif op == "exited":
                d.fence(int(msg["member"]), int(msg["pid"]))
            elif op == "stop":
                self._clean_stop = True
                self._stop.set()
            elif op == "activate":
                d.activate()
            elif op in OPS_TO_DISPATCHER:   # (a second handoff)
                self.channel.refused += 1
        except (KeyError, TypeError, ValueError) as exc:
            self.channel.refused += 1
            log.warning("refused a message of the supervisor (%s): %s", op, exc)

    def _deposed(self) -> None:
        """A member reported a term above ours: another dispatcher is active.
        The supervisor ends us and starts a standby (we send nothing more)."""
        self.channel.send({"op": "deposed"})

    def _declared_dead(self, member_id: int) -> None:
        """The machine declared a member dead: the supervisor ends the
        process if it still runs (it holds sockets of the cluster's address
        it could still send from once it wakes)."""
        d = self.dispatcher
        info = d.members.get(member_id) if d is not None else None
        if info is not None:
            self.channel.send({"op": "dead", "member": member_id, "pid": info.pid})

    # -- the control API (dispatcher/control.py) -----------------------------------------

    async def _control(self) -> None:
        await serve(self, control_endpoint(self.config, self.config_path),
                    lambda: self.stopping)

    def _d(self) -> Dispatcher:
        if self.dispatcher is None:
            raise RuntimeError("the dispatcher has not started")
        return self.dispatcher

    def status_report(self) -> StatusReport:
        return self._d().status_report()

    def connections(self) -> list[dict[str, Any]]:
        return connections_view(self.config)

    @property
    def events(self) -> EventLog:
        return self._d().events

    async def ask(self, req: dict[str, Any], *, one: bool = False) -> list[dict[str, Any]]:
        return await self._d().control(req, one=one)

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
        d = self._d()
        d.reconfigure(new)
        answers = await d.control({"cmd": "reload"})
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
        d = self._d()
        for _ in range(int(START_WAIT_S / 0.1)):
            alive = [i for i in d.members.values() if i.alive]
            if len(alive) >= self.config.cluster.members:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)   # the table reaches every member
        answers = await d.control({"cmd": "start"}, one=True)
        log.info("start_action: %s", answers)

    async def _delete_all(self) -> None:
        """A clean stop: every member deletes its IKE SAs with the peers (a
        member killed for a handover does not: that path is os._exit)."""
        answers = await self._d().control({"cmd": "shutdown"}, timeout=STOP_GRACE_S)
        n = sum(int(a.get("done", 0)) for a in answers)
        if n:
            log.info("stopping: %d IKE SA(s) deleted with their peers", n)
            await asyncio.sleep(STOP_GRACE_S)   # their Deletes out, the answers in


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


def _private(endpoint: str) -> None:
    """An ipc:// socket file only we can connect to (besides its 0700 folder)."""
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.chmod(endpoint[len("ipc://"):], 0o600)


def run_dispatcher(config: Config, config_path: str, channel_fd: int,
                   read_config: Callable[[str], Config], *, spare: bool = False) -> int:
    """``ipsec-cluster dispatcher``: one incarnation, until SIGTERM, the
    supervisor's ``stop``, or the supervisor's death (PR_SET_PDEATHSIG)."""
    from member.main import run_loop
    from member.process import die_with_supervisor

    die_with_supervisor()
    try:
        sock = socket.socket(fileno=channel_fd)
    except OSError as exc:
        raise StartupError(f"--channel-fd {channel_fd}: not a socket ({exc.strerror}); the "
                           "dispatcher is started by `ipsec-cluster run`") from None
    if sock.family != socket.AF_UNIX:
        sock.detach()
        raise StartupError(f"--channel-fd {channel_fd}: not the supervisor's channel")
    proc = DispatcherProcess(config, config_path, Channel(sock, OPS_TO_DISPATCHER),
                             spare=spare)
    proc.read_config = read_config
    codes: list[int] = []
    started = time.monotonic()

    async def main() -> None:
        codes.append(await proc.run())

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(main())
    ran = time.monotonic() - started
    # (a start that failed: the supervisor prints its one line)
    log.log(logging.INFO if codes and codes[0] == 0 else logging.DEBUG,
            "dispatcher (pid %d) ends after %.1f s", os.getpid(), ran)
    return codes[0] if codes else 1
