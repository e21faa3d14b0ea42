"""An IKE_SA_INIT flood that answers cookies, and a legitimate initiator that
times its handshake (bench/test_flood_bench.py, tests/test_hostile_limits.py).

The generator (``python -m bench.flood``, run inside the peer's namespace):
one UDP socket per source address; at the asked rate, round robin over the
sources, an IKE_SA_INIT request with a real KE value (made once by our own
initiator, aes128gcm16-prfsha256-ecp256) and a fresh initiator SPI. A COOKIE
answer (RFC 7296 §2.6) is answered at once with the same request and the
cookie in front, built from the answer alone (the generator keeps no state
per request); an IKE_SA_INIT response is counted and never followed by
IKE_AUTH. At the end it prints one JSON line of counts.

``FloodLab`` sets up the namespaces (the peer's with ``SOURCES`` extra
addresses, the cluster's) and runs ``ipsec-cluster run`` there;
``handshake`` is a legitimate initiator (our IKE engine over sockets in the
peer's namespace) returning the time IKE_SA_INIT + IKE_AUTH took.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import selectors
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import configs
from bench.harness.control import ControlError, ask
from bench.harness.net import socket_in_netns
from bench.harness.procs import Procs, cli_argv, python_argv, tail
from bench.harness.waits import wait_for

ROOT = Path(__file__).resolve().parent.parent
PSK = "flood-bench-psk-0123456789abcdef"
GW, PEER = "198.18.0.2", "198.18.0.1"
PREFIX_LEN = 16
#: flood sources: 198.18.1.1 .. (on the peer's veth, in the same /16)
SOURCE_BASE = "198.18.1.1"
NON_ESP_MARKER = b"\0\0\0\0"
COOKIE = 16390  # RFC 7296 §3.10.1
NOTIFY = 41
IKE_SA_INIT = 34
HEADER = struct.Struct("!8s8sBBBBII")
NOTIFY_HEAD = struct.Struct("!BBHBBH")
TICK_S = 0.005
#: a control answer of a cluster under the flood
STATUS_TIMEOUT_S = 5.0
BURST_MAX = 400


def sources(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address(SOURCE_BASE))
    return [str(ipaddress.IPv4Address(base + i)) for i in range(n)]


# -- requests as bytes ------------------------------------------------------------------------


def template_request(gw: str) -> bytes:
    """A real IKE_SA_INIT request of our initiator (real KE value and nonce)."""
    eng = _initiator_engine(500, 4500, gw)
    eng.initiate("flood", (gw, 500), 0.0)
    [out] = eng.datagrams_to_send()
    return out.data


def with_spi(template: bytes, spi: bytes, cookie: bytes = b"") -> bytes:
    """``template`` with initiator SPI ``spi`` and, if given, N(COOKIE) first."""
    _, spi_r, first, ver, exch, flags, mid, _ = HEADER.unpack_from(template)
    body = template[HEADER.size:]
    if cookie:
        body = NOTIFY_HEAD.pack(first, 0, NOTIFY_HEAD.size + len(cookie), 0, 0, COOKIE) \
            + cookie + body
        first = NOTIFY
    return HEADER.pack(spi, spi_r, first, ver, exch, flags, mid, HEADER.size + len(body)) + body


def cookie_of(answer: bytes) -> tuple[bytes, bytes] | None:
    """(initiator SPI, cookie) of an IKE_SA_INIT answer that asks for one."""
    if len(answer) < HEADER.size + NOTIFY_HEAD.size:
        return None
    spi_i, _, first, _, exch, _, _, _ = HEADER.unpack_from(answer)
    if first != NOTIFY or exch != IKE_SA_INIT:
        return None
    _, _, plen, _, _, ntype = NOTIFY_HEAD.unpack_from(answer, HEADER.size)
    if ntype != COOKIE or plen < NOTIFY_HEAD.size:
        return None
    return spi_i, answer[HEADER.size + NOTIFY_HEAD.size:HEADER.size + plen]


# -- the generator ------------------------------------------------------------------------------


def flood(gw: str, gw_port: int, addrs: list[str], rate: float, seconds: float) -> dict[str, Any]:
    template = template_request(gw)
    sel = selectors.DefaultSelector()
    socks = []
    for a in addrs:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((a, 0))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    counts = {"sent": 0, "cookies_answered": 0, "init_answers": 0, "other_answers": 0,
              "send_errors": 0}
    prefix = os.urandom(3)
    n = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = min(int(rate * (now - t0)) - counts["sent"], BURST_MAX)
        for _ in range(max(0, due)):
            n += 1
            s = socks[n % len(socks)]
            try:
                s.sendto(with_spi(template, prefix + n.to_bytes(5, "big")), (gw, gw_port))
            except OSError:
                counts["send_errors"] += 1
            counts["sent"] += 1
        for key, _ in sel.select(TICK_S):
            _drain(key.fileobj, template, gw, gw_port, counts)  # type: ignore[arg-type]
    for s in socks:
        s.close()
    counts["seconds"] = round(time.monotonic() - t0, 3)
    return counts


def _drain(s: socket.socket, template: bytes, gw: str, gw_port: int,
           counts: dict[str, int]) -> None:
    for _ in range(64):
        try:
            data = s.recv(2048)
        except BlockingIOError:
            return
        asked = cookie_of(data)
        if asked is not None:
            try:
                s.sendto(with_spi(template, asked[0], asked[1]), (gw, gw_port))
                counts["cookies_answered"] += 1
            except OSError:
                counts["send_errors"] += 1
        elif len(data) >= HEADER.size and data[18] == IKE_SA_INIT:
            counts["init_answers"] += 1  # a half-open SA: never followed by IKE_AUTH
        else:
            counts["other_answers"] += 1


# -- a legitimate initiator ------------------------------------------------------------------------


def _initiator_engine(ike_port: int, natt_port: int, gw: str) -> Any:
    from common.cluster.spi import SpiAllocator
    from common.ike.context import IkeOptions
    from common.ike.engine import IkeEngine
    from common.ike.spis import SegmentSpis
    from tests.ike_pair import child, policy

    pol = policy("flood", "peer.test", "gw.test", PSK.encode(),
                 [child("c0", "10.202.0.0/24", "10.201.0.0/24")], remote_addrs=[gw])
    return IkeEngine([pol], random=os.urandom,
                     spis=SegmentSpis(SpiAllocator(os.urandom), [1]),
                     options=IkeOptions(ike_port=ike_port, natt_port=natt_port))


def handshake(ns: str | None, local: str, gw: str, timeout: float = 10.0,
              trace: list[str] | None = None) -> float | None:
    """IKE_SA_INIT (with a cookie round when asked) + IKE_AUTH from ``local``
    in namespace ``ns`` to the cluster at ``gw``:500/4500; the seconds it took,
    or None if it failed or timed out. The IKE SA is left to expire.
    ``trace`` gets a line per datagram and event."""
    from common.ike.events import IkeSaEstablished, IkeSaFailed

    s500, s4500 = socket_in_netns(ns), socket_in_netns(ns)
    try:
        s500.bind((local, 0))
        s4500.bind((local, 0))
        p500, p4500 = s500.getsockname()[1], s4500.getsockname()[1]
        eng = _initiator_engine(p500, p4500, gw)
        by_port = {p500: s500, p4500: s4500}
        sel = selectors.DefaultSelector()
        for s in (s500, s4500):
            sel.register(s, selectors.EVENT_READ)
        t0 = time.monotonic()
        eng.initiate("flood", (gw, 500), t0, initial_contact=False)
        while (now := time.monotonic()) < t0 + timeout:
            for out in eng.datagrams_to_send():
                data = out.data if out.remote[1] == 500 else NON_ESP_MARKER + out.data
                by_port[out.local_port].sendto(data, out.remote)
                if trace is not None:
                    trace.append(f"{now - t0:7.3f} -> {out.remote} {len(data)} B")
            while (ev := eng.next_event()) is not None:
                if trace is not None:
                    trace.append(f"{now - t0:7.3f} {ev}")
                if isinstance(ev, IkeSaEstablished):
                    return now - t0
                if isinstance(ev, IkeSaFailed):
                    return None
            timer = eng.get_timer()
            wait = min(0.05, max(0.0, timer - now)) if timer is not None else 0.05
            for key, _ in sel.select(wait):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                data, addr = sock.recvfrom(65535)
                if trace is not None:
                    trace.append(f"{time.monotonic() - t0:7.3f} <- {addr} {len(data)} B")
                port = sock.getsockname()[1]
                if port == p4500:
                    if not data.startswith(NON_ESP_MARKER):
                        continue
                    data = data[4:]
                eng.receive_datagram(data, addr, port, time.monotonic())
            eng.handle_timer(time.monotonic())
        return None
    finally:
        s500.close()
        s4500.close()


# -- the lab: namespaces and the cluster ---------------------------------------------------


def cluster_toml(members: int, inside_port: int) -> str:
    conn = configs.Conn("flood", "gw.test", "peer.test",
                        (configs.Child("c0", "10.201.0.0/24", "10.202.0.0/24"),))
    return configs.gateway_toml(
        address=GW, ports=(500, 4500), inside=f"udp:127.0.0.1:{inside_port}",
        inside_bind=f"127.0.0.1:{inside_port + 1}", members=members, conns=[conn], psk=PSK,
        log_level="warning",
        # the shared test machine stalls processes for seconds under the
        # flood: a member must not be declared dead
        extra={"heartbeat_interval": 0.2, "dead_after": 25})


def _status(config: Path) -> dict[str, Any]:
    return ask(config, "status", timeout=STATUS_TIMEOUT_S)


class FloodLab:
    """Two namespaces joined by a veth (/16): the peer's (PEER and ``n_sources``
    flood addresses) and the cluster's (GW), with ``ipsec-cluster run`` of
    ``members`` members. ``close()`` undoes everything."""

    def __init__(self, workdir: Path, members: int, n_sources: int) -> None:
        from tests.lab.netns import Lab

        self.lab = Lab(workdir=workdir)
        self.procs = Procs(workdir)
        try:
            self.peer_ns, self.gw_ns = self.lab.netns(), self.lab.netns()
            veth = self.lab.veth(self.peer_ns, self.gw_ns, f"{PEER}/{PREFIX_LEN}",
                                 f"{GW}/{PREFIX_LEN}")
            self.sources = sources(n_sources)
            batch = "".join(f"addr add {a}/{PREFIX_LEN} dev {veth.dev_a}\n"
                            for a in self.sources)
            subprocess.run(["ip", "-n", self.peer_ns, "-batch", "-"], input=batch, text=True,
                           check=True, timeout=60)
            self.config = workdir / "cluster.toml"
            self.config.write_text(cluster_toml(members, 39000))
            self.cluster = self.procs.start("cluster", cli_argv("run", "--config",
                                                                str(self.config)),
                                            ns=self.gw_ns)
            wait_for(f"{members} members alive",
                     lambda: sum(m["alive"] for m in _status(self.config)["members"]) == members
                     and all(m["segments"] for m in _status(self.config)["members"]),
                     timeout=30, diag=lambda: tail(self.cluster.log_path))
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, int]:
        st = _status(self.config)
        out = {"dispatcher": int(st["dispatcher"]["pid"])}
        out.update({f"member{m['id']}": int(m["pid"]) for m in st["members"]})
        return out

    def half_open(self) -> dict[int, int]:
        """Half-open IKE SAs per member (``ipsec-cluster status``, from the
        members' last heartbeats)."""
        return {int(m["id"]): int(m["half_open_ike_sas"])
                for m in _status(self.config)["members"]}

    def drops(self) -> dict[str, int]:
        """Every member's IKE drops, summed (``ipsec-cluster status``)."""
        total: dict[str, int] = {}
        for m in _status(self.config)["members"]:
            for k, v in m["drops"].items():
                total[k] = total.get(k, 0) + v
        return total

    def start_flood(self, rate: float, seconds: float) -> subprocess.Popen[str]:
        argv = python_argv("bench.flood", "--gw", GW, "--sources", str(len(self.sources)),
                           "--rate", str(rate), "--seconds", str(seconds))
        return self.lab.popen(self.peer_ns, argv, stdout=subprocess.PIPE,
                              stderr=(self.lab.workdir / "flood.log").open("wb"), text=True,
                              cwd=str(ROOT))

    def close(self) -> None:
        self.procs.close()
        self.lab.close()


@dataclass
class FloodRun:
    """What one flood did to the cluster."""

    rate: float
    seconds: float
    generator: dict[str, Any] = field(default_factory=dict)
    #: process -> peak VmRSS (bytes) during the flood
    peak_rss: dict[str, int] = field(default_factory=dict)
    #: member -> highest half-open count seen
    peak_half_open: dict[int, int] = field(default_factory=dict)
    #: legitimate handshakes during the flood: seconds, None = failed
    handshakes: list[float | None] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    samples: int = 0


def run_flood(lab: FloodLab, rate: float, seconds: float, *, probe_every_s: float = 3.0,
              probe_timeout_s: float = 10.0) -> FloodRun:
    """Flood for ``seconds`` at ``rate``; meanwhile sample every process's RSS
    and the half-open counts (twice a second, a thread) and time a legitimate
    handshake every ``probe_every_s``."""
    run = FloodRun(rate, seconds)
    pids = lab.pids()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for name, pid in pids.items():
                run.peak_rss[name] = max(run.peak_rss.get(name, 0), rss_bytes(pid))
            with contextlib.suppress(ControlError):  # an overloaded cluster answers late
                for m, n in lab.half_open().items():
                    run.peak_half_open[m] = max(run.peak_half_open.get(m, 0), n)
            run.samples += 1

    sampler = threading.Thread(target=sample, daemon=True)
    gen = lab.start_flood(rate, seconds)
    sampler.start()
    try:
        time.sleep(min(2.0, seconds / 4))  # let the flood reach its steady state
        while gen.poll() is None:
            started = time.monotonic()
            run.handshakes.append(handshake(lab.peer_ns, PEER, GW, probe_timeout_s))
            time.sleep(max(0.0, probe_every_s - (time.monotonic() - started)))
        out, _ = gen.communicate(timeout=30)
        run.generator = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    finally:
        stop.set()
        sampler.join(5)
    run.drops = lab.drops()
    return run


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gw", default=GW)
    ap.add_argument("--port", type=int, default=500)
    ap.add_argument("--sources", type=int, default=250)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    print(json.dumps(flood(args.gw, args.port, sources(args.sources), args.rate,
                           args.seconds)), flush=True)


if __name__ == "__main__":
    main()
