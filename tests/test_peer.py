"""``ipsec-cluster peer`` as a load and check tool (dispatcher/peer.py).

Bottom: inner packets built by hand (checksums against scapy as an independent
oracle), the INITIAL_CONTACT choice in memory. Top: root-less processes on
loopback: our gateway (``run``) at 127.0.0.1 and our peer at 127.0.0.2, both on
non-standard IKE/NAT-T ports (so every IKE datagram carries the non-ESP marker,
RFC 3948) with ``udp:`` insides; the gateway's inside is an address-swapping
echo.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP

from bench.harness import configs
from bench.harness.procs import ROOT as ROOT
from common.cluster.events import EventType
from common.config import load_config
from common.ike.constants import ExchangeType, NotifyType
from common.ike.message import decode_header, decode_message
from common.ike.payloads import NotifyPayload
from common.ike.ts import ts_from_cidr
from common.packets import TRAFFIC_MARK, TrafficTemplate, inet_checksum, swap_inner, udp4_packet
from dispatcher.peer import Peer, PeerOptions, _pick, add_peer_arguments, options_from_args
from member.worker import Member
from tests.cluster_util import Proc, Procs, cli_argv, event_is

PSK = "peer-test-psk-0123456789abcdef"
GW_ADDR, PEER_ADDR = "127.0.0.1", "127.0.0.2"
#: connection ``c`` as the gateway sees it: two children (GCM, CTR)
CONN = configs.Conn("c", "gw.test", "branch.test", (
    configs.Child("gcm", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),
    configs.Child("ctr", "10.91.12.0/24", "10.91.11.0/24", "aes128ctr-sha256")))


def gateway_config(ports: tuple[int, int], echo_port: int, *, conn: configs.Conn = CONN,
                   extra: Mapping[str, Any] | None = None,
                   pools: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Our gateway at GW_ADDR answering ``conn`` (``extra``: more ``[cluster]``
    keys; ``pools``: ``[pools.NAME]`` tables)."""
    cluster = configs.cluster_table(address=GW_ADDR, ports=ports,
                                    inside=f"udp:127.0.0.1:{echo_port}", **(extra or {}))
    return configs.dumps(configs.gateway_config(cluster, [conn], psk=PSK, pools=pools))


def peer_config(ports: tuple[int, int], psk: str = PSK, *, conn: configs.Conn = CONN) -> str:
    """Our peer at PEER_ADDR initiating ``conn`` (mirrored) to GW_ADDR."""
    return configs.gateway_toml(address=PEER_ADDR, ports=ports, inside="udp:127.0.0.1:9",
                                conns=[conn], psk=psk, remote=(GW_ADDR, ports[0]),
                                log_level="warning")


# -- inner packets ------------------------------------------------------------------------


def test_udp4_packet_checksums_match_scapy() -> None:
    for size in (0, 1, 7, 100, 1371):
        payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
        pkt = udp4_packet("10.91.1.1", "10.91.2.1", 40000, 9, payload, ident=size)
        ours = IP(pkt)
        theirs = IP(pkt)
        del theirs.chksum
        del theirs[UDP].chksum
        rebuilt = IP(bytes(theirs))
        assert ours.chksum == rebuilt.chksum
        assert ours[UDP].chksum == rebuilt[UDP].chksum
        assert ours.len == len(pkt) == 28 + size
        assert bytes(ours[UDP].payload) == payload
        assert inet_checksum(pkt[:20]) == 0


@pytest.mark.parametrize("seq", [0, 1, 0xFFFE, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0xFFFF_FFFF])
def test_template_checksum_is_updated_incrementally(seq: int) -> None:
    tpl = TrafficTemplate("10.91.1.1", "10.91.2.1", 40000, 9, 200)
    pkt = tpl.packet(seq)
    assert len(pkt) == 200
    payload = pkt[28:]
    assert payload.startswith(TRAFFIC_MARK) and int.from_bytes(payload[4:8], "big") == seq
    assert pkt == udp4_packet("10.91.1.1", "10.91.2.1", 40000, 9, payload)


