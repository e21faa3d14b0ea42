"""Key export read by Wireshark: our gateway with ``save_keys``, and as the
initiator our peer (a namespace of their own, standard ports 500/4500) or
strongSwan's charon (the interop lab, ping through both children); the UDP
traffic captured with tcpdump; tshark, pointed at the two key files, must
dissect the encrypted IKE_AUTH payloads (IDi, AUTH) and the inner packets
of the ESP traffic (UDP from our peer, ICMP echo from charon's side).

Needs root, ``ip netns``, tcpdump and tshark (scripts/install-sysdeps.sh);
the charon test also strongSwan.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.control import ControlClient
from bench.harness.procs import ROOT, Proc, Procs, cli_argv, ns_argv
from common.cluster.events import EventType
from member.keylog import ESP_TABLE, IKE_TABLE
from tests.cluster_util import event_is
from tests.interop_gw import OurProcess
from tests.interop_gw import gateway_toml as interop_gateway_toml
from tests.lab import netns as lab_netns
from tests.lab import traffic
from tests.lab.charon import Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab
from tests.test_peer import gateway_config, peer_config

pytestmark = [pytest.mark.slow]

ECHO_PORT = 7777
ECHO = f"""
import socket
from common.packets import swap_inner
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", {ECHO_PORT}))
while True:
    data, addr = s.recvfrom(65535)
    back = swap_inner(data)
    if back is not None:
        s.sendto(back, addr)
