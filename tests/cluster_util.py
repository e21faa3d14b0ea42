"""Helpers for the process-level cluster tests (tests/test_cluster*.py).

- configs: ``ChildSpec``/``ConnSpec`` and ``gateway_toml`` render the cluster's
  and our peer's TOML (mirrored selectors, one identity per connection);
- processes: ``Proc`` runs ``ipsec-cluster ...`` (optionally in a namespace) in
  its own session with its log kept; ``stop()`` kills the whole process group
  (the dispatcher's members are in it), also when the test failed;
- ``status``/``sas`` ask the running cluster via ``ipsec-cluster status|sas --json``;
  ``wait_for`` polls a condition with a deadline and a diagnostic;
- inner packets: ``udp4_packet`` (IPv4/UDP with both checksums) and
  ``parse_udp4`` (verifies them);
- ``Endpoint``: the test's side of a ``udp:`` inside (a socket at the inside's
  HOST:PORT with a reader thread);
- ``EspProxy``: a UDP relay between our peer and the cluster that records
  (SPI, seq, IV) of every ESP packet in both directions;
- ``socket_in_netns``: a socket created inside a network namespace (a helper
  thread joins the namespace with setns(2); the socket stays there).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
PSK = "cluster-test-psk-0123456789abcdef"
KILL_GRACE_S = 5.0
CLI_TIMEOUT_S = 15.0
CLONE_NEWNET = 0x40000000
#: heartbeats (50 ms) missed before a member is declared dead, in test clusters
DEAD_AFTER = 40

T = TypeVar("T")


# -- configs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """A child as the cluster sees it: ``local_ts`` is the cluster's side."""

    name: str
    local_ts: str
    remote_ts: str
    esp: str = "aes128gcm16"

    def host_pair(self) -> tuple[str, str]:
        """(a host on the cluster's side, a host on the peer's side)."""
        return _host1(self.local_ts), _host1(self.remote_ts)


@dataclass(frozen=True, slots=True)
class ConnSpec:
    """A connection as the cluster sees it (``local_id`` = the cluster's id)."""

    name: str
    local_id: str
    remote_id: str
    children: tuple[ChildSpec, ...]
    proposals: str = "aes128gcm16-prfsha256-ecp256"


def _host1(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr).network_address + 1)


def grid_connections(n_ike: int, n_child: int, *, esps: Sequence[str] = (
        "aes128gcm16", "aes128ctr-sha256", "aes256gcm16")) -> list[ConnSpec]:
    """``n_ike`` connections (one identity each) with ``n_child`` children each,
    every child with its own selectors: cluster side 10.200.K.C*16/28, peer side
    10.100.K.C*16/28; ESP transforms alternate over ``esps``."""
    conns = []
    for k in range(n_ike):
        children = tuple(
            ChildSpec(f"c{c}", f"10.200.{k}.{c * 16}/28", f"10.100.{k}.{c * 16}/28",
                      esps[(k + c) % len(esps)])
            for c in range(n_child))
        conns.append(ConnSpec(f"k{k}", "gw.test", f"peer{k}.test", children))
    return conns


def gateway_toml(*, address: str, ports: tuple[int, int], inside: str,
                 conns: Sequence[ConnSpec], inside_bind: str = "", members: int | None = None,
                 remote: tuple[str, int] | None = None, log_level: str = "info",
                 extra: dict[str, Any] | None = None) -> str:
    """The cluster's config (``remote`` None), or our peer's (``remote`` = the
    address and port it initiates to; selectors and identities mirrored, every
    child started)."""
    lines = ["[cluster]", f'address = "{address}"', f"ike_port = {ports[0]}",
             f"natt_port = {ports[1]}", f'inside = "{inside}"', f'log_level = "{log_level}"']
    if inside_bind:
        lines.append(f'inside_bind = "{inside_bind}"')
    if members is not None:
        lines.append(f"members = {members}")
    # Not the failover tests: a member stalled by a loaded machine must not be
    # declared dead after the default 3 x 50 ms.
    extra = {"dead_after": DEAD_AFTER, **(extra or {})}
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for conn in conns:
        local_id, remote_id = conn.local_id, conn.remote_id
        if remote is not None:
            local_id, remote_id = remote_id, local_id
        lines += ["", f"[connections.{conn.name}]",
                  f'remote_addrs = ["{remote[0] if remote else "%any"}"]',
                  f'proposals = ["{conn.proposals}"]', f'local_id = "{local_id}"',
                  f'remote_id = "{remote_id}"', f'psk = "{PSK}"']
        if remote is not None:
            lines.append(f"remote_port = {remote[1]}")
        for ch in conn.children:
            local, rem = (ch.remote_ts, ch.local_ts) if remote else (ch.local_ts, ch.remote_ts)
            lines += ["", f"[connections.{conn.name}.children.{ch.name}]",
                      f'local_ts = ["{local}"]', f'remote_ts = ["{rem}"]',
                      f'esp_proposals = ["{ch.esp}"]',
                      f'start_action = "{"start" if remote else "none"}"']
    return "\n".join(lines) + "\n"


# -- processes -------------------------------------------------------------------------


