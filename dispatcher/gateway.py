"""The single-process gateway: the cluster address's UDP ports, the inside
interface, and one in-process ``Member`` doing IKE and ESP (aioquic's
``asyncio/protocol.py`` is the model: feed the core, flush, re-arm one timer).

Ports (RFC 3948): datagrams on port 500 are IKE without a marker; on every
other port (4500, or a non-standard IKE port) they are classified: 0xFF is a
NAT-keepalive, four zero bytes start an IKE message, anything else is ESP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from common.cluster.events import Event, EventLog, EventType
from common.cluster.stats import ClusterStatus, DispatcherStatus, MemberStatus, StatusReport
from common.config import Config
from common.errors import MalformedMessage, StartupError
from common.esp.natt import NON_ESP_MARKER, Kind, classify_4500
from dispatcher.control import connections_view, control_endpoint, run_dir, serve
from dispatcher.trust import secure_run_dir
from member.inside import Inside, make_inside
from member.refusals import Refusals
from member.routes import bind_udp, keep_alone, mark_for_tun
from member.timer import CoreTimer
from member.worker import Member, delete_all, start_configured
from member.worker import control as member_control
from member.worker import reload as reload_member

log = logging.getLogger("ipsec_cluster.gateway")

#: a timer run that failed is retried no sooner than this
TIMER_RETRY_S = 0.1
#: how long a clean stop waits for the peers to answer our Deletes
STOP_GRACE_S = 1.0


class _Port(asyncio.DatagramProtocol):
    def __init__(self, gw: Gateway, port: int) -> None:
        self.gw = gw
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.gw.datagram(self.port, data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.gw.member.drops["udp_error"] += 1


class Gateway:
    """One process: sockets + inside + Member."""

    def __init__(self, config: Config, *, initiate: bool = False,
                 config_path: str | None = None) -> None:
        self.config = config
        #: with a path: the control socket in the run directory, reload, SIGHUP
        self.config_path = config_path
        #: how reload reads the file (the CLI's: one StartupError line)
        self.read_config: Callable[[str], Config] = _no_reader
        #: the gateway's event stream (control API ``events``)
        self.events = EventLog()
        self.member = Member(config, random=os.urandom, publish=self.publish)
        self.initiate = initiate
        self.ports: dict[int, _Port] = {}
        self.inside: Inside | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer = CoreTimer(self._fire)
        self._stopped = asyncio.Event()
        #: what failed per datagram, packet or timer run, by reason
        self.refusals = Refusals(log, name="gateway")
        #: when it started (``status``: uptime)
        self.started = time.time()

    def publish(self, event: Event) -> None:
        """One fact for the event stream (docs/operations.md "Control API")."""
        self.events.add(event, time.time())

    def status_report(self) -> StatusReport:
        """``ipsec-cluster status`` (and the metrics) of one process in the
        cluster's shape: it is the dispatcher (its refusals are the
        dispatcher's) and member 1, always alive, with no segments,
        replication or pools."""
        c = self.config.cluster
        s = self.member.stats()
        e = s.esp
        endpoint = control_endpoint(self.config, self.config_path) \
            if self.config_path is not None else ""
        member = MemberStatus(
            1, os.getpid(), "local", alive=True, sender_id=1, ike_sas=s.ike_sas,
            half_open_ike_sas=s.half_open_ike_sas, child_sas=s.child_sas,
            packets_in=e.packets_in, bytes_in=e.bytes_in, packets_out=e.packets_out,
            bytes_out=e.bytes_out, drops=dict(s.drops), connections=s.connections)
        return StatusReport(
            ClusterStatus(str(c.address), "single-process", 0,
                          round(time.time() - self.started, 1), endpoint),
            DispatcherStatus(os.getpid(), refused=dict(self.refusals.counts),
                             data_path="single-process"),
            (member,))

    # -- I/O in -------------------------------------------------------------------

    def datagram(self, port: int, data: bytes, remote: tuple[str, int]) -> None:
        """One datagram: the barrier (whatever it raises is counted, logged at
        most once per reason and source per interval, and the next one goes on)."""
        try:
            self._datagram(port, data, remote)
        except Exception as exc:
            self.refusals.failed("ike" if port == 500 or data[:4] == bytes(4) else "esp",
                                 exc, remote[0])
            try:   # what the core still wants sent; the timer re-armed as usual
                self.flush()
            except Exception as flush_exc:
                self.refusals.failed("flush", flush_exc, remote[0])

    def _datagram(self, port: int, data: bytes, remote: tuple[str, int]) -> None:
        member = self.member
        now = self._now()
        if port == 500:
            member.handle_ike(data, remote, port, now)
        else:
            try:
                kind, spi = classify_4500(data)
            except MalformedMessage:
                member.drops["udp_malformed"] += 1
                return
            if kind is Kind.ESP:
                inner = member.handle_esp(data, spi, remote, now)
                if inner is not None and self.inside is not None:
                    member.counters["esp_in"] += 1
                    member.counters["esp_in_bytes"] += len(inner)
                    self.inside.write(inner)
                return
            if kind is Kind.KEEPALIVE:
                member.counters["keepalives"] += 1
                return
            member.handle_ike(data[4:], remote, port, now)
        self.flush()

    def inner(self, packet: bytes) -> None:
        """One packet from the inside: the barrier, like ``datagram``."""
        try:
            self._inner(packet)
        except Exception as exc:
            self.refusals.failed("inner", exc, "inside")

    def _inner(self, packet: bytes) -> None:
        out = self.member.handle_inner(packet)
        if out is None:
            return
        esp, remote = out
        port = self.ports.get(self.config.cluster.natt_port)
        if port is not None and port.transport is not None:
            self.member.counters["esp_out"] += 1
            self.member.counters["esp_out_bytes"] += len(packet)
            port.transport.sendto(esp, remote)

    # -- I/O out ------------------------------------------------------------------

    def flush(self) -> None:
        # One process: every child is ours, nothing to push or route elsewhere.
        self.member.notices.clear()
        for out in self.member.ike_out():
            port = self.ports.get(out.local_port)
            if port is None or port.transport is None:
                self.member.drops["no_socket"] += 1
                continue
            data = out.data if out.local_port == 500 else NON_ESP_MARKER + out.data
            port.transport.sendto(data, out.remote)
        self._arm()

    def _now(self) -> float:
        return self.loop.time() if self.loop is not None else 0.0

    def _arm(self) -> None:
        if self.loop is not None:
            self._timer.arm(self.loop, self.member.get_timer())

    def _fire(self) -> None:
        try:
            self.member.handle_timer(self._now())
            self.flush()
        except Exception as exc:   # the barrier: the timer must stay armed
            self.refusals.failed("timer", exc, "timer")
            self._rearm_after_failure()

    def _rearm_after_failure(self) -> None:
        """What the core still wants sent, and the timer re-armed (no sooner
        than TIMER_RETRY_S: a deadline that fails every time must not spin)."""
        try:
            self.flush()
        except Exception as exc:
            self.refusals.failed("flush", exc, "timer")
        if self.loop is not None:
            try:
                when = self.member.get_timer()
            except Exception as exc:
                self.refusals.failed("timer", exc, "timer")
                when = None
            soonest = self.loop.time() + TIMER_RETRY_S
            self._timer.arm(self.loop, soonest if when is None else max(when, soonest))

    # -- life -----------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        c = self.config.cluster
        self.started = time.time()
        if c.metrics_port:  # first: a port in use stops us before anything else
            from dispatcher.metrics import start_metrics

            start_metrics(self.status_report, c.metrics_port, c.metrics_address)
        # Our own sockets, no SO_REUSEADDR (nobody binds beside us), marked
        # with a TUN inside so our IKE/ESP bypass the tunnel's table
        # (member/routes.py); a port in use is one StartupError line.
        mark = mark_for_tun(c.inside.kind, c.inside.route_mark)
        for port in sorted({c.ike_port, c.natt_port}):
            sock = bind_udp(str(c.address), port, mark=mark)
            _, proto = await self.loop.create_datagram_endpoint(
                functools.partial(_Port, self, port), sock=sock)
            self.ports[port] = proto
            keep_alone(sock, str(c.address), port)
        address = str(c.inside_address) if c.inside_address is not None else None
        self.inside = make_inside(c.inside, address=address,
                                  routes=self.member.remote_networks())
        await self.inside.start(self.inner)
        log.info("gateway listening on %s ports %s, inside %s", c.address,
                 sorted(self.ports), c.inside.kind)
        self.publish(Event(EventType.READY, peer=str(c.address)))
        if self.initiate:
            self.member.start_connections(self._now())
        elif self.config_path is not None:
            # ``run`` (not our peer, which starts its own): the connections
            # with a start_action = "start" child
            start_configured(self.member, self._now())
        self.flush()

    def stop(self) -> None:
        self._stopped.set()

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        control = GatewayControl(self) if self.config_path is not None else None
        if control is not None:
            loop.add_signal_handler(signal.SIGHUP, control.sighup)
            control.start()
        try:
            await self._stopped.wait()
            await self.delete_all()
        finally:
            if control is not None:
                control.close()
            self.close()

    async def delete_all(self) -> None:
        """A clean stop (SIGTERM): a Delete for every IKE SA, sent now, and
        a short wait for the peers' answers (retransmits are not awaited)."""
        n = delete_all(self.member, self._now())
        if n:
            log.info("stopping: deleting %d IKE SA(s) with their peers", n)
            self.flush()
            for _ in range(int(STOP_GRACE_S / 0.05)):
                if not any(not sa.terminal for sa in self.member.engine.by_id.values()):
                    break
                await asyncio.sleep(0.05)

    def close(self) -> None:
        self._timer.cancel()
        log.info("gateway stopping; counters %s; drops %s", dict(self.member.counters),
                 dict(self.member.drops))
        for port in self.ports.values():
            if port.transport is not None:
                port.transport.close()
        if self.inside is not None:
            self.inside.close()


