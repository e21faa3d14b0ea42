"""The cluster throughput bench's traffic generator (bench/test_cluster_bench.py).

``python -m bench.esp_blaster --config PEER.toml --children N`` runs our
single-process gateway as the initiator (``dispatcher/gateway.py``, the same
machinery as ``ipsec-cluster peer``) until N child SAs are installed, prints
``{"ready": ...}`` and then obeys JSON commands on stdin, one per line:

- ``{"op": "blast", "rate": R, "seconds": S, "size": B}``: build R*S inner
  IPv4/UDP packets of B bytes (round-robin over the children, destination port
  9 at the child's first far-side host) and ESP-protect them with the child's
  outbound SA, *before the clock starts*; print ``{"go": ...}``; send them as
  UDP-encapsulated ESP from our NAT-T socket with sendmmsg(2), paced in 1 ms batches (``rate``
  0 = as fast as the loop goes); print the result (sent, send errors, the
  seconds it took).
- ``{"op": "stats"}``: print the initiator's ESP figures (``esp_in``: ESP
  it decrypted; ``drops``): the sample check of the outbound direction.
- ``{"op": "quit"}``.

``ready`` lists the children with both SPIs (``spi_in``: what the target
sends to us, which the bench's ESP counter in this namespace matches).
``paced`` and ``sendmmsg_all`` are shared with bench/clear_blaster.py.

The IKE side keeps running between blasts (the asyncio loop reads stdin in a
thread); during a blast the loop is busy, which the peers' retransmits cover.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.harness.packets import udp4_packet
from bench.harness.procs import run_main
from dispatcher.gateway import Gateway
from member.config_file import read_config

SINK_PORT = 9
BATCH_S = 0.001
#: packets prepared per second of an unpaced blast
MAX_RATE = 300_000
SO_SNDBUFFORCE = 32  # Linux; not exported by the socket module


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _first_host(tss: tuple[Any, ...]) -> str:
    lo, hi = int(tss[0].start_addr), int(tss[0].end_addr)
    return str(ipaddress.IPv4Address(lo + 1 if hi - lo >= 2 else lo))


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


class _SockaddrIn(ctypes.Structure):
    _fields_ = [("sin_family", ctypes.c_ushort), ("sin_port", ctypes.c_uint16),
                ("sin_addr", ctypes.c_uint8 * 4), ("sin_zero", ctypes.c_uint8 * 8)]


_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


class Blaster:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        port = gw.ports[gw.config.cluster.natt_port]
        assert port.transport is not None
        # The gateway's own NAT-T socket (so ESP leaves from port 4500 as it
        # would), driven with sendmmsg(2) from arrays built before the clock.
        self.fd = port.transport.get_extra_info("socket").fileno()
        sock = socket.socket(fileno=os.dup(self.fd))
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 << 20)
        sock.close()

    def prepare(self, n: int, size: int) -> tuple[Any, Any, Any, tuple[str, int]]:
        routes = list(self.gw.member.carried())
        inner = []
        for i, r in enumerate(routes):
            src, dst = _first_host(r.local_ts), _first_host(r.remote_ts)
            inner.append(udp4_packet(src, dst, 40000 + i, SINK_PORT, bytes(size - 28)))
        k = len(routes)
        packets = [routes[i % k].outbound.protect(inner[i % k]) for i in range(n)]
        remote = routes[0].remote
        addr = _SockaddrIn(socket.AF_INET, socket.htons(remote[1]),
                           (ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(remote[0]).packed))
        iovs = (_Iovec * n)()
        msgs = (_Mmsghdr * n)()
        keep = []
        for i, p in enumerate(packets):
            buf = ctypes.create_string_buffer(p, len(p))
            keep.append(buf)
            iovs[i].iov_base = ctypes.addressof(buf)
            iovs[i].iov_len = len(p)
            h = msgs[i].msg_hdr
            h.msg_name = ctypes.addressof(addr)
            h.msg_namelen = ctypes.sizeof(addr)
            h.msg_iov = ctypes.pointer(iovs[i])
            h.msg_iovlen = 1
        return msgs, (keep, iovs, addr), packets, remote

    def _send(self, msgs: Any, i: int, count: int) -> tuple[int, int]:
        """sendmmsg from message i; (sent, errors)."""
        return sendmmsg_all(self.fd, ctypes.addressof(msgs) + i * ctypes.sizeof(_Mmsghdr),
                            count)

    def blast(self, rate: float, seconds: float, size: int) -> dict[str, Any]:
        n = int(rate * seconds) if rate > 0 else int(MAX_RATE * seconds)
        t_enc = time.perf_counter()
        msgs, _keep, _packets, _remote = self.prepare(n, size)
        t_enc = time.perf_counter() - t_enc
        _say({"go": True, "packets": n, "encrypt_s": round(t_enc, 3)})
        return paced(lambda i, count: self._send(msgs, i, count), n, rate, seconds)

    def stats(self) -> dict[str, Any]:
        """The initiator's ESP figures: packets it decrypted (``esp_in``) and
        its drops (the outbound direction's validity sample)."""
        m = self.gw.member
        return {"esp_in": m.counters.get("esp_in", 0), "drops": dict(m.drops)}


def paced(send: Callable[[int, int], tuple[int, int]], n: int, rate: float,
          seconds: float) -> dict[str, Any]:
    """Send messages 0..n-1 with ``send(first, count) -> (sent, errors)``:
    paced in ``BATCH_S`` batches at ``rate``/s, or (``rate`` 0) in chunks of
    64 as fast as the loop goes until ``seconds`` passed. The one pacing loop
    of both generators (this one and bench/clear_blaster.py); the result is
    what a blast prints."""
    sent = errors = 0
    t0 = time.perf_counter()
    if rate <= 0:
        end = t0 + seconds
        for i in range(0, n, 64):
            s, e = send(i, min(64, n - i))
            sent += s
            errors += e
            if time.perf_counter() >= end:
                break
    else:
        batch = max(1, round(rate * BATCH_S))
        step = batch / rate
        due = t0
        for i in range(0, n, batch):
            now = time.perf_counter()
            if due > now:
                if due - now > 0.0003:
                    time.sleep(due - now - 0.0002)
                while time.perf_counter() < due:
                    pass
            s, e = send(i, min(batch, n - i))
            sent += s
            errors += e
            due += step
    took = time.perf_counter() - t0
    return {"sent": sent, "errors": errors, "seconds": round(took, 4),
            "rate": round(sent / took, 1)}


def sendmmsg_all(fd: int, base: int, count: int) -> tuple[int, int]:
    """sendmmsg(2) of ``count`` consecutive ``_Mmsghdr`` at address ``base``
    until each is sent or refused; (sent, errors: one per refused message)."""
    sent = errors = 0
    size = ctypes.sizeof(_Mmsghdr)
    while sent + errors < count:
        r = _sendmmsg(fd, base + (sent + errors) * size, count - sent - errors, 0)
        if r < 0:
            errors += 1   # EAGAIN/ENOBUFS: this message is lost
        else:
            sent += r
    return sent, errors


async def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--children", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args(argv)
    gw = Gateway(read_config(args.config), initiate=True)
    await gw.start()
    end = time.monotonic() + args.timeout
    while len(gw.member.carried()) < args.children:
        if time.monotonic() > end:
            _say({"ready": False, "children": len(gw.member.carried())})
            return 1
        await asyncio.sleep(0.05)
    _say({"ready": True, "children": [
        {"name": r.name, "spi_out": f"{r.outbound.spi:08x}", "spi_in": f"{r.inbound.spi:08x}"}
        for r in gw.member.carried()]})
    blaster = Blaster(gw)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "blast":
            _say(blaster.blast(float(cmd["rate"]), float(cmd["seconds"]), int(cmd["size"])))
        elif cmd["op"] == "stats":
            _say(blaster.stats())
    gw.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main(sys.argv[1:])))
