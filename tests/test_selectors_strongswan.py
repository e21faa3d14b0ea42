"""RFC 4301 §5.2 selector checks against live peers (namespaces).

Namespace b runs our gateway (198.18.0.2, TUN inside 10.91.2.1). Namespace a
runs strongSwan, the legitimate peer: child net-gcm for 10.91.1.0/24, and
child net-udp negotiated for udp/7001 only towards 10.91.4.0/24. Namespace h
(198.19.0.1, its own link to b) runs a hostile peer, authenticated with its
own identity for 10.91.3.0/24 (tests/selectors_hostile.py: our initiator,
which encrypts any inner packet it is given). It sends decrypted packets from
10.91.11.1 and 10.99.99.99 (outside its selectors): UDP sinks on the inside
count what arrives. Its in-selector packets are the control.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.harness import configs
from tests.cluster_util import status, wait_for
from tests.interop_gw import ROOT, OurProcess, gateway_toml
from tests.lab import traffic
from tests.lab.charon import Charon, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

pytestmark = [pytest.mark.interop, pytest.mark.slow]

GCM = Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16")
UDP_ONLY = Child("net-udp", "10.91.4.0/24[udp/7001]", "10.91.2.0/24[udp]",
                 esp_proposals="aes128gcm16")
HOSTILE_PSK = "hostile-but-authenticated-0123456789"
SPOOFED = (("10.91.11.1", 7101), ("10.99.99.99", 7102))
CONTROL = ("10.91.3.1", 7103)
COUNT = 20

#: the hostile (but authenticated) peer's connection, as TOML to add to the gateway's
HOSTILE_CONN = configs.dumps({"connections": configs.connections(
    [configs.Conn("h", "gw-b.test", "hostile.test",
                  (configs.Child("net-h", "10.91.2.0/24", "10.91.3.0/24", "aes128gcm16"),))],
    psk=HOSTILE_PSK, start_action=None)})


def _drops(gw: OurProcess) -> Counter[str]:
    """The members' drop counters (``status``), summed."""
    drops: Counter[str] = Counter()
    for m in status(gw.config)["members"]:
        drops.update(m["drops"])
    return drops


def _packets_in(charon: Charon, child: str) -> int:
    """Inbound packets of a CHILD_SA as strongSwan counts them (the text form:
    the raw parser of the lab does not take "[udp/7001]" in a selector)."""
    text = charon.swanctl("--list-sas").stdout
    block = text[text.index(f"{child}:"):]
    if "local  10.91.4.0/24[udp/" not in block:   # 7001 prints as afs3-callback
        raise AssertionError(f"not the udp/7001 child:\n{block}")
    m = re.search(r"\bin\s+[0-9a-f]+.*?(\d+) packets", block)
    return int(m.group(1)) if m else 0


def test_spoofed_inner_sources_never_reach_the_inside_and_udp_child_carries_no_icmp(
        lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, _ = lab.pair()
    ns_h = lab.netns()
    lab.veth(ns_h, ns_b, "198.19.0.1/24", "198.19.0.2/24")
    lab.add_route(ns_h, "198.18.0.0/24", via="198.19.0.2")
    # No reverse-path filter: the kernel must not be what stops the spoofed packets.
    lab.run(ns_b, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0",
                   "net.ipv4.conf.default.rp_filter=0"])
    lab.add_lo_addr(ns_a, "10.91.1.1")
    lab.add_lo_addr(ns_a, "10.91.4.1")
    gw = OurProcess(lab, ns_b, gateway_toml(children=[
        ("net-gcm", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),
        ("net-udp", "10.91.2.0/24", "10.91.4.0/24", "aes128gcm16")]) + HOSTILE_CONN, tmp_path)
    gw.wait_ready()
    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM, UDP_ONLY])))
    charon.initiate(child="net-gcm", ike="a-b")
    charon.initiate(child="net-udp", ike="a-b")

    # The legitimate peer's traffic flows both ways.
    assert traffic.ping(ns_a, "10.91.2.1", src="10.91.1.1", count=3, interval=0.05).ok, \
        gw.log_text()[-3000:]
    assert traffic.ping(ns_b, "10.91.1.1", src="10.91.2.1", count=3, interval=0.05).ok

    # The hostile peer: spoofed sources and in-selector control packets.
    hostile_conf = tmp_path / "hostile.toml"
    hostile_conf.write_text(gateway_toml(
        address="198.19.0.1", remote="198.18.0.2", inside="udp:127.0.0.1:9",
        inside_address="10.91.3.1", local_id="hostile.test", remote_id="gw-b.test",
        psk=HOSTILE_PSK, start_action="start",
        children=[("net-h", "10.91.3.0/24", "10.91.2.0/24", "aes128gcm16")]))
    sinks = {port: traffic.UdpServer(ns_b, "10.91.2.1", port, echo=False, lab=lab)
             for _, port in (*SPOOFED, CONTROL)}
    specs = [f"{src}:10.91.2.1:{port}:{COUNT}" for src, port in (*SPOOFED, CONTROL)]
    hostile = lab.popen(ns_h, [sys.executable, "-m", "tests.selectors_hostile",
                               str(hostile_conf), *specs],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        cwd=str(ROOT))
    out, _ = hostile.communicate(timeout=60)
    assert f"sent {COUNT * 3}" in out, out[-3000:]
    got = {port: sink.stop()["received"] for port, sink in sinks.items()}
    assert got[CONTROL[1]] == COUNT, (got, gw.log_text()[-3000:])
    for src, port in SPOOFED:
        assert got[port] == 0, f"{src} reached the inside: {got}"
    # (a drop is not an SA state change: the members' counter of it)
    wait_for("the spoofed packets counted as outside their child's selectors",
             lambda: _drops(gw)["selector_mismatch"] >= COUNT * len(SPOOFED), timeout=10,
             diag=gw.tail)

    # Outbound: net-udp was negotiated for udp/7001 only: UDP to 7001 goes,
    # ICMP and other ports do not (no child), and are not sent to the peer.
    before = _packets_in(charon, "net-udp")
    with traffic.UdpServer(ns_a, "10.91.4.1", 7001, echo=False, lab=lab) as allowed:
        traffic.udp_send(ns_b, "10.91.4.1", 7001, src="10.91.2.1", count=10, echo=False,
                         interval=0.01)
    assert allowed.stats is not None and allowed.stats["received"] == 10, allowed.stats
    assert not traffic.ping(ns_b, "10.91.4.1", src="10.91.2.1", count=3, interval=0.05).ok
    with traffic.UdpServer(ns_a, "10.91.4.1", 7002, echo=False, lab=lab) as other:
        traffic.udp_send(ns_b, "10.91.4.1", 7002, src="10.91.2.1", count=5, echo=False,
                         interval=0.01)
    assert other.stats is not None and other.stats["received"] == 0
    # what reached strongSwan in that child: the 10 datagrams to udp/7001, nothing else
    assert _packets_in(charon, "net-udp") - before == 10

    drops = _drops(gw)
    assert drops.get("selector_mismatch", 0) == COUNT * len(SPOOFED), drops
    assert drops.get("no_child", 0) >= 3 + 5, drops
