"""Our initiator as a load and check tool (``ipsec-cluster peer``).

A ``Peer`` is the single-process ``Gateway`` (dispatcher/gateway.py) that
initiates instead of answering. Beyond today's behaviour (bring up every
configured connection and keep running) it can:

- bring up N IKE SAs of the first connection towards its remote, each with its
  children (``--ike-sas``), paced (``--rate``) with a bounded number of IKE
  handshakes in flight (``--max-in-flight``), and report (``--json``,
  ``--exit-when-up``, ``--timeout``);
- send inner IPv4/UDP packets through every child (``--traffic PPS --seconds S
  --size BYTES``, needs a ``udp:`` inside): source in the child's local
  selector, destination in its remote one, headers and checksums built here.
  Packets that come back decrypted and carry our payload mark are counted as
  echoes (the far side needs an echo that swaps addresses: ``swap_inner``,
  ``python -m dispatcher.peer echo HOST:PORT``).

INITIAL_CONTACT (RFC 7296 §2.4) tells the responder that this is the only IKE
SA between the two identities: strongSwan (swanctl ``unique = no``, the
default) then deletes every other IKE SA of the same identities that is
already established. So of N IKE SAs only the first carries it
(``--initial-contact first``, the default), and the others start only once
the first is up (else a late first IKE_AUTH deletes earlier-finished ones).

Rules of this file: the peer only drives the gateway from outside: it calls
``IkeEngine.initiate`` and observes the engine's events on their way to the
Member (``_tap_events``); it never changes how the Member or engine work.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from common.config import Config, ConnectionConfig
from common.ike.events import (
    ChildSaFailed,
    ChildSaInstalled,
    IkeEvent,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
)
from common.ike.ts import TrafficSelector
from common.packets import (
    IPV4_UDP_HEADERS,
    MIN_TRAFFIC_SIZE,
    TRAFFIC_MARK,
    TrafficTemplate,
    swap_inner,
)
from dispatcher.gateway import Gateway
from member.inside import Inside, OnPacket

log = logging.getLogger("ipsec_cluster.peer")

DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_TIMEOUT_S = 30.0
TRAFFIC_TICK_S = 0.001
TRAFFIC_DRAIN_S = 1.0
MAX_TRAFFIC_SIZE = 65535
TRAFFIC_PORT = 9  # discard; used when the selector allows any port


# -- inner packets -----------------------------------------------------------------


def _pick(tss: tuple[TrafficSelector, ...]) -> tuple[str, int] | None:
    """An address and port inside the first IPv4 UDP-capable selector."""
    for ts in tss:
        if ts.version != 4 or ts.ip_protocol not in (0, 17):
            continue
        lo, hi = int(ts.start_addr), int(ts.end_addr)
        addr = lo + 1 if hi - lo >= 2 else lo   # not the network address of a subnet
        port = TRAFFIC_PORT if ts.any_port else ts.start_port
        return str(ipaddress.IPv4Address(addr)), port
    return None


# -- results -----------------------------------------------------------------------


@dataclass(slots=True)
class PeerOptions:
    #: None: every configured connection once (today's ``peer``)
    ike_sas: int | None = None
    rate: float | None = None
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    exit_when_up: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    json: bool = False
    initial_contact: str = "first"   # first | all | none
    traffic_pps: float | None = None
    traffic_seconds: float = 5.0
    traffic_size: int = 512


@dataclass(slots=True)
class _Launch:
    started: float
    children_wanted: int
    up_at: float | None = None
    children_up: int = 0
    children_failed: int = 0
    failed: str | None = None

    @property
    def done(self) -> bool:
        return self.failed is not None or (
            self.up_at is not None
            and self.children_up + self.children_failed >= self.children_wanted)


@dataclass(slots=True)
class TrafficResult:
    sent: int = 0
    esp_out: int = 0
    esp_in: int = 0
    echoed: int = 0
    other_in: int = 0
    children: int = 0
    seconds: float = 0.0
    size: int = 0


@dataclass(slots=True)
class PeerResult:
    wanted: int
    ike_sas_up: int
    children_up: int
    failed: int
    children_failed: int
    elapsed_s: float
    timed_out: bool
    reasons: Counter[str] = field(default_factory=Counter)
    traffic: TrafficResult | None = None
    drops: dict[str, int] = field(default_factory=dict)
    #: the Member's counters over the whole run (ike_established, ike_failed,
    #: esp_in, ...): a failover test sees here that no IKE SA was set up again
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (not self.timed_out and self.failed == 0 and self.children_failed == 0
                and self.ike_sas_up == self.wanted
                and (self.traffic is None or (self.traffic.sent > 0
                                              and self.traffic.esp_out == self.traffic.sent)))

    @property
    def handshakes_per_s(self) -> float:
        return self.ike_sas_up / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "wanted": self.wanted, "ike_sas_up": self.ike_sas_up,
            "children_up": self.children_up, "failed": self.failed,
            "children_failed": self.children_failed, "timed_out": self.timed_out,
            "elapsed_s": round(self.elapsed_s, 4),
            "handshakes_per_s": round(self.handshakes_per_s, 1),
            "reasons": dict(self.reasons), "drops": self.drops, "counters": self.counters}
        if self.traffic is not None:
            t = self.traffic
            out["traffic"] = {"sent": t.sent, "esp_out": t.esp_out, "esp_in": t.esp_in,
                              "echoed": t.echoed, "other_in": t.other_in,
                              "children": t.children, "seconds": round(t.seconds, 3),
                              "size": t.size}
        return out

    def summary(self) -> str:
        text = (f"{self.ike_sas_up}/{self.wanted} IKE SAs up, {self.children_up} child SAs, "
                f"{self.failed} failed in {self.elapsed_s:.2f} s "
                f"({self.handshakes_per_s:.1f} handshakes/s)")
        if self.timed_out:
            pending = self.wanted - self.ike_sas_up - self.failed
            text += f", timed out ({pending} not up)" if pending > 0 else ", timed out"
        if self.reasons:
            text += "; " + "; ".join(f"{r} (x{n})" for r, n in self.reasons.most_common())
        if self.traffic is not None:
            t = self.traffic
            text += (f"; traffic: sent {t.sent} inner packets, {t.esp_out} ESP out, "
                     f"{t.esp_in} ESP in and decrypted, {t.echoed} echoes")
        return text


# -- the peer ----------------------------------------------------------------------


class _CountingInside:
    """Wraps the real inside: counts decrypted packets carrying our mark (the
    echoes of what we sent), passes everything else on."""

    def __init__(self, inner: Inside) -> None:
        self.inner = inner
        self.echoed = 0
        self.other = 0

    # the Inside protocol's counters are the wrapped inside's
    @property
    def rx_packets(self) -> int:
        return self.inner.rx_packets

    @rx_packets.setter
    def rx_packets(self, value: int) -> None:
        self.inner.rx_packets = value

    @property
    def tx_packets(self) -> int:
        return self.inner.tx_packets

    @tx_packets.setter
    def tx_packets(self, value: int) -> None:
        self.inner.tx_packets = value

    @property
    def drops(self) -> int:
        return self.inner.drops

    @drops.setter
    def drops(self, value: int) -> None:
        self.inner.drops = value

    async def start(self, on_packet: OnPacket) -> None:
        await self.inner.start(on_packet)

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        if bytes(packet[IPV4_UDP_HEADERS:IPV4_UDP_HEADERS + 4]) == TRAFFIC_MARK:
            self.echoed += 1
            return True
        self.other += 1
        return self.inner.write(packet)

    def close(self) -> None:
        self.inner.close()


def _children_of(conn: ConnectionConfig) -> list[str]:
    """As Member.start_connections: the start_action=start children, else all."""
    names = [n for n, ch in conn.children.items() if ch.start_action == "start"]
    return names or list(conn.children)


class Peer(Gateway):
    def __init__(self, config: Config, options: PeerOptions | None = None) -> None:
        super().__init__(config, initiate=False)
        self.options = options or PeerOptions()
        self.launches: dict[int, _Launch] = {}
        self.reasons: Counter[str] = Counter()
        self._progress = asyncio.Event()
        self._first_start: float | None = None
        self._last_done: float | None = None
        self._tap_events()

    # -- observing the engine ----------------------------------------------------

    def _tap_events(self) -> None:
        """See every engine event on its way to the Member (which drains them)."""
        engine = self.member.engine
        drain = engine.next_event

        def next_event() -> IkeEvent | None:
            event = drain()
            if event is not None:
                self._observe(event)
            return event

        engine.next_event = next_event  # type: ignore[method-assign]

    def _observe(self, e: IkeEvent) -> None:
        if isinstance(e, IkeSaRekeyed):
            if e.old_ike_id in self.launches:
                self.launches[e.new_ike_id] = self.launches.pop(e.old_ike_id)
            return
        launch = self.launches.get(e.ike_id)
        if launch is None or launch.done:
            return
        now = self._now()
        if isinstance(e, IkeSaEstablished):
            launch.up_at = now
        elif isinstance(e, ChildSaInstalled) and e.replaces is None:
            launch.children_up += 1
        elif isinstance(e, ChildSaFailed):
            launch.children_failed += 1
            self.reasons[f"child {e.name}: {e.reason}"] += 1
        elif isinstance(e, IkeSaFailed | IkeSaDeleted):
            launch.failed = e.reason
            self.reasons[e.reason] += 1
        if launch.done:
            self._last_done = now
            self._progress.set()

    # -- bringing SAs up -----------------------------------------------------------

    def _in_flight(self) -> int:
        return sum(1 for la in self.launches.values() if la.up_at is None and la.failed is None)

    def _all_done(self) -> bool:
        return all(la.done for la in self.launches.values())

    def _initiate(self, conn: ConnectionConfig, index: int) -> None:
        now = self._now()
        children = _children_of(conn)
        remote = (str(conn.remote_addrs[0]), conn.remote_port)
        ic = self.options.initial_contact
        ike_id = self.member.engine.initiate(
            conn.name, remote, now, children,
            initial_contact=ic == "all" or (ic == "first" and index == 0))
        self.launches[ike_id] = _Launch(now, len(children))
        if self._first_start is None:
            self._first_start = now
        self.flush()

    async def _launch(self) -> None:
        opts = self.options
        conns = [c for c in self.config.connections.values() if c.remote_addrs]
        plan = [conns[0]] * opts.ike_sas if opts.ike_sas is not None else conns
        loop = asyncio.get_running_loop()
        interval = 1.0 / opts.rate if opts.rate else 0.0
        next_at = loop.time()
        for index, conn in enumerate(plan):
            while self._in_flight() >= opts.max_in_flight:
                self._progress.clear()
                await self._progress.wait()
            if interval:
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at, loop.time() - interval) + interval
            self._initiate(conn, index)
            if index == 0 and len(plan) > 1 and opts.initial_contact == "first":
                # INITIAL_CONTACT must reach the responder before the others are
                # authenticated, or it deletes them (strongSwan does)
                while not self._all_done():
                    self._progress.clear()
                    await self._progress.wait()
            if index % 8 == 7:
                await asyncio.sleep(0)   # let answers in between our initiations
        while not self._all_done():
            self._progress.clear()
            await self._progress.wait()

    def result(self, timed_out: bool) -> PeerResult:
        ls = self.launches.values()
        start = self._first_start or 0.0
        end = self._last_done if not timed_out and self._last_done else self._now()
        return PeerResult(
            wanted=self.options.ike_sas if self.options.ike_sas is not None else len(ls),
            ike_sas_up=sum(1 for la in ls if la.up_at is not None and la.failed is None),
            children_up=sum(la.children_up for la in ls),
            failed=sum(1 for la in ls if la.failed is not None),
            children_failed=sum(la.children_failed for la in ls),
            elapsed_s=max(0.0, end - start), timed_out=timed_out, reasons=Counter(self.reasons),
            drops={k: v for k, v in (self.member.drops + self.member.engine.drops).items() if v},
            counters={k: v for k, v in self.member.counters.items() if v})

    # -- traffic -----------------------------------------------------------------------

    def _templates(self) -> list[TrafficTemplate]:
        out = []
        for route in self.member.carried():
            src, dst = _pick(route.local_ts), _pick(route.remote_ts)
            if src is None or dst is None:
                log.warning("child %s: no IPv4 UDP selector, no traffic", route.name)
                continue
            out.append(TrafficTemplate(src[0], dst[0], src[1], dst[1],
                                       self.options.traffic_size))
        return out

    async def _traffic(self) -> TrafficResult:
        opts = self.options
        if opts.traffic_pps is None:
            raise ValueError("traffic needs --traffic-pps")
        counting = _CountingInside(self.inside) if self.inside is not None else None
        self.inside = counting
        templates = self._templates()
        res = TrafficResult(children=len(templates), size=opts.traffic_size)
        if not templates or counting is None:
            return res
        loop = asyncio.get_running_loop()
        c0 = self.member.counters.copy()
        total = int(opts.traffic_pps * opts.traffic_seconds)
        start = loop.time()
        while res.sent < total:
            due = min(total, int((loop.time() - start) * opts.traffic_pps) + 1)
            while res.sent < due:
                self.inner(templates[res.sent % len(templates)].packet(res.sent))
                res.sent += 1
            await asyncio.sleep(TRAFFIC_TICK_S)
        res.seconds = loop.time() - start
        end = loop.time() + TRAFFIC_DRAIN_S
        while counting.echoed < res.sent and loop.time() < end:
            await asyncio.sleep(0.01)
        res.esp_out = self.member.counters["esp_out"] - c0["esp_out"]
        res.esp_in = self.member.counters["esp_in"] - c0["esp_in"]
        res.echoed, res.other_in = counting.echoed, counting.other
        return res

    # -- life ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Bring up, optionally send traffic, report; 0 when everything came up."""
        opts = self.options
        if opts.traffic_pps is not None and self.config.cluster.inside.kind != "udp":
            raise SystemExit("ipsec-cluster peer: --traffic needs a udp: inside")
        if opts.ike_sas is not None and not any(
                c.remote_addrs for c in self.config.connections.values()):
            raise SystemExit("ipsec-cluster peer: no connection has remote_addrs")
        await self.start()
        try:
            result = await self.bring_up(opts.timeout_s)
            if opts.traffic_pps is not None and result.ike_sas_up:
                result.traffic = await self._traffic()
                after = self.result(False)
                result.drops, result.counters = after.drops, after.counters
            self._report(result)
            if not (opts.exit_when_up or opts.traffic_pps is not None):
                await self._stopped.wait()   # today's peer: keep the tunnels up, exit 0
                return 0
            return 0 if result.ok else 1
        finally:
            self.close()

    async def bring_up(self, timeout_s: float) -> PeerResult:
        """After ``start``: SIGINT/SIGTERM call ``stop``; launch the configured
        IKE SAs and wait until they are up, ``timeout_s`` passed or ``stop``
        was called; what came up."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        launch = asyncio.ensure_future(self._launch())
        stopped = asyncio.ensure_future(self._stopped.wait())
        done, _ = await asyncio.wait({launch, stopped}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        launch.cancel()
        stopped.cancel()
        if launch in done and launch.exception() is not None:
            raise launch.exception()  # type: ignore[misc]
        return self.result(timed_out=launch not in done)

    def _report(self, result: PeerResult) -> None:
        if self.options.json:
            print(json.dumps(result.as_dict(), sort_keys=True), flush=True)
        if result.ok:
            log.info("peer: %s", result.summary())
        else:
            print(f"ipsec-cluster peer: {result.summary()}", file=sys.stderr, flush=True)


# -- command line (``ipsec-cluster peer``, wired in dispatcher/cli.py) -------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """The load and check options of ``ipsec-cluster peer``."""
    g = parser.add_argument_group("load and check (without these: bring up every "
                                  "connection once and keep running)")
    g.add_argument("--ike-sas", type=_positive_int, metavar="N",
                   help="bring up N IKE SAs of the first connection, each with its children")
    g.add_argument("--rate", type=_positive_float, metavar="R",
                   help="at most R initiations per second (default: unlimited)")
    g.add_argument("--max-in-flight", type=_positive_int, default=DEFAULT_MAX_IN_FLIGHT,
                   metavar="M", help="IKE handshakes in flight at once "
                   f"(default {DEFAULT_MAX_IN_FLIGHT})")
    g.add_argument("--initial-contact", choices=["first", "all", "none"], default="first",
                   help="which IKE SAs send N(INITIAL_CONTACT) (default: only the first; "
                   "strongSwan deletes older IKE SAs of the same identities on it)")
    g.add_argument("--exit-when-up", action="store_true",
                   help="exit 0 once all are up; 1 with a summary on failures or timeout")
    g.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"bring-up deadline in seconds (default {DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--json", action="store_true",
                   help="print one JSON result line (ok, ike_sas_up, children_up, failed, "
                   "elapsed_s, handshakes_per_s, reasons, traffic, drops)")
    g.add_argument("--traffic", type=_positive_float, metavar="PPS",
                   help="once up, send PPS inner IPv4/UDP packets per second round-robin "
                   "through the children (udp: inside only), count what comes back, exit")
    g.add_argument("--seconds", type=_positive_float, default=5.0, metavar="S",
                   help="how long --traffic sends (default 5)")
    g.add_argument("--size", type=int, default=512, metavar="BYTES",
                   help=f"inner packet size, IPv4 header included ({MIN_TRAFFIC_SIZE}.."
                   f"{MAX_TRAFFIC_SIZE}, default 512)")


def options_from_args(args: argparse.Namespace) -> PeerOptions:
    if not MIN_TRAFFIC_SIZE <= args.size <= MAX_TRAFFIC_SIZE:
        raise SystemExit(f"ipsec-cluster peer: --size must be {MIN_TRAFFIC_SIZE}.."
                         f"{MAX_TRAFFIC_SIZE}, not {args.size}")
    return PeerOptions(
        ike_sas=args.ike_sas, rate=args.rate, max_in_flight=args.max_in_flight,
        exit_when_up=args.exit_when_up, timeout_s=args.timeout, json=args.json,
        initial_contact=args.initial_contact, traffic_pps=args.traffic,
        traffic_seconds=args.seconds, traffic_size=args.size)


# -- an echo for the far side's udp: inside -------------------------------------------


class InnerEcho(asyncio.DatagramProtocol):
    """Sends every inner IPv4/UDP packet back with addresses and ports swapped,
    to where it came from (a gateway's udp: inside socket)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.echoed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        back = swap_inner(data)
        if back is not None and self.transport is not None:
            self.transport.sendto(back, addr)
            self.echoed += 1


async def _echo_forever(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(InnerEcho, local_addr=(host, port))
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    """``python -m dispatcher.peer echo HOST:PORT``: the inner echo."""
    if len(argv) != 2 or argv[0] != "echo" or ":" not in argv[1]:
        print("usage: python -m dispatcher.peer echo HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    try:
        asyncio.run(_echo_forever(host.strip("[]"), int(port)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
