"""Cluster throughput: lossless inner packets/s through the cluster (1, 2, 3
members) and through strongSwan's charon (kernel-libipsec), in both
directions, with the same generators for every target, in one run.

Run (root, strongSwan installed; ~6 minutes; never part of ``make test``;
IPSEC_CLUSTER_SKIP_BENCH=1 skips it, e.g. in ``make bench``):

    .venv/bin/pytest bench/test_cluster_bench.py -q -s

Set IPSEC_CLUSTER_BENCH_SECONDS to change the seconds per point (default 3).

Setup per target, in a fresh namespace pair (tests/lab): ns a (198.18.0.1) is
the peer, ns b (198.18.0.2) the target and its protected network (10.200.K.1
on ``lo``, one host per child). In ns a ``bench/esp_blaster.py`` (our gateway
as the initiator) brings up one IKE SA with ``N_CHILDREN`` AES-GCM-128
children (10.100.K.0/24 <-> 10.200.K.0/24) against the target.

- Direction ``in`` (peer -> protected network): the ESP generator
  pre-encrypts every packet of a point (before the clock starts) and sends
  them UDP-encapsulated to port 4500, with sendmmsg(2) paced in 1 ms
  batches. The target decrypts (the cluster's members; charon into
  ``ipsec0``); the inner packets (IPv4/UDP to port 9 of 10.200.K.1) are
  counted by a UDP sink socket in ns b (``Sink``, recvmmsg in a thread).
- Direction ``out`` (protected network -> peer): ``bench/clear_blaster.py``
  in ns b sends cleartext IPv4/UDP from 10.200.K.1 to 10.100.K.1:9 with the
  same pacing loop; the target's routes put it into its tunnel (the
  cluster's table 220 into its TUN, charon's table 220 into ``ipsec0``);
  the target encrypts and sends ESP to ns a. There an nftables rule on
  input (``EspCounter``: UDP from 198.18.0.2 port 4500 whose first four
  payload bytes are one of the children's inbound SPIs at the initiator)
  counts and drops it, exactly and without decrypting; a second rule counts
  ESP with any other SPI (should stay 0). Before the rules go in, a sample
  of 200 packets is decrypted by the initiator itself (its ``esp_in``
  counter): the validity check.

A point is *lossless* when at least 99 % of what was sent arrived within the
send window plus ``GRACE_S`` and the generator kept the asked rate. Search
per (target, direction, size): one unpaced probe (``PROBE_S``) gives the
delivered rate D under overload; then a bisection over [D/4, 1.2 D] (capped
by what the generator reached) with ``POINTS`` points, and when none of them
was lossless, D/4 and then D/8; the answer is the highest lossless rate
seen. CPU per packet = the CPU time (utime + stime
from /proc) of every gateway process (the dispatcher and all members; charon)
during the best lossless point / packets delivered.

ESP through the dispatcher: ``status --json`` -> ``dispatcher.esp_relayed``
(a packet count) when the dispatcher reports it; otherwise the dispatcher's
``counters``: ``udp_in - keepalive + udp_out``, every datagram it read on its
IKE/NAT-T sockets and sent for a member (ESP, and IKE, of which there is none
in a window: DPD is 30 s). Read before and after each point; the table shows
the best point's delta and which counter it came from.

The last test prints the table and the summary line (cluster with 2 members
against strongSwan, each direction and size; cpu/pkt is the worst of the four
cells' cluster-2 / charon CPU per packet) and writes docs/throughput.png.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.harness.configs import Child, Conn, cluster_table, dumps, gateway_config, peer_config
from bench.harness.control import ask
from bench.harness.net import socket_in_netns
from bench.harness.procs import Proc, cli_argv, python_argv

ROOT = Path(__file__).resolve().parent.parent
PSK = "bench-cluster-psk-0123456789abcdef"
N_CHILDREN = 6
SIZES = (64, 1400)
DIRECTIONS = ("in", "out")
SECONDS = float(os.environ.get("IPSEC_CLUSTER_BENCH_SECONDS", "3"))
PROBE_S = 1.5
POINTS = 4
GRACE_S = 0.3
LOSS_OK = 0.01
GW, PEER = "198.18.0.2", "198.18.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SO_RCVBUFFORCE = 33  # Linux; the socket module does not export it
MSG_WAITFORONE = 0x10000
#: the outbound direction's validity sample: packets, at this rate
SAMPLE = (200, 2000.0)
NFT_TABLE = "ipsec_cluster_bench"

#: inside address of the cluster's TUN; heartbeats: with the default 50 ms x 3
#: an overloaded dispatcher declares every member dead (see docs/performance.md)
CLUSTER_EXTRA: dict[str, Any] = {"inside_address": "10.199.0.1", "heartbeat_interval": 0.2,
                                 "dead_after": 25}
TARGETS = ("strongswan", "cluster-1", "cluster-2", "cluster-3")
#: the cluster compared with strongSwan in the summary line
COMPARED = "cluster-2"
#: (target, direction, size) -> Result
RESULTS: dict[tuple[str, str, int], Result] = {}
#: the dispatcher's ESP count: (value, which counter) or None (charon)
Relayed = Callable[[], tuple[int, str]]


@dataclass
class Point:
    rate: float          # asked
    sent: int
    delivered: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds
    errors: int = 0      # sendmmsg refusals (EAGAIN): counted as lost
    relayed: int | None = None  # ESP datagrams through the dispatcher in the point

    @property
    def ok(self) -> bool:
        """Lossless, and the generator kept the asked rate (it shares the CPUs
        with the target: a rate it could not keep does not count)."""
        return (self.loss < LOSS_OK and self.rate > 0
                and self.sent / self.seconds >= 0.95 * self.rate)

    @property
    def loss(self) -> float:
        total = self.sent + self.errors
        return 1.0 - self.delivered / total if total else 1.0

    @property
    def pps(self) -> float:
        return self.delivered / self.seconds

    def us_per_packet(self, prefix: str = "") -> float:
        """CPU µs per delivered packet of the processes named ``prefix*``."""
        cpu = sum(v for k, v in self.cpu.items() if k.startswith(prefix))
        return 1e6 * cpu / self.delivered if self.delivered else 0.0


@dataclass
class Result:
    target: str
    direction: str
    size: int
    probe: Point
    points: list[Point]
    gen_max: float
    best: Point | None = None
    note: str = ""
    relayed_by: str = ""     # which counter Point.relayed came from
    wrong_spi: int = 0       # out: ESP with an SPI that is no child's (whole search)


# -- lab pieces --------------------------------------------------------------------------


def _lab_reason() -> str | None:
    from tests.lab.netns import lab_unavailable_reason
    return lab_unavailable_reason(need_charon=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Any]:
    if os.environ.get("IPSEC_CLUSTER_SKIP_BENCH") == "1":
        pytest.skip("IPSEC_CLUSTER_SKIP_BENCH=1")
    reason = _lab_reason()
    if reason is not None:
        pytest.skip(reason)
    from tests.lab.netns import Lab
    lb = Lab(workdir=tmp_path)
    try:
        yield lb
    finally:
        lb.close()


class Sink:
    """Direction in: counts datagrams to UDP port 9 on every address of ns b
    (recvmmsg(2) in a thread, 256 at a time, so the count costs the shared
    CPUs little)."""

    BATCH = 256

    def __init__(self, ns: str) -> None:
        from bench.esp_blaster import _Iovec, _Mmsghdr
        self.sock = socket_in_netns(ns)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self.sock.bind(("0.0.0.0", 9))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", 0, 100_000))
        self._bufs = [ctypes.create_string_buffer(64) for _ in range(self.BATCH)]
        self._iovs = (_Iovec * self.BATCH)()
        self._msgs = (_Mmsghdr * self.BATCH)()
        for i, b in enumerate(self._bufs):
            self._iovs[i].iov_base = ctypes.addressof(b)
            self._iovs[i].iov_len = 64      # truncated: only counted
            self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iovs[i])
            self._msgs[i].msg_hdr.msg_iovlen = 1
        libc = ctypes.CDLL(None, use_errno=True)
        self._recvmmsg = libc.recvmmsg
        self._recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                                   ctypes.c_void_p]
        self._recvmmsg.restype = ctypes.c_int
        self._count = 0
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        fd, msgs, recvmmsg = self.sock.fileno(), ctypes.addressof(self._msgs), self._recvmmsg
        while not self._stop:
            r = recvmmsg(fd, msgs, self.BATCH, MSG_WAITFORONE, None)
            if r > 0:
                self._count += r

    def count(self) -> int:
        return self._count

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


class EspCounter:
    """Direction out: an nftables table in ns a that counts, then drops, the
    ESP the target sends to the peer (UDP from ``GW`` port 4500): ``esp_ok``
    when its SPI is one of ``spis`` (the children's inbound SPIs at the
    initiator), ``esp_other`` for any other SPI. Dropped before any socket,
    so the initiator does not decrypt a flood the CPUs would pay for; the
    kernel counts exactly."""

    def __init__(self, lab: Any, ns: str, spis: Sequence[str]) -> None:
        self.lab, self.ns = lab, ns
        match = f"ip saddr {GW} udp sport 4500"
        spi_set = ", ".join(f"0x{s}" for s in spis)
        rules = f"""