def _no_reader(path: str) -> Config:
    raise StartupError(f"{path}: this gateway cannot reload")


class GatewayControl:
    """The control API of the single-process gateway (dispatcher/control.py):
    the same socket and answers as the cluster's, from our one Member."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.path = gw.config_path or ""
        self.dir = run_dir(gw.config, self.path)
        secure_run_dir(self.dir, ("control.ipc",))
        self.endpoint = control_endpoint(gw.config, self.path)
        self.task: asyncio.Future[None] | None = None
        self.reloading: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(
            serve(self, self.endpoint, lambda: self.gw._stopped.is_set()))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if not self.gw.config.cluster.control:
            with contextlib.suppress(OSError):
                (self.dir / "control.ipc").unlink()
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    def sighup(self) -> None:
        self.reloading = asyncio.ensure_future(self._sighup())

    async def _sighup(self) -> None:
        result = await self.reload()
        log.info("SIGHUP: reload: %s", result.get("error") or result)

    # -- Backend (dispatcher/control.py) ---------------------------------------------

    def status_report(self) -> StatusReport:
        return self.gw.status_report()

    def connections(self) -> list[dict[str, Any]]:
        return connections_view(self.gw.config)

    @property
    def events(self) -> EventLog:
        return self.gw.events

    async def ask(self, req: dict[str, Any], *, one: bool = False) -> list[dict[str, Any]]:
        answer = member_control(self.gw.member, req, self.gw._now())
        answer["member"] = 1
        self.gw.flush()
        return [answer]

    async def reload(self) -> dict[str, Any]:
        try:
            new = self.gw.read_config(self.path)
        except StartupError as exc:
            return {"ok": False, "error": str(exc)}
        if new.cluster != self.gw.config.cluster:
            return {"ok": False, "error": f"{self.path}: [cluster] changed: reload takes "
                                          "connections only (restart for the rest)"}
        result = reload_member(self.gw.member, new, self.gw._now())
        self.gw.config = new
        self.gw.flush()
        log.info("reloaded %s: %s", self.path, result)
        return {"ok": True, **result}