"""


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tcpdump", "tshark"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/install-sysdeps.sh)"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    why = _usable()
    if why:
        pytest.skip(why)
    ns = lab_netns.create_netns(lab_netns.unique_name("klog"))
    try:
        yield ns
    finally:
        lab_netns.delete_netns(ns)


def _tcpdump(interface: str, cap: Path) -> list[str]:
    # --immediate-mode: without it the kernel hands packets over in blocks,
    # and the last block is lost when tcpdump is stopped.
    return ["tcpdump", "-i", interface, "-U", "--immediate-mode", "-w", str(cap),
            "udp port 500 or udp port 4500"]


def _tshark(cap: Path, conf: Path, fields: list[str], filt: str) -> list[str]:
    argv = ["tshark", "-r", str(cap), "-o", "esp.enable_encryption_decode:TRUE",
            "-Y", filt, "-T", "fields", *[a for f in fields for a in ("-e", f)]]
    env = dict(os.environ, WIRESHARK_CONFIG_DIR=str(conf))
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return [ln for ln in out.stdout.splitlines() if ln.strip()]


@pytest.mark.netns
def test_tshark_decrypts_ike_auth_and_esp_with_our_key_files(netns: str,
                                                            tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    gw_cfg = tmp_path / "gw.toml"
    gw_cfg.write_text(gateway_config((500, 4500), ECHO_PORT, extra={"save_keys": str(keys)}))
    peer_cfg = tmp_path / "peer.toml"
    peer_cfg.write_text(peer_config((500, 4500)))
    cap = tmp_path / "ike.pcap"
    env = {"PYTHONPATH": str(ROOT)}
    procs = Procs(tmp_path)
    procs.start("tcpdump", _tcpdump("lo", cap), ns=netns)
    procs.start("echo", [sys.executable, "-c", ECHO], ns=netns, env=env)
    gw = procs.start("gw", cli_argv("run", "--config", str(gw_cfg)), ns=netns, env=env)
    log = gw.log_path
    try:
        with ControlClient(config=gw_cfg) as control:
            try:
                control.wait_event(event_is(EventType.READY), 15, alive=gw.alive)
            except TimeoutError as exc:
                raise AssertionError(f"READY: {exc}\n{gw.tail()}") from None
        time.sleep(0.5)   # tcpdump is listening by now
        peer = subprocess.run(ns_argv(netns, cli_argv(
            "peer", "--config", str(peer_cfg), "--json", "--ike-sas", "1", "--traffic", "50",
            "--seconds", "2", "--size", "100")), capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env}, cwd=ROOT)
        res = json.loads([ln for ln in peer.stdout.splitlines() if ln.startswith("{")][-1])
        assert res["ok"] and res["traffic"]["echoed"] > 0, peer.stderr
        time.sleep(0.5)
    finally:
        procs.close()
    text = log.read_text()
    assert "save_keys" in text and "WARNING" in text   # the secrets warning at start

    # Wireshark reads its tables from its personal configuration folder.
    conf = tmp_path / "wireshark"
    conf.mkdir()
    for name in (IKE_TABLE, ESP_TABLE):
        shutil.copy(keys / name, conf / name)
    auth = _tshark(cap, conf, ["isakmp.id.data.fqdn", "isakmp.auth.method"],
                   "isakmp.exchangetype == 35 && isakmp.auth.method")
    # IKE_AUTH request (IDi branch.test, IDr gw.test) and response (IDr gw.test),
    # each with its AUTH payload (method 2: shared key MIC).
    assert len(auth) == 2, auth
    assert auth[0].split("\t") == ["branch.test,gw.test", "2"], auth
    assert auth[1].split("\t") == ["gw.test", "2"], auth
    inner = _tshark(cap, conf, ["esp.spi", "ip.src", "ip.dst"], "esp && udp.port == 9")
    spis = {line.split("\t")[0] for line in inner}
    # Both children (AES-GCM and AES-CTR + HMAC-SHA-256), both directions.
    assert len(spis) == 4 and len(inner) >= 40, inner
    assert all("10.91." in line.split("\t")[1] for line in inner), inner
    # Without the key files nothing inside is readable.
    bare = tmp_path / "bare"
    bare.mkdir()
    assert _tshark(cap, bare, ["isakmp.id.type"],
                   "isakmp.exchangetype == 35 && isakmp.id.type") == []
    assert _tshark(cap, bare, ["esp.spi"], "esp && udp.port == 9") == []


@pytest.mark.interop
def test_tshark_decrypts_strongswan_session_with_our_key_files(lab: Lab,
                                                              tmp_path: Path) -> None:
    why = _usable()
    if why:
        pytest.skip(why)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    ns_a, ns_b, _veth = lab.pair()
    for addr in ("10.91.1.1", "10.91.11.1"):
        lab.add_lo_addr(ns_a, addr)
    lab.add_lo_addr(ns_b, "10.91.12.1")
    cap = tmp_path / "charon.pcap"
    dump = Proc(_tcpdump("any", cap), tmp_path / "tcpdump.log", ns=ns_b)
    try:
        gw = OurProcess(lab, ns_b, interop_gateway_toml(extra={"save_keys": str(keys)}),
                        tmp_path)
        gw.wait_ready()
        charon = lab.charon(ns_a, "charon-a")
        charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [
            Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16"),
            Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24",
                  esp_proposals="aes128ctr-sha256")])))
        charon.initiate(child="net-gcm", ike="a-b")
        charon.initiate(child="net-ctr", ike="a-b")
        for src, dst in (("10.91.1.1", "10.91.2.1"), ("10.91.11.1", "10.91.12.1")):
            res = traffic.ping(ns_a, dst, src=src, count=3, interval=0.05)
            assert res.ok, f"ping {src} -> {dst}: {res.output}\n{gw.log_text()[-3000:]}"
        time.sleep(0.5)
    finally:
        dump.stop()
    conf = tmp_path / "wireshark"
    conf.mkdir()
    for name in (IKE_TABLE, ESP_TABLE):
        shutil.copy(keys / name, conf / name)
    auth = _tshark(cap, conf, ["isakmp.id.data.fqdn", "isakmp.auth.method"],
                   "isakmp.exchangetype == 35 && isakmp.auth.method")
    assert auth and auth[0].split("\t")[0].startswith("gw-a.test"), auth
    icmp = _tshark(cap, conf, ["esp.spi", "ip.src", "icmp.type"], "esp && icmp")
    kinds = {(line.split("\t")[1].split(",")[-1], line.split("\t")[2]) for line in icmp}
    # echo requests (8) from charon's side and replies (0) from ours, both children
    assert kinds == {("10.91.1.1", "8"), ("10.91.2.1", "0"), ("10.91.11.1", "8"),
                     ("10.91.12.1", "0")}, icmp
