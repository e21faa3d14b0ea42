"""The cluster throughput bench's cleartext generator: the protected network's
side (bench/test_cluster_bench.py, direction "out").

``python -m bench.clear_blaster --flow SRC,DST [--flow SRC,DST ...]`` runs in
the target's namespace. Per flow it opens a UDP socket bound to ``SRC`` (a
host of a child's local network, on ``lo``) and connected to port 9 of
``DST`` (a host of the child's remote network), so the host's routes put
every datagram into the target's tunnel (the cluster's table 220 into its
TUN device, charon's table 220 into ``ipsec0``). It prints
``{"ready": ...}`` and obeys JSON commands on stdin, one per line, as
bench/esp_blaster.py does:

- ``{"op": "blast", "rate": R, "seconds": S, "size": B}``: R*S IPv4/UDP
  packets of B bytes (IP header included), round-robin over the flows; print
  ``{"go": ...}``, send them with sendmmsg(2) paced in 1 ms batches by the
  same loop as the ESP generator (``bench.esp_blaster.paced``; ``rate`` 0 =
  as fast as it goes), print the result (sent, send errors, seconds).
- ``{"op": "quit"}``.

The payloads are the same bytes for every packet of a flow (the target
encrypts each one anyway), so a blast needs no per-packet preparation.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import sys
from typing import Any

from bench.esp_blaster import (
    MAX_RATE,
    SINK_PORT,
    SO_SNDBUFFORCE,
    _Iovec,
    _Mmsghdr,
    paced,
    sendmmsg_all,
)

IP_UDP_HEADERS = 28
#: the most messages one sendmmsg call gets per flow (a 1 ms batch at 2 Mpps)
MAX_BATCH = 2048


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Flow:
    """One connected UDP socket and MAX_BATCH messages that all point at
    its one payload buffer."""

    def __init__(self, src: str, dst: str, sport: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 << 20)
        self.sock.bind((src, sport))
        self.sock.connect((dst, SINK_PORT))
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.buf = ctypes.create_string_buffer(1)
        self.iov = _Iovec()
        self.msgs = (_Mmsghdr * MAX_BATCH)()
        self.base = ctypes.addressof(self.msgs)

    def payload(self, size: int) -> None:
        """Every message carries ``size - 28`` zero bytes."""
        n = max(0, size - IP_UDP_HEADERS)
        self.buf = ctypes.create_string_buffer(n or 1)
        self.iov.iov_base = ctypes.addressof(self.buf)
        self.iov.iov_len = n
        for m in self.msgs:
            m.msg_hdr.msg_iov = ctypes.pointer(self.iov)
            m.msg_hdr.msg_iovlen = 1

    def send(self, count: int) -> tuple[int, int]:
        sent = errors = 0
        while count > 0:
            k = min(count, MAX_BATCH)
            s, e = sendmmsg_all(self.fd, self.base, k)
            sent += s
            errors += e
            count -= k
        return sent, errors


class ClearBlaster:
    def __init__(self, flows: list[tuple[str, str]]) -> None:
        self.flows = [Flow(src, dst, 40000 + i) for i, (src, dst) in enumerate(flows)]
        self._next = 0

    def _send(self, _first: int, count: int) -> tuple[int, int]:
        """``count`` packets spread over the flows, continuing the round-robin."""
        k = len(self.flows)
        sent = errors = 0
        base, extra = divmod(count, k)
        for j in range(k):
            f = self.flows[(self._next + j) % k]
            c = base + (1 if j < extra else 0)
            if c:
                s, e = f.send(c)
                sent += s
                errors += e
        self._next = (self._next + extra) % k
        return sent, errors

    def blast(self, rate: float, seconds: float, size: int) -> dict[str, Any]:
        n = int(rate * seconds) if rate > 0 else int(MAX_RATE * seconds)
        for f in self.flows:
            f.payload(size)
        self._next = 0
        _say({"go": True, "packets": n})
        return paced(self._send, n, rate, seconds)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flow", action="append", required=True, help="SRC,DST")
    args = ap.parse_args(argv)
    flows = [(f.split(",")[0], f.split(",")[1]) for f in args.flow]
    blaster = ClearBlaster(flows)
    _say({"ready": True, "flows": [f"{s}->{d}:{SINK_PORT}" for s, d in flows]})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "blast":
            _say(blaster.blast(float(cmd["rate"]), float(cmd["seconds"]), int(cmd["size"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