def test_echo_swaps_addresses_and_ports_and_keeps_checksums() -> None:
    pkt = TrafficTemplate("10.91.1.1", "10.91.2.1", 40000, 9, 64).packet(42)
    back = swap_inner(pkt)
    assert back is not None
    ip = IP(back)
    assert (ip.src, ip.dst, ip[UDP].sport, ip[UDP].dport) == ("10.91.2.1", "10.91.1.1", 9, 40000)
    assert back == udp4_packet("10.91.2.1", "10.91.1.1", 9, 40000, pkt[28:])
    assert swap_inner(b"\x60" + bytes(47)) is None   # not IPv4/UDP


def test_traffic_addresses_lie_inside_the_selectors() -> None:
    assert _pick((ts_from_cidr("10.91.1.0/24"),)) == ("10.91.1.1", 9)
    assert _pick((ts_from_cidr("10.91.1.7/32"),)) == ("10.91.1.7", 9)
    assert _pick((ts_from_cidr("fd00::/64"),)) is None


def test_default_flags_keep_todays_peer() -> None:
    parser = argparse.ArgumentParser()
    add_peer_arguments(parser)
    opts = options_from_args(parser.parse_args([]))
    assert opts == PeerOptions()
    assert opts.ike_sas is None and not opts.exit_when_up and opts.traffic_pps is None
    with pytest.raises(SystemExit):
        options_from_args(parser.parse_args(["--traffic", "10", "--size", "20"]))


# -- INITIAL_CONTACT in memory -----------------------------------------------------------


def test_only_the_first_ike_sa_sends_initial_contact() -> None:
    ports = (500, 4500)
    peer = Peer(load_config(peer_config(ports), "peer.toml"), PeerOptions(ike_sas=3))
    gw = Member(load_config(gateway_config(ports, 9), "gw.toml"))
    peer.flush = lambda: None  # type: ignore[method-assign]  # no sockets: we carry
    conn = peer.config.connections["c"]
    for i in range(3):
        peer._initiate(conn, i)
    contacts: list[bool] = []
    for _ in range(10):   # exchange datagrams until quiet
        moved = False
        for out in peer.member.ike_out():
            moved = True
            gw.handle_ike(out.data, (PEER_ADDR, out.local_port), out.remote[1], 0.0)
            header = decode_header(out.data)
            if header.exchange == ExchangeType.IKE_AUTH:
                sa = gw.engine.sas[header.spi_r]
                msg = decode_message(out.data, sa.sk_in)
                contacts.append(any(isinstance(p, NotifyPayload)
                                    and p.notify_type == NotifyType.INITIAL_CONTACT
                                    for p in msg.payloads))
        for out in gw.ike_out():
            moved = True
            peer.member.handle_ike(out.data, (GW_ADDR, out.local_port), out.remote[1], 0.0)
        if not moved:
            break
    assert contacts == [True, False, False]
    result = peer.result(timed_out=False)
    assert (result.ike_sas_up, result.children_up, result.failed) == (3, 6, 0)
    assert result.ok


# -- processes on loopback -------------------------------------------------------------


def _free_port_pair() -> tuple[int, int]:
    """Two consecutive UDP ports free on both loopback addresses."""
    rnd = random.Random()
    for _ in range(200):
        base = rnd.randrange(20000, 60000)
        socks = []
        try:
            for addr in (GW_ADDR, PEER_ADDR):
                for port in (base, base + 1):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(s)
                    s.bind((addr, port))
            return base, base + 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port pair on loopback")


