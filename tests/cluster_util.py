"""Helpers for the process-level cluster tests (tests/test_cluster*.py), on
the harness (bench/harness/):

- configs: ``ChildSpec``/``ConnSpec`` (the harness's ``Child``/``Conn``) and
  ``gateway_toml`` render the cluster's and our peer's TOML (mirrored
  selectors, one identity per connection) with this file's PSK and a
  generous ``dead_after``;
- processes: ``Proc`` (the harness's) runs ``ipsec-cluster ...``
  (optionally in a namespace) in its own session with its log kept;
  ``stop()`` ends the whole process group (the dispatcher's members are in
  it), also when the test failed;
- events: ``Proc.wait_event(predicate)`` waits for an event of the gateway
  or cluster the process runs (its ``--config``) on the control socket's
  event stream, never for a log line; ``Proc.mark()`` before an action, and
  a wait ``since`` that mark, does not miss what the action caused;
  ``event_is(kind, **fields)`` builds the predicate (SPIs as numbers);
- ``status``/``sas`` ask the running cluster on its control socket (or via
  ``ipsec-cluster status|sas --json``); ``wait_for`` polls a condition with a
  deadline and a diagnostic;
- inner packets: ``udp4_packet`` and ``parse_udp4`` (bench/harness/packets.py);
- ``Endpoint``: the test's side of a ``udp:`` inside (a socket at the inside's
  HOST:PORT with a reader thread);
- ``EspProxy``: a UDP relay between our peer and the cluster that records
  (SPI, seq, IV) of every ESP packet in both directions;
- ``socket_in_netns``: a socket created inside a network namespace.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import configs
from bench.harness import procs as harness_procs
from bench.harness.control import ControlClient
from bench.harness.net import socket_in_netns as socket_in_netns
from bench.harness.packets import parse_udp4 as parse_udp4
from bench.harness.packets import udp4_packet as udp4_packet
from bench.harness.procs import KILL_GRACE_S as KILL_GRACE_S
from bench.harness.procs import ROOT as ROOT
from bench.harness.procs import cli_argv as cli_argv
from bench.harness.procs import ns_argv
from bench.harness.procs import pid_alive as pid_alive
from bench.harness.procs import tail as tail
from bench.harness.waits import wait_for as wait_for
from common.cluster.events import Event, EventType
from dispatcher.operator import ControlTimeout

PSK = "cluster-test-psk-0123456789abcdef"
CLI_TIMEOUT_S = 15.0
#: heartbeats (50 ms) missed before a member is declared dead, in test clusters
DEAD_AFTER = 40

#: a child and a connection as the cluster sees them (the harness's builders)
ChildSpec = configs.Child
ConnSpec = configs.Conn


# -- configs ---------------------------------------------------------------------------


def grid_connections(n_ike: int, n_child: int, *, esps: Sequence[str] = configs.GRID_ESPS
                     ) -> list[ConnSpec]:
    """``n_ike`` connections (one identity each) with ``n_child`` children each,
    every child with its own selectors: cluster side 10.200.K.C*16/28, peer side
    10.100.K.C*16/28; ESP transforms alternate over ``esps``."""
    return configs.grid_connections(n_ike, n_child, esps=esps)


def gateway_toml(*, address: str, ports: tuple[int, int], inside: str,
                 conns: Sequence[ConnSpec], inside_bind: str = "", members: int | None = None,
                 remote: tuple[str, int] | None = None, log_level: str = "info",
                 extra: Mapping[str, Any] | None = None) -> str:
    """The cluster's config (``remote`` None), or our peer's (``remote`` = the
    address and port it initiates to; selectors and identities mirrored, every
    child started)."""
    # Not the failover tests: a member stalled by a loaded machine must not be
    # declared dead after the default 3 x 50 ms.
    return configs.gateway_toml(address=address, ports=ports, inside=inside, conns=conns,
                                psk=PSK, inside_bind=inside_bind, members=members,
                                remote=remote, log_level=log_level,
                                extra={"dead_after": DEAD_AFTER, **(extra or {})})


# -- processes -------------------------------------------------------------------------


#: the event fields that hold an SPI (hex digits): ``event_is`` takes them as numbers too
SPI_FIELDS = ("ike_spi", "child_spi", "new_spi")


def spi_of(text: str) -> int:
    """An SPI as hex digits (with or without colons, ours or strongSwan's) as a number."""
    return int(text.replace(":", ""), 16) if text else -1


def event_is(kind: EventType, **fields: object) -> Callable[[Event], bool]:
    """A predicate: an event of ``kind`` whose ``fields`` have these values
    (an SPI field given as an int is compared as a number)."""
    for name in fields:
        if name not in Event.__dataclass_fields__:
            raise TypeError(f"events have no field {name!r}")

    def match(e: Event) -> bool:
        if e.type is not kind:
            return False
        for name, want in fields.items():
            have = getattr(e, name)
            if name in SPI_FIELDS and isinstance(want, int):
                have = spi_of(have)
            if have != want:
                return False
        return True
    return match


class Proc(harness_procs.Proc):
    """The harness's process, and the event stream of the gateway or cluster
    it runs (the ``--config`` of its command line) through the harness's
    control client (made on first use, closed with the process's log)."""

    _control: ControlClient | None = None

    @property
    def config_path(self) -> Path:
        try:
            return Path(self.argv[self.argv.index("--config") + 1])
        except (ValueError, IndexError):
            raise AssertionError(f"{self.name} was started without --config") from None

    def control(self) -> ControlClient:
        if self._control is None:
            self._control = ControlClient(config=self.config_path)
        return self._control

    def mark(self) -> int:
        """The stream's position now: a later ``wait_event(since=mark)`` sees
        every event from here on (what an action after the mark caused)."""
        return self.control().mark()

    def wait_event(self, predicate: Callable[[Event], bool], timeout: float = 10.0, *,
                   since: int | None = None, what: str = "the event") -> Event:
        """The first event from ``since`` (default: after the last one
        waited for, or from the start) that ``predicate`` accepts; an
        AssertionError naming ``what`` with the events seen and the log's
        tail if none comes within ``timeout`` s or the process exits."""
        try:
            return self.control().wait_event(predicate, timeout, since=since,
                                             alive=self.alive).event
        except TimeoutError as exc:
            raise AssertionError(f"{what} from {self.name}: {exc}\n{self.tail(4000)}") from None

    def wait_ready(self, timeout: float = 20.0) -> Event:
        """READY: the gateway or the cluster's dispatcher listens on its ports."""
        return self.wait_event(event_is(EventType.READY), timeout, since=1, what="READY")

    def events(self, since: int = 1) -> list[Event]:
        """Every event the stream holds from ``since`` on."""
        out: list[Event] = []
        while True:
            got = self.control().events(since)
            out += [e.event for e in got.events]
            if not got.events:
                return out
            since = got.next

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        super().close()


def wait_assigned(proc: Proc, members: int, timeout: float = 15.0) -> Event:
    """The cluster's segment table is out: every one of its ``members``
    members joined (MEMBER_JOINED) and the table was assigned to them
    (SEGMENTS_MOVED, reason "assign"); returns that event (its ``epoch``)."""
    assigned = proc.wait_event(
        lambda e: e.type is EventType.SEGMENTS_MOVED and e.reason == "assign", timeout,
        since=1, what="the segment table assigned")
    joined = {e.member for e in proc.events() if e.type is EventType.MEMBER_JOINED}
    assert joined >= set(range(1, members + 1)), (joined, proc.tail())
    return assigned


def peer_result(proc: harness_procs.Proc) -> dict[str, Any] | None:
    """The last result ``ipsec-cluster peer --json`` printed (one JSON object
    on a line of its own: the command's output, not a log line; our peer
    serves no event stream), None before it printed one."""
    lines = [ln for ln in proc.log_text().splitlines() if ln.startswith("{")]
    if not lines:
        return None
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def wait_peer_result(proc: harness_procs.Proc, timeout: float = 20.0) -> dict[str, Any]:
    """``peer_result`` once there is one."""
    return wait_for(f"the result of {proc.name}", lambda: peer_result(proc), timeout=timeout,
                    diag=proc.tail)


class Procs(harness_procs.Procs):
    """Everything a test starts; ``close()`` (in a finally/fixture) stops all."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, proc_class=Proc)

    def start(self, name: str, argv: Sequence[str], **kw: Any) -> Proc:
        proc = super().start(name, argv, **kw)
        assert isinstance(proc, Proc)
        return proc


def cli_json(command: str, config: Path, *, ns: str | None = None,
             timeout: float = CLI_TIMEOUT_S) -> dict[str, Any]:
    """``ipsec-cluster status|sas --config F --json`` as a dict."""
    proc = subprocess.run(ns_argv(ns, cli_argv(command, "--config", str(config), "--json",
                                               "--timeout", "3")),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"ipsec-cluster {command} failed ({proc.returncode}): "
                             f"{proc.stdout}{proc.stderr}")
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def ask(config: Path, request: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """What ``ipsec-cluster status|sas`` asks, in-process (polling with the
    CLI costs a Python start-up per call): the control socket is an ipc://
    path, reachable from every network namespace."""
    try:
        with ControlClient(config=config, timeout=timeout) as client:
            return client.raw(request)
    except ControlTimeout:
        raise AssertionError(f"no cluster answers on {config}") from None


def status(config: Path, *, cli: bool = False) -> dict[str, Any]:
    """``status --json`` (``cli=True``: through the ``ipsec-cluster`` command)."""
    return cli_json("status", config) if cli else ask(config, b"status")


def sas(config: Path, *, cli: bool = False) -> dict[str, Any]:
    return cli_json("sas", config) if cli else ask(config, b"sas")


def wait_status(config: Path, what: str, predicate: Callable[[dict[str, Any]], bool], *,
                timeout: float = 20.0,
                diag: Callable[[], str] = lambda: "") -> dict[str, Any]:
    """The first ``status --json`` answer that satisfies ``predicate`` (a
    control socket that does not answer, e.g. while a dispatcher restarts,
    is "not yet")."""
    def check() -> dict[str, Any] | None:
        try:
            st = status(config)
        except AssertionError:
            return None
        return st if predicate(st) else None
    return wait_for(what, check, timeout=timeout, diag=diag)


def alive_members(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in st["members"] if m["alive"]]


def esp_sas(sas_answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Every installed ESP SA pair of every member, with ``member`` added."""
    out = []
    for m in sas_answer["members"]:
        for ch in m.get("child_sas", []):
            out.append({**ch, "member": m["member"]})
    return out


# -- the test's side of a udp: inside ---------------------------------------------------------


class Endpoint:
    """A socket at a gateway's ``udp:HOST:PORT`` inside: ``send`` puts inner
    packets into the gateway (to its ``inside_bind``), a reader thread keeps
    what the gateway writes out."""

    def __init__(self, bind: tuple[str, int], gateway: tuple[str, int], *,
                 ns: str | None = None) -> None:
        self.sock = socket_in_netns(ns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(bind)
        self.sock.settimeout(0.1)
        self.gateway = gateway
        self.received: list[bytes] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.received.append(data)

    def send(self, packet: bytes) -> None:
        self.sock.sendto(packet, self.gateway)
        self.sent += 1

    def take(self) -> list[bytes]:
        with self._lock:
            out, self.received = self.received, []
        return out

    def close(self) -> None:
        self._running = False
        self._thread.join(2)
        self.sock.close()


TRAFFIC_MARK = b"CLTT"
_TRAFFIC = struct.Struct("!4sHBI")  # mark, flow index, direction, sequence
UP, DOWN = 0, 1  # peer -> cluster, cluster -> peer


@dataclass(slots=True)
class TrafficResult:
    sent: Counter[tuple[int, int]] = field(default_factory=Counter)
    received: Counter[tuple[int, int]] = field(default_factory=Counter)
    bad: int = 0          # received, but not ours or with broken checksums
    misrouted: int = 0    # ours, but arrived with other addresses than sent

    def total(self, direction: int, which: str = "received") -> int:
        c = self.received if which == "received" else self.sent
        return sum(n for (_, d), n in c.items() if d == direction)

    def flows_seen(self, direction: int) -> set[int]:
        return {f for (f, d), n in self.received.items() if d == direction and n}


def exchange_traffic(flows: Sequence[tuple[str, str]], peer: Endpoint, cluster: Endpoint, *,
                     per_flow: int = 10, size: int = 200, burst: int = 50,
                     pause_s: float = 0.005, drain_s: float = 3.0,
                     window: int = 200) -> TrafficResult:
    """Inner IPv4/UDP packets through every flow ``(cluster host, peer host)``
    both ways: into the peer's inside, out of the cluster's, and back."""
    res = TrafficResult()
    pad = bytes(max(0, size - 28 - _TRAFFIC.size))
    expected: dict[tuple[int, int], tuple[str, str]] = {}
    work: list[tuple[Endpoint, bytes, tuple[int, int]]] = []
    for seq in range(per_flow):
        for i, (chost, phost) in enumerate(flows):
            for direction, ep, src, dst in ((UP, peer, phost, chost),
                                            (DOWN, cluster, chost, phost)):
                expected[(i, direction)] = (src, dst)
                body = _TRAFFIC.pack(TRAFFIC_MARK, i, direction, seq) + pad
                work.append((ep, udp4_packet(src, dst, 40000 + direction, 7000 + i % 1000, body,
                                             ident=seq), (i, direction)))
    got: list[bytes] = []
    for n, (ep, pkt, key) in enumerate(work):
        ep.send(pkt)
        res.sent[key] += 1
        if n % burst == burst - 1:
            time.sleep(pause_s)
            # paced by what came back (at most ``window`` packets in flight, or
            # a pause of up to 1 s): a loaded machine gets the traffic slower,
            # not dropped at a full socket buffer, so loss still means loss
            got += peer.take() + cluster.take()
            wait_until = time.monotonic() + 1.0
            while n + 1 - len(got) > window and time.monotonic() < wait_until:
                time.sleep(0.002)
                got += peer.take() + cluster.take()
    want = len(work)
    end = time.monotonic() + drain_s
    while time.monotonic() < end:
        got += peer.take() + cluster.take()
        if len(got) >= want:
            break
        time.sleep(0.05)
    time.sleep(0.1)
    got += peer.take() + cluster.take()
    for data in got:
        p = parse_udp4(data)
        if p is None or len(p.payload) < _TRAFFIC.size:
            res.bad += 1
            continue
        mark, i, direction, _seq = _TRAFFIC.unpack_from(p.payload)
        if mark != TRAFFIC_MARK or (i, direction) not in expected:
            res.bad += 1
            continue
        if expected[(i, direction)] != (p.src, p.dst):
            res.misrouted += 1
            continue
        res.received[(i, direction)] += 1
    return res


# -- the ESP-recording relay --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EspRecord:
    spi: int
    seq: int
    iv: bytes


class EspProxy:
    """Sits between our peer and the cluster (the peer's ``remote_port`` is
    ``listen``'s port). Every source seen at ``listen`` gets its own upstream
    socket towards ``target``, so the cluster sees one stable address per peer
    port; what comes back on it goes to that source. Every ESP packet (RFC 3948
    classification: not a 0xFF keepalive, not four zero bytes) is recorded as
    (SPI, seq, IV = the 8 bytes after SPI|seq) in ``to_cluster``/``to_peer``."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *,
                 ns: str | None = None, upstream_host: str | None = None) -> None:
        self.ns = ns
        self.target = target
        self.upstream_host = upstream_host or listen[0]
        self.listen = socket_in_netns(ns)
        self.listen.bind(listen)
        self.listen.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listen, selectors.EVENT_READ, None)
        self.upstream: dict[tuple[str, int], socket.socket] = {}
        self.to_cluster: list[EspRecord] = []
        self.to_peer: list[EspRecord] = []
        self.ike = Counter[str]()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _record(data: bytes, into: list[EspRecord], ike: Counter[str], key: str) -> None:
        if data == b"\xff":
            return
        if data[:4] == bytes(4):
            ike[key] += 1
            return
        if len(data) >= 16:
            spi, seq = struct.unpack_from("!II", data)
            into.append(EspRecord(spi, seq, data[8:16]))

    def _run(self) -> None:
        while self._running:
            for key, _ in self.sel.select(0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                source = key.data
                for _ in range(256):
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if source is None:   # from the peer
                        self._record(data, self.to_cluster, self.ike, "to_cluster")
                        up = self.upstream.get(addr)
                        if up is None:
                            up = socket_in_netns(self.ns)
                            up.bind((self.upstream_host, 0))
                            up.setblocking(False)
                            self.upstream[addr] = up
                            self.sel.register(up, selectors.EVENT_READ, addr)
                        with contextlib.suppress(OSError):
                            up.sendto(data, self.target)
                    else:                # from the cluster, back to that peer port
                        self._record(data, self.to_peer, self.ike, "to_peer")
                        with contextlib.suppress(OSError):
                            self.listen.sendto(data, source)

    def close(self) -> None:
        self._running = False
        self._thread.join(2)
        for sock in [self.listen, *self.upstream.values()]:
            sock.close()
        self.sel.close()


def assert_unique_ivs(records: Sequence[EspRecord], what: str) -> None:
    """No (SPI, IV) pair and no (SPI, seq) pair twice (RFC 4106 §3.1, RFC 3686 §3.1)."""
    pairs = Counter((r.spi, r.iv) for r in records)
    dup = [(f"{spi:08x}", iv.hex(), n) for (spi, iv), n in pairs.items() if n > 1]
    assert not dup, f"{what}: {len(dup)} (SPI, IV) pairs repeat, e.g. {dup[:5]}"
    seqs = Counter((r.spi, r.seq) for r in records)
    dup_seq = [(f"{spi:08x}", seq, n) for (spi, seq), n in seqs.items() if n > 1]
    assert not dup_seq, f"{what}: {len(dup_seq)} (SPI, seq) pairs repeat, e.g. {dup_seq[:5]}"
    assert len(pairs) == len(records)