def ns_prefix(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dispatcher.cli", *args]


class Proc:
    """One ``ipsec-cluster`` command (or any argv) in its own session, logging
    to ``log_path``; ``stop()`` ends its whole process group."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, ns: str | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen([*ns_prefix(ns), *argv], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log_text()
            if needle in text:
                return text
            if not self.alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in {self.log_path.name}:\n"
                             f"{self.log_text()[-4000:]}")

    def stop(self, grace_s: float = KILL_GRACE_S) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        # members (and anything else in the group) may outlive the leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace_s)
        self._log.close()


class Procs:
    """Everything a test starts; ``close()`` (in a finally/fixture) stops all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], *, ns: str | None = None) -> Proc:
        proc = Proc(argv, self.workdir / f"{name}.log", ns=ns)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child, not yet reaped) is dead too
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return False


def cli_json(command: str, config: Path, *, ns: str | None = None,
             timeout: float = CLI_TIMEOUT_S) -> dict[str, Any]:
    """``ipsec-cluster status|sas --config F --json`` as a dict."""
    proc = subprocess.run([*ns_prefix(ns), *cli_argv(command, "--config", str(config),
                                                     "--json", "--timeout", "3")],
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
    import zmq

    from common.config import load_config
    from dispatcher.supervisor import control_endpoint

    cfg = load_config(config.read_text(), str(config))
    ctx: Any = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        req.connect(control_endpoint(cfg, str(config)))
        req.send(request)
        answer: dict[str, Any] = json.loads(req.recv())
        return answer
    except zmq.Again:
        raise AssertionError(f"no cluster answers on {config}") from None
    finally:
        req.close(linger=0)


def status(config: Path, *, cli: bool = False) -> dict[str, Any]:
    """``status --json`` (``cli=True``: through the ``ipsec-cluster`` command)."""
    return cli_json("status", config) if cli else ask(config, b"status")


def sas(config: Path, *, cli: bool = False) -> dict[str, Any]:
    return cli_json("sas", config) if cli else ask(config, b"sas")


def wait_for(what: str, predicate: Callable[[], T | None], *, timeout: float = 20.0,
             interval: float = 0.2, diag: Callable[[], str] = lambda: "") -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError
    with ``diag()`` on timeout."""
    end = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diag()}")
        time.sleep(interval)


def wait_status(config: Path, what: str, predicate: Callable[[dict[str, Any]], bool], *,
                timeout: float = 20.0,
                diag: Callable[[], str] = lambda: "") -> dict[str, Any]:
    """The first ``status --json`` answer that satisfies ``predicate``."""
    def check() -> dict[str, Any] | None:
        st = status(config)
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


def tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return f"--- {path.name}\n{path.read_text(errors='replace')[-n:]}"
    return ""


# -- inner packets -----------------------------------------------------------------------

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(data: bytes) -> int:
    """RFC 1071."""
    return ~_ones_sum(data) & 0xFFFF


def udp4_packet(src: str, dst: str, sport: int, dport: int, payload: bytes,
                ident: int = 0) -> bytes:
    """IPv4/UDP with correct header and UDP checksums (RFC 791, RFC 768)."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp_len = 8 + len(payload)
    header = bytearray(_IPV4.pack(0x45, 0, 20 + udp_len, ident & 0xFFFF, 0, 64, 17, 0, s, d))
    struct.pack_into("!H", header, 10, inet_checksum(bytes(header)))
    pseudo = s + d + struct.pack("!BBH", 0, 17, udp_len)
    udp = bytearray(_UDP.pack(sport, dport, udp_len, 0) + payload)
    struct.pack_into("!H", udp, 6, inet_checksum(pseudo + bytes(udp)) or 0xFFFF)
    return bytes(header) + bytes(udp)


@dataclass(frozen=True, slots=True)
class Udp4:
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


def parse_udp4(packet: bytes) -> Udp4 | None:
    """The packet if it is IPv4/UDP with valid lengths and checksums, else None."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[9] != 17:
        return None
    total = struct.unpack_from("!H", packet, 2)[0]
    if total != len(packet) or inet_checksum(packet[:20]) != 0:
        return None
    s, d = packet[12:16], packet[16:20]
    sport, dport, udp_len, csum = _UDP.unpack_from(packet, 20)
    if udp_len != total - 20:
        return None
    pseudo = s + d + struct.pack("!BBH", 0, 17, udp_len)
    if csum and inet_checksum(pseudo + packet[20:]) != 0:
        return None
    return Udp4(str(ipaddress.IPv4Address(s)), str(ipaddress.IPv4Address(d)), sport, dport,
                packet[28:])


# -- namespaces ------------------------------------------------------------------------------


def socket_in_netns(ns: str | None, family: int = socket.AF_INET,
                    kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket living in network namespace ``ns`` (None: ours). setns(2) only
    changes the calling thread, so a short-lived thread makes it."""
    if ns is None:
        return socket.socket(family, kind)
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind))
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


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
                     pause_s: float = 0.005, drain_s: float = 3.0) -> TrafficResult:
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
    for n, (ep, pkt, key) in enumerate(work):
        ep.send(pkt)
        res.sent[key] += 1
        if n % burst == burst - 1:
            time.sleep(pause_s)
    want = len(work)
    end = time.monotonic() + drain_s
    got: list[bytes] = []
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