class _Echo(threading.Thread):
    """The gateway's inside: every inner packet back with addresses swapped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.echoed = 0

    def run(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            back = swap_inner(data)
            if back is not None:
                self.sock.sendto(back, addr)
                self.echoed += 1

    def stop(self) -> None:
        self.running = False
        self.join(2)
        self.sock.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[tuple[int, int], _Echo, Proc]]:
    """Our gateway (``ipsec-cluster run``) on 127.0.0.1 with an echo inside."""
    ports = _free_port_pair()
    echo = _Echo()
    echo.start()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(gateway_config(ports, echo.port))
    procs = Procs(tmp_path)
    try:
        gw = procs.start("gw", cli_argv("run", "--config", str(cfg)))
        gw.wait_ready(timeout=10)
        yield ports, echo, gw
    finally:
        procs.close()
        echo.stop()


def run_peer(tmp_path: Path, ports: tuple[int, int], *args: str,
             psk: str = PSK) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    cfg = tmp_path / "peer.toml"
    cfg.write_text(peer_config(ports, psk))
    proc = subprocess.run(cli_argv("peer", "--config", str(cfg), "--json", *args),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line; rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


def test_twenty_ike_sas_come_up(gateway: tuple[tuple[int, int], _Echo, Proc],
                                tmp_path: Path) -> None:
    ports, _echo, gw = gateway
    rc, res, err = run_peer(tmp_path, ports, "--ike-sas", "20", "--exit-when-up",
                            "--timeout", "30")
    assert rc == 0, err
    assert res["ok"] is True
    assert (res["wanted"], res["ike_sas_up"], res["children_up"]) == (20, 20, 40)
    assert (res["failed"], res["children_failed"], res["timed_out"]) == (0, 0, False)
    assert res["elapsed_s"] > 0 and res["handshakes_per_s"] > 0
    # the gateway saw 20 distinct IKE SAs (distinct SPIs), none replaced another
    events = gw.events()
    ups = {e.ike_spi for e in events if e.type is EventType.IKE_UP}
    assert len(ups) == 20 and len([e for e in events if e.type is EventType.IKE_UP]) == 20, \
        events
    assert not [e for e in events if e.type in (EventType.IKE_DOWN, EventType.CHILD_DOWN)]


def test_wrong_psk_exits_non_zero_with_the_reason(
        gateway: tuple[tuple[int, int], _Echo, Proc], tmp_path: Path) -> None:
    ports, _echo, gw = gateway
    rc, res, err = run_peer(tmp_path, ports, "--ike-sas", "2", "--exit-when-up",
                            psk="not-the-same-psk-at-all-0123")
    assert rc == 1
    assert res["ok"] is False and res["ike_sas_up"] == 0 and res["failed"] == 2
    assert "AUTHENTICATION_FAILED" in err and "2 failed" in err
    assert list(res["reasons"]) == ["peer answered AUTHENTICATION_FAILED "
                                    "(wrong PSK or identity?)"]
    failed = gw.wait_event(event_is(EventType.IKE_FAILED), what="IKE_FAILED")
    assert "wrong pre-shared key" in failed.reason, failed


def test_traffic_through_every_child_comes_back_from_the_echo(
        gateway: tuple[tuple[int, int], _Echo, Proc], tmp_path: Path) -> None:
    ports, echo, _gw = gateway
    rc, res, err = run_peer(tmp_path, ports, "--ike-sas", "2", "--traffic", "400",
                            "--seconds", "1", "--size", "300")
    assert rc == 0, err
    t = res["traffic"]
    assert t["children"] == 4 and t["size"] == 300
    assert t["sent"] == t["esp_out"] == 400
    # loopback is lossless unless the machine is very busy: allow a little
    assert t["echoed"] == t["esp_in"] >= 0.9 * t["sent"]
    assert echo.echoed >= t["echoed"]
    assert t["other_in"] == 0


def test_timeout_without_a_responder(tmp_path: Path) -> None:
    ports = _free_port_pair()
    rc, res, err = run_peer(tmp_path, ports, "--ike-sas", "3", "--exit-when-up",
                            "--timeout", "1")
    assert rc == 1
    assert res["timed_out"] is True and res["ike_sas_up"] == 0
    assert "timed out (3 not up)" in err