table ip {NFT_TABLE} {{
    counter esp_ok {{ }}
    counter esp_other {{ }}
    chain input {{
        type filter hook input priority -150; policy accept;
        {match} @th,64,32 {{ {spi_set} }} counter name "esp_ok" drop
        {match} @th,64,32 != 0 counter name "esp_other" drop
    }}
}}
"""
        lab.run(ns, ["nft", "-f", "-"], input=rules)

    def _counters(self) -> dict[str, int]:
        out = self.lab.run(self.ns, ["nft", "-j", "list", "counters", "table", "ip",
                                     NFT_TABLE]).stdout
        found: dict[str, int] = {}
        for item in json.loads(out).get("nftables", []):
            c = item.get("counter")
            if c is not None:
                found[c["name"]] = int(c["packets"])
        return found

    def count(self) -> int:
        return self._counters().get("esp_ok", 0)

    def other(self) -> int:
        return self._counters().get("esp_other", 0)

    def close(self) -> None:
        self.lab.run(self.ns, ["nft", "delete", "table", "ip", NFT_TABLE], check=False)


def settled(count: Callable[[], int], quiet_s: float = 0.3, timeout: float = 10.0) -> int:
    """``count()`` once it did not move for ``quiet_s``."""
    end = time.monotonic() + timeout
    last = count()
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = count()
        if now == last:
            return now
        last = now
    return last


def _load() -> str:
    """The 1-minute load average (the machine is shared: the log says how
    quiet it was)."""
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().split()[0]
    return "?"


def _cpu(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


class Generator:
    """A generator process (bench/esp_blaster.py in ns a, or
    bench/clear_blaster.py in ns b), driven over its stdin/stdout."""

    def __init__(self, lab: Any, ns: str, argv: list[str], log: Path) -> None:
        self.proc = Proc(argv, log, stdin_pipe=True, stdout_pipe=True, text=True,
                         popen=lambda argv, **kw: lab.popen(ns, argv, **kw)).proc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.ready = self._read()
        assert self.ready.get("ready"), f"generator not ready: {self.ready}"

    def _read(self) -> dict[str, Any]:
        line = self.stdout.readline()
        if not line:
            raise AssertionError(f"generator exited ({self.proc.poll()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.stdin.write(json.dumps(cmd) + "\n")
        self.stdin.flush()
        return self._read()

    def blast(self, rate: float, seconds: float, size: int, on_go: Any) -> dict[str, Any]:
        go = self.ask({"op": "blast", "rate": rate, "seconds": seconds, "size": size})
        assert go.get("go"), go
        on_go()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stdin.write('{"op": "quit"}\n')
            self.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(3)


def measure(gen: Generator, count: Callable[[], int], pids: dict[str, int], rate: float,
            seconds: float, size: int, relayed: Relayed | None,
            tun_dropped: Callable[[], int] | None = None) -> Point:
    before = settled(count)
    r0 = relayed()[0] if relayed else None
    dropped0 = tun_dropped() if tun_dropped else 0
    cpu0: dict[str, float] = {}

    def go() -> None:
        cpu0.update({name: _cpu(pid) for name, pid in pids.items()})

    res = gen.blast(rate, seconds, size, go)
    time.sleep(GRACE_S)
    delivered = count() - before
    cpu = {name: _cpu(pid) - cpu0.get(name, 0.0) for name, pid in pids.items()}
    r1 = relayed()[0] if relayed else None
    dropped = tun_dropped() - dropped0 if tun_dropped else None
    p = Point(rate, res["sent"], delivered, res["seconds"], cpu, res["errors"],
              None if r0 is None or r1 is None else r1 - r0)
    print(f"    rate {rate:9.0f}  sent {p.sent:8d} in {p.seconds:5.2f}s ({res['rate']:9.0f}/s)"
          f"  send errors {p.errors:6d}  delivered {p.delivered:8d}  loss {100 * p.loss:6.2f}%"
          f"  cpu {p.us_per_packet():5.1f} us/pkt"
          f"{'' if p.relayed is None else f'  relayed {p.relayed}'}"
          f"{'' if dropped is None else f'  tun drops {dropped}'}"
          f"  {'ok' if p.ok else ''}", flush=True)
    return p


def search(target: str, direction: str, gen: Generator, count: Callable[[], int],
           pids: dict[str, int], relayed: Relayed | None, note: str = "",
           tun_dropped: Callable[[], int] | None = None) -> list[Result]:
    out = []
    for size in SIZES:
        print(f"\n  {target} {direction} {size} B (load average {_load()})", flush=True)
        probe = measure(gen, count, pids, 0, PROBE_S, size, relayed, tun_dropped)
        gen_max = probe.sent / probe.seconds
        d = probe.pps
        res = Result(target, direction, size, probe, [], gen_max, note=note,
                     relayed_by=relayed()[1] if relayed else "")
        lo, hi = d / 4, min(1.2 * d, 0.98 * gen_max)
        rate = min(0.85 * d, hi)
        for _ in range(POINTS):
            p = measure(gen, count, pids, rate, SECONDS, size, relayed, tun_dropped)
            res.points.append(p)
            if p.ok:
                if res.best is None or p.pps > res.best.pps:
                    res.best = p
                lo = rate
            else:
                hi = rate
            rate = (lo + hi) / 2
        # nothing lossless down to D/4: two more points below it (D/4, D/8)
        # rather than a zero
        for low in (d / 4, d / 8):
            if res.best is not None or low <= 0:
                break
            p = measure(gen, count, pids, low, SECONDS, size, relayed, tun_dropped)
            res.points.append(p)
            if p.ok:
                res.best = p
        if res.best is not None and res.best.rate >= 0.97 * 0.98 * gen_max:
            res.note = "; ".join(x for x in (res.note, "generator-limited") if x)
        RESULTS[(target, direction, size)] = res
        out.append(res)
    return out


# -- targets --------------------------------------------------------------------------------


def _children() -> list[tuple[str, str, str]]:
    """(name, cluster side, peer side) per child."""
    return [(f"c{k}", f"10.200.{k}.0/24", f"10.100.{k}.0/24") for k in range(N_CHILDREN)]


def _conn() -> Conn:
    """The one connection, as the cluster (or charon) sees it."""
    return Conn("bench", "gw.test", "peer.test",
                tuple(Child(name, gw_side, peer_side) for name, gw_side, peer_side
                      in _children()), options={"dpd_delay": 30})


def _setup_pair(lab: Any) -> tuple[str, str]:
    ns_a, ns_b, _veth = lab.pair()
    for _, gw_side, _peer in _children():
        lab.add_lo_addr(ns_b, gw_side.replace(".0/24", ".1"))
    return ns_a, ns_b


def _peer_config(tmp_path: Path) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(dumps(peer_config(
        cluster_table(address=PEER, inside="udp:127.0.0.1:9", log_level="warning"),
        [_conn()], psk=PSK, remote=(GW, None))))
    return path


def _esp_generator(lab: Any, ns_a: str, tmp_path: Path) -> Generator:
    return Generator(lab, ns_a, python_argv("bench.esp_blaster", "--config",
                                            str(_peer_config(tmp_path)),
                                            "--children", str(N_CHILDREN)),
                     tmp_path / "blaster.log")


def _clear_generator(lab: Any, ns_b: str, tmp_path: Path) -> Generator:
    flows = [arg for _, gw_side, peer_side in _children()
             for arg in ("--flow", f"{gw_side.replace('.0/24', '.1')},"
                                   f"{peer_side.replace('.0/24', '.1')}")]
    return Generator(lab, ns_b, python_argv("bench.clear_blaster", *flows),
                     tmp_path / "clear.log")


def _sample(esp_gen: Generator, clear: Generator) -> str:
    """Direction out's validity check: a few packets through the target,
    decrypted and counted by the initiator itself (``esp_in``)."""
    n, rate = SAMPLE
    before = int(esp_gen.ask({"op": "stats"})["esp_in"])
    res = clear.blast(rate, n / rate, 64, lambda: None)
    got = settled(lambda: int(esp_gen.ask({"op": "stats"})["esp_in"]) - before,
                  quiet_s=0.3, timeout=5)
    valid = got >= (1 - LOSS_OK) * res["sent"]
    note = f"sample {got}/{res['sent']} decrypted by the peer{'' if valid else ': INVALID'}"
    print(f"\n  out: {note}", flush=True)
    return note


def both_directions(lab: Any, tmp_path: Path, target: str, ns_a: str, ns_b: str,
                    esp_gen: Generator, sink: Sink, pids: dict[str, int],
                    relayed: Relayed | None, tun: str) -> None:
    """Direction in (the ESP generator, the sink), then out (the cleartext
    generator, the validity sample, the nftables counter; each point's log
    line shows what the target's TUN device ``tun`` dropped on its way in)."""
    search(target, "in", esp_gen, sink.count, pids, relayed)
    clear = _clear_generator(lab, ns_b, tmp_path)
    counter: EspCounter | None = None
    try:
        note = _sample(esp_gen, clear)
        counter = EspCounter(lab, ns_a, [c["spi_in"] for c in esp_gen.ready["children"]])
        results = search(target, "out", clear, counter.count, pids, relayed, note,
                         lambda: _tx_dropped(lab, ns_b, tun))
        wrong = counter.other()
        for r in results:
            r.wrong_spi = wrong
        print(f"  out: ESP with an SPI that is no child's: {wrong}", flush=True)
    finally:
        if counter is not None:
            counter.close()
        clear.close()


def _tx_dropped(lab: Any, ns: str, dev: str) -> int:
    """Packets the kernel dropped on their way into TUN device ``dev`` (its
    queue full: the gateway did not read fast enough)."""
    out = lab.run(ns, ["ip", "-j", "-s", "link", "show", "dev", dev], check=False).stdout
    with contextlib.suppress(ValueError, LookupError, TypeError):
        return int(json.loads(out)[0]["stats64"]["tx"]["dropped"])
    return 0


def _cluster_status(config: Path) -> dict[str, Any]:
    return ask(config, "status", timeout=3)


def _esp_relayed(config: Path) -> tuple[int, str]:
    """ESP datagrams the dispatcher handled so far, and which counter says so
    (module docstring)."""
    d = _cluster_status(config)["dispatcher"]
    counters = d.get("counters", {})
    for where in (d, counters):
        if "esp_relayed" in where:
            return int(where["esp_relayed"]), "esp_relayed"
    return (int(counters.get("udp_in", 0)) - int(counters.get("keepalive", 0))
            + int(counters.get("udp_out", 0))), "udp_in+udp_out"


def _wait(what: str, pred: Any, timeout: float = 40.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            v = pred()
            if v:
                return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_cluster(lab: Any, tmp_path: Path, members: int) -> None:
    ns_a, ns_b = _setup_pair(lab)
    extra: dict[str, Any] = {"members": members}
    if members == 1:
        # a members endpoint: dispatcher + 1 member process, not the single-process gateway
        extra["sync"] = f"ipc://{tmp_path}/members.ipc"
    config = tmp_path / "cluster.toml"
    config.write_text(dumps(gateway_config(
        cluster_table(address=GW, inside="tun:ipsb0", log_level="warning", **extra,
                      **CLUSTER_EXTRA), [_conn()], psk=PSK)))
    Proc(cli_argv("run", "--config", str(config)), tmp_path / "cluster.log",
         popen=lambda argv, **kw: lab.popen(ns_b, argv, **kw))
    def ready() -> dict[str, Any] | None:
        s = _cluster_status(config)
        n = sum(m["alive"] and m["segments"] > 0 for m in s["members"])
        return s if n == members else None

    _wait(f"{members} members with segments", ready)
    sink = Sink(ns_b)
    gen = _esp_generator(lab, ns_a, tmp_path)
    try:
        def placed() -> dict[str, Any] | None:
            s = _cluster_status(config)
            return s if sum(m["child_sas"] for m in s["members"]) >= N_CHILDREN else None

        st = _wait("children on members", placed)
        placement = {m["id"]: m["child_sas"] for m in st["members"]}
        print(f"\n  cluster-{members}: children per member {placement}", flush=True)
        pids = {"dispatcher": st["dispatcher"]["pid"]}
        pids.update({f"member{m['id']}": m["pid"] for m in st["members"]})
        both_directions(lab, tmp_path, f"cluster-{members}", ns_a, ns_b, gen, sink, pids,
                        lambda: _esp_relayed(config), "ipsb0")
        final = _cluster_status(config)
        print(f"  dispatcher counters {final['dispatcher']['counters']}"
              f" drops {final['dispatcher']['drops']}; members "
              f"{[(m['id'], m['packets_in'], m['drops']) for m in final['members']]}")
    finally:
        gen.close()
        sink.close()


def run_strongswan(lab: Any, tmp_path: Path) -> None:
    from tests.lab import charon as charon_conf
    from tests.lab.charon import render_swanctl_conf
    ns_a, ns_b = _setup_pair(lab)
    charon = lab.charon(ns_b, "charon-b")
    charon.load(render_swanctl_conf(charon_conf.Conn(
        "bench", GW, PEER, [charon_conf.Child(n, gw_side, peer_side) for n, gw_side, peer_side
                            in _children()],
        local_id="gw.test", remote_id="peer.test", psk=PSK)))
    sink = Sink(ns_b)
    gen = _esp_generator(lab, ns_a, tmp_path)
    try:
        charon.wait_for("children at charon",
                        lambda: len(charon.child_sas()) == N_CHILDREN, timeout=10)
        pid = int((charon.run_dir / "charon.pid").read_text().strip())
        both_directions(lab, tmp_path, "strongswan", ns_a, ns_b, gen, sink, {"charon": pid},
                        None, "ipsec0")
    finally:
        gen.close()
        sink.close()


@pytest.mark.parametrize("target", TARGETS)
def test_throughput(target: str, lab: Any, tmp_path: Path) -> None:
    if target == "strongswan":
        run_strongswan(lab, tmp_path)
    else:
        run_cluster(lab, tmp_path, int(target.split("-")[1]))
    for direction in DIRECTIONS:
        for size in SIZES:
            assert (target, direction, size) in RESULTS


# -- report ---------------------------------------------------------------------------------


def _relayed_cell(r: Result) -> str:
    b = r.best
    if r.target == "strongswan" or b is None or b.relayed is None:
        return "-"
    share = f" ({b.relayed / b.delivered:.2f}/pkt)" if b.delivered else ""
    if r.relayed_by == "esp_relayed":
        return f"{b.relayed:,}{share}"
    return f"n/a; {r.relayed_by} {b.relayed:,}{share}"


def _row(r: Result, base: Result | None) -> str:
    b = r.best
    pps = b.pps if b else 0.0
    mbit = pps * r.size * 8 / 1e6
    ratio = f"{pps / base.best.pps:.2f}x" if base and base.best and b else "-"
    total = f"{b.us_per_packet():.1f}" if b else "-"
    disp = f"{b.us_per_packet('dispatcher'):.1f}" if b and r.target != "strongswan" else "-"
    members_col = r.target.split("-")[1] if "-" in r.target else "-"
    note = "; ".join(x for x in (r.note, f"wrong SPI {r.wrong_spi}" if r.wrong_spi else "")
                     if x)
    return (f"| {r.direction} | {r.target.split('-')[0]} | {members_col} | {r.size} | "
            f"{pps:,.0f} | {mbit:,.0f} | {ratio} | {total} | {disp} | {_relayed_cell(r)} | "
            f"{r.probe.pps:,.0f} | {r.gen_max:,.0f} | {note} |")


def summary() -> str:
    """The one line: COMPARED against strongSwan per direction and size, and
    the worst (highest) ratio of their CPU per packet over those cells."""
    parts, cpu = [], []
    for direction in DIRECTIONS:
        for size in SIZES:
            c = RESULTS.get((COMPARED, direction, size))
            s = RESULTS.get(("strongswan", direction, size))
            if c and s and c.best and s.best and s.best.pps:
                parts.append(f"{direction} {size} B x{c.best.pps / s.best.pps:.2f}")
                if s.best.us_per_packet():
                    cpu.append(c.best.us_per_packet() / s.best.us_per_packet())
            else:
                parts.append(f"{direction} {size} B x-")
    worst = f"x{max(cpu):.2f}" if len(cpu) == len(parts) else "x-"
    return f"cluster vs strongSwan: {', '.join(parts)}; cpu/pkt {worst}"


def test_report() -> None:
    if not RESULTS:
        pytest.skip("run the whole module to get the table")
    lines = ["| direction | target | members | size B | lossless pps | Mbit/s | vs strongSwan "
             "| CPU µs/pkt, all gateway processes | of which dispatcher "
             "| ESP via dispatcher (best point) | overload delivered pps "
             "| generator max pps | note |", "|---" * 13 + "|"]
    for direction in DIRECTIONS:
        for size in SIZES:
            base = RESULTS.get(("strongswan", direction, size))
            for target in TARGETS:
                r = RESULTS.get((target, direction, size))
                if r is not None:
                    lines.append(_row(r, base))
    print("\n" + "\n".join(lines))
    print(f"load average at the end: {_load()}")
    _plot()
    print(summary(), flush=True)


def _plot() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(DIRECTIONS), len(SIZES), figsize=(10, 7.5), squeeze=False)
    titles = {"in": "peer -> protected network", "out": "protected network -> peer"}
    for row, direction in zip(axes, DIRECTIONS, strict=True):
        for ax, size in zip(row, SIZES, strict=True):
            xs, ys = [], []
            for n in (1, 2, 3):
                r = RESULTS.get((f"cluster-{n}", direction, size))
                if r is not None and r.best is not None:
                    xs.append(n)
                    ys.append(r.best.pps / 1000)
            ax.plot(xs, ys, "o-", label="ipsec-cluster")
            base = RESULTS.get(("strongswan", direction, size))
            if base is not None and base.best is not None:
                s = base.best.pps / 1000
                ax.axhline(s, color="tab:red", ls="--", label="strongSwan libipsec")
                ax.axhline(2 * s, color="tab:gray", ls=":", label="goal: 2x strongSwan")
            ax.set_title(f"{titles[direction]}, {size}-byte packets", fontsize=10)
            ax.set_xlabel("members")
            ax.set_xticks([1, 2, 3])
            ax.set_ylabel("lossless kpps (<1% loss)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Lossless IPsec throughput, 2 vCPUs shared by generator, gateway and counter")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "throughput.png", dpi=100)
    plt.close(fig)
