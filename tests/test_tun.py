"""member/tun.py in a throw-away network namespace, and member/inside.py.

The TUN test runs a small script inside the namespace (``ip netns exec``): it
opens and addresses a TUN device, routes 10.91.9.0/24 (and fd00:91:9::/64) into
it, then checks both directions: a UDP datagram sent to the routed prefix comes
out of the device as an IP packet, and a hand-built IPv4/UDP packet written to
the device reaches a UDP socket bound in the namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from bench.harness.procs import ROOT, run_coro
from common.config import InsideConfig, load_config
from member.inside import Inside, UdpInside, make_inside
from member.tun import TunDevice
from tests.lab import netns

NS_SCRIPT = r'''
import asyncio, ipaddress, json, socket, struct, sys
from common.packets import udp4_packet
from member.tun import TunDevice

async def main():
    out = {}
    queue = asyncio.Queue()
    tun = TunDevice("ipsct%d", address="10.91.2.1/32",
                    routes=[ipaddress.ip_network("10.91.9.0/24"),
                            ipaddress.ip_network("fd00:91:9::/64")])
    await tun.start(queue.put_nowait)
    try:
        tun6 = ipaddress.ip_interface("fd00:91:2::1/128")
        import subprocess
        subprocess.run(["ip", "addr", "add", str(tun6), "dev", tun.name, "nodad"], check=True)
        out["name"] = tun.name
        out["routes"] = subprocess.run(["ip", "route", "show", "table", "220", "dev", tun.name],
                                       capture_output=True, text=True).stdout

        async def first(pred):
            while True:
                pkt = await asyncio.wait_for(queue.get(), 5)
                if pred(pkt):
                    return pkt

        # kernel -> TUN, IPv4
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.sendto(b"hello-v4", ("10.91.9.7", 4000))
        pkt = await first(lambda p: p[0] >> 4 == 4 and p[9] == 17)
        out["v4"] = {"dst": socket.inet_ntoa(pkt[16:20]), "src": socket.inet_ntoa(pkt[12:16]),
                     "dport": struct.unpack("!H", pkt[22:24])[0], "payload": pkt[28:].decode()}
        # kernel -> TUN, IPv6
        tx6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        tx6.sendto(b"hello-v6", ("fd00:91:9::7", 4000))
        pkt = await first(lambda p: p[0] >> 4 == 6 and p[6] == 17)
        out["v6"] = {"dst": socket.inet_ntop(socket.AF_INET6, pkt[24:40]),
                     "payload": pkt[48:].decode()}
        # TUN -> kernel -> UDP socket
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("10.91.2.1", 7777))
        rx.setblocking(False)
        ok = tun.write(udp4_packet("10.91.9.5", "10.91.2.1", 5555, 7777, b"from-tun", ident=1))
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(rx, 100), 5)
        out["write"] = {"ok": ok, "data": data.decode(), "from": list(addr)}
        out["counters"] = [tun.rx_packets >= 2, tun.tx_packets, tun.drops]
    finally:
        tun.close()
    out["routes_after"] = subprocess.run(["ip", "route", "show"], capture_output=True,
                                         text=True).stdout
    print(json.dumps(out))

asyncio.run(main())   # not uvloop: it has no loop.sock_recvfrom
'''


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


@pytest.mark.netns
def test_tun_in_netns() -> None:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    ns = netns.create_netns(netns.unique_name("ipsctun"))
    try:
        proc = netns.run(ns, [sys.executable, "-c", NS_SCRIPT], check=False, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
    finally:
        netns.delete_netns(ns)
    assert out["name"].startswith("ipsct")
    assert "10.91.9.0/24" in out["routes"]
    assert out["v4"] == {"dst": "10.91.9.7", "src": "10.91.2.1", "dport": 4000,
                         "payload": "hello-v4"}
    assert out["v6"] == {"dst": "fd00:91:9::7", "payload": "hello-v6"}
    assert out["write"] == {"ok": True, "data": "from-tun", "from": ["10.91.9.5", 5555]}
    assert out["counters"] == [True, 1, 0]
    assert "10.91.9.0/24" not in out["routes_after"]


def test_tun_device_is_an_inside() -> None:
    assert isinstance(TunDevice("x"), Inside)


def test_make_inside_from_config() -> None:
    text = """
[cluster]
address = "198.18.0.2"
inside = "udp:127.0.0.1:9000"
inside_bind = "127.0.0.1:9001"
[connections.c]
psk = "12345678"
[connections.c.children.n]
local_ts = ["10.0.0.0/8"]
remote_ts = ["0.0.0.0/0"]
"""
    inside = make_inside(load_config(text, "t.toml").cluster.inside)
    assert isinstance(inside, UdpInside)
    assert inside.peer == ("127.0.0.1", 9000) and inside.local == ("127.0.0.1", 9001)
    tun = make_inside(InsideConfig("tun", name="ipsc7"), address="10.0.0.1")
    assert isinstance(tun, TunDevice) and tun.name == "ipsc7" and tun.fd == -1


def test_udp_inside_roundtrip() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[bytes] = asyncio.Queue()

        class Net(asyncio.DatagramProtocol):  # the fake protected network
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                got.put_nowait(data)

        net_transport, _ = await loop.create_datagram_endpoint(
            Net, local_addr=("127.0.0.1", 0))
        net_addr = net_transport.get_extra_info("sockname")
        inside = UdpInside(net_addr[:2])
        assert isinstance(inside, Inside)
        received: asyncio.Queue[bytes] = asyncio.Queue()
        await inside.start(received.put_nowait)
        try:
            assert inside.write(b"\x45inner-out")
            assert await asyncio.wait_for(got.get(), 5) == b"\x45inner-out"
            net_transport.sendto(b"\x45inner-in", inside.local_address)
            assert await asyncio.wait_for(received.get(), 5) == b"\x45inner-in"
            # a stranger is dropped, not delivered
            stranger, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
            stranger.sendto(b"\x45spoofed", inside.local_address)
            net_transport.sendto(b"\x45after", inside.local_address)
            assert await asyncio.wait_for(received.get(), 5) == b"\x45after"
            stranger.close()
            assert (inside.rx_packets, inside.tx_packets, inside.drops) == (2, 1, 1)
        finally:
            inside.close()
            net_transport.close()
        assert not inside.write(b"late")
        assert inside.drops == 2

    run_coro(run())
