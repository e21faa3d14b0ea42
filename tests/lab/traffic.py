"""Traffic through the lab: ping, and a UDP echo/sink plus a paced sender.

Every helper is bounded in packets and in time. The UDP programs are small Python
scripts run with ``ip netns exec NS python -c``; each prints one JSON line of counts.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from bench.harness.procs import stop_groups
from tests.lab import netns

MAX_COUNT = 1_000_000
READY_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class PingResult:
    sent: int
    received: int
    output: str

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


_PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def ping(
    ns: str,
    dst: str,
    *,
    count: int = 3,
    interval: float = 0.2,
    src: str | None = None,
    size: int | None = None,
    deadline_s: float | None = None,
) -> PingResult:
    """``ping`` from ``ns``; never raises for loss, read ``.ok`` / ``.received``."""
    if not 0 < count <= MAX_COUNT:
        raise ValueError("count out of range")
    deadline_s = deadline_s or count * interval + 2.0
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1",
            "-w", str(int(deadline_s + 0.999))]
    if src:
        argv += ["-I", src]
    if size is not None:
        argv += ["-s", str(size)]
    proc = netns.run(ns, [*argv, dst], check=False, timeout=deadline_s + 5)
    m = _PING_STATS.search(proc.stdout)
    if m is None:
        return PingResult(0, 0, proc.stdout + proc.stderr)
    return PingResult(int(m.group(1)), int(m.group(2)), proc.stdout)


# -- UDP ---------------------------------------------------------------------------------
# Server: echo (or only count) datagrams until SIGTERM or ``max_s``; print counts.
_SERVER = r"""
import json, signal, socket, sys, time
addr, port, echo, max_s = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "echo", float(sys.argv[4])
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((addr, port))
s.settimeout(0.1)
print("ready", flush=True)
n = nbytes = echoed = 0
end = time.monotonic() + max_s
while not stop and time.monotonic() < end:
    try:
        data, peer = s.recvfrom(65535)
    except (socket.timeout, InterruptedError):
        continue
    n += 1
    nbytes += len(data)
    if echo:
        try:
            s.sendto(data, peer)
            echoed += 1
        except OSError:
            pass
print(json.dumps({"received": n, "bytes": nbytes, "echoed": echoed}), flush=True)
"""

# Sender: ``count`` datagrams of ``size`` bytes, one per ``interval`` s; with echo,
# counts distinct replies until all came back or ``wait_s`` after the last send.
_SENDER = r"""
import json, socket, struct, sys, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
count, size, interval = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
echo, wait_s = sys.argv[7] == "echo", float(sys.argv[8])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
if src:
    s.bind((src, 0))
s.setblocking(False)
pad = b"\0" * max(0, size - 8)
seen = set()
sent = errors = 0
def drain():
    while True:
        try:
            data = s.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        if len(data) >= 8:
            seen.add(struct.unpack_from("!Q", data)[0])
start = time.monotonic()
for i in range(count):
    due = start + i * interval
    while (now := time.monotonic()) < due:
        if echo:
            drain()
        time.sleep(min(due - now, 0.001))
    try:
        s.sendto(struct.pack("!Q", i) + pad, (dst, port))
        sent += 1
    except OSError:
        errors += 1
    if echo:
        drain()
end = time.monotonic() + (wait_s if echo else 0)
while echo and len(seen) < sent and time.monotonic() < end:
    time.sleep(0.005)
    drain()
print(json.dumps({"sent": sent, "received": len(seen), "errors": errors,
                  "elapsed_s": time.monotonic() - start}), flush=True)
"""


@dataclass(frozen=True, slots=True)
class UdpResult:
    sent: int
    received: int
    errors: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


class UdpServer:
    """A UDP echo (``echo=True``) or sink in ``ns`` on ``addr:port``.

    ``with UdpServer(ns, addr, port) as srv: ...`` then ``srv.stats`` holds
    ``{"received", "bytes", "echoed"}``; or call ``stop()`` which returns it.
    """

    def __init__(
        self, ns: str, addr: str, port: int, *, echo: bool = True, max_s: float = 60.0,
        lab: netns.Lab | None = None,
    ) -> None:
        self.ns, self.addr, self.port = ns, addr, port
        argv = [sys.executable, "-c", _SERVER, addr, str(port),
                "echo" if echo else "sink", str(max_s)]
        spawn = lab.popen if lab is not None else netns.popen
        self.proc: subprocess.Popen[str] = spawn(
            ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stats: dict[str, Any] | None = None
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], READY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            stop_groups([self.proc], 1.0)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise netns.LabError(f"UDP server in {self.ns} did not start: {line}{err}")

    def stop(self, timeout: float = 5.0) -> dict[str, Any]:
        if self.stats is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                out, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_groups([self.proc], 1.0)
                out, err = self.proc.communicate()
            lines = out.strip().splitlines()
            if not lines:
                raise netns.LabError(f"UDP server in {self.ns} gave no counts: {err}")
            self.stats = json.loads(lines[-1])
        return self.stats

    def __enter__(self) -> UdpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            stop_groups([self.proc], 1.0)


def udp_send(
    ns: str,
    dst: str,
    port: int,
    *,
    src: str | None = None,
    count: int = 10,
    size: int = 64,
    interval: float = 0.01,
    echo: bool = True,
    wait_s: float = 2.0,
) -> UdpResult:
    """Send ``count`` paced datagrams from ``ns``; with ``echo`` count the replies."""
    if not 0 < count <= MAX_COUNT or not 8 <= size <= 65000:
        raise ValueError("count or size out of range")
    argv = [sys.executable, "-c", _SENDER, src or "", dst, str(port), str(count), str(size),
            str(interval), "echo" if echo else "send", str(wait_s)]
    timeout = count * interval + wait_s + 10.0
    proc = netns.run(ns, argv, timeout=timeout)
    return UdpResult(**json.loads(proc.stdout.strip().splitlines()[-1]))
