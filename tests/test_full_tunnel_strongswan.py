"""A full tunnel against a real strongSwan: our side routes everything
(``remote_ts = 0.0.0.0/0`` and ``::/0``) to charon, which offers
``local_ts = 0.0.0.0/0, ::/0`` (the road warrior's view of a VPN server).

charon (namespace a, 198.18.0.1) initiates; our gateway answers at 198.18.0.2
(namespace b, which has its own default routes via a). The children cover
charon's own address, so our IKE and ESP would be routed into the tunnel if
they were not kept out of it (member/routes.py): the IKE SA coming up is
the proof that the answers are not swallowed. Cleartext to charon's inner AND
outer addresses goes through the tunnel; after SIGTERM the routing rules and
tables equal those before the start. Single-process and cluster mode (members
with raw inside sockets). And a host-to-host child (the peer's address as
remote_ts)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.interop_gw import OurProcess, gateway_toml
from tests.lab import traffic
from tests.lab.charon import Charon, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab
from tests.test_hostile_routes import STOP_TIMEOUT_S, host_pair, same, settle, snapshot

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FULL4 = Child("full4", "0.0.0.0/0", "10.91.2.0/24")
FULL6 = Child("full6", "::/0", "fd00:91:2::/64")
OURS = [("full4", "10.91.2.0/24", "0.0.0.0/0", "aes128gcm16"),
        ("full6", "fd00:91:2::/64", "::/0", "aes128gcm16")]


def _esp_in(lab: Lab, ns: str) -> int:
    """ESP-in-UDP datagrams that reached namespace ``ns`` (its UDP InDatagrams)."""
    out = lab.run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    udp = [line.split() for line in out if line.startswith("Udp:")]
    return int(udp[1][udp[0].index("InDatagrams")])


@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_full_tunnel_to_strongswan(lab: Lab, tmp_path: Path, mode: str) -> None:
    ns_a, ns_b = host_pair(lab)
    lab.add_lo_addr(ns_a, "10.91.1.1")
    lab.add_lo_addr(ns_a, "fd00:91:1::1/128")
    lab.add_lo_addr(ns_b, "fd00:91:2::1/128")
    settle(lab, ns_a, ns_b)
    before = snapshot(lab, ns_b)

    extra = "members = 2\n" if mode == "cluster" else ""
    gw = OurProcess(lab, ns_b, gateway_toml(children=OURS, extra=extra), tmp_path)
    gw.wait_ready(timeout=20)
    main = lab.run(ns_b, ["ip", "route", "show", "table", "main"]).stdout
    assert "default via 198.18.0.1" in main and "ipsc0" not in main, main

    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [FULL4, FULL6])))
    charon.initiate(child="full4", ike="a-b")  # IKE_SA_INIT and IKE_AUTH answered
    charon.initiate(child="full6", ike="a-b")  # CREATE_CHILD_SA answered
    kids = {c["name"]: c for c in charon.child_sas()}
    assert set(kids) == {"full4", "full6"}
    assert kids["full4"]["local-ts"] == ["0.0.0.0/0"], kids["full4"]

    esp_before = _esp_in(lab, ns_a)
    for dst, src in (("10.91.1.1", "10.91.2.1"),       # charon's inner address
                     ("198.18.0.1", "10.91.2.1"),      # charon's outer address, in the tunnel
                     ("fd00:91:1::1", "fd00:91:2::1"),
                     ("fd00:18::1", "fd00:91:2::1")):
        res = traffic.ping(ns_b, dst, src=src, count=3, interval=0.05)
        assert res.ok, f"ping {src} -> {dst}: {res.output}\n{gw.log_text()[-3000:]}"
    res = traffic.ping(ns_a, "10.91.2.1", src="10.91.1.1", count=3, interval=0.05)
    assert res.ok, f"ping from charon's side: {res.output}\n{gw.log_text()[-3000:]}"
    # the pings went as ESP (UDP 4500) to charon, not in clear
    assert _esp_in(lab, ns_a) - esp_before >= 5 * 3
    assert gw.alive()

    gw.proc.send_signal(signal.SIGTERM)
    try:
        gw.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway did not stop:\n{gw.log_text()[-3000:]}")
    assert gw.proc.returncode == 0, gw.log_text()[-3000:]
    same(snapshot(lab, ns_b), before)


#: charon's own libipsec routes the peer's address into its TUN too: it needs
#: the same bypass by mark for its IKE/ESP (strongSwan's allow_peer_ts)
CHARON_PEER_TS = """    plugins {
        kernel-libipsec {
            allow_peer_ts = yes
        }
        kernel-netlink {
            fwmark = !0x42
        }
        socket-default {
            fwmark = 0x42
        }
    }
"""


def test_host_to_host_child_with_strongswan(lab: Lab, tmp_path: Path) -> None:
    """The child's remote_ts is the peer's own address (198.18.0.1/32): our
    table routes it into the tunnel, our IKE/ESP to it bypass that table."""
    ns_a, ns_b = host_pair(lab)
    before = snapshot(lab, ns_b)
    gw = OurProcess(lab, ns_b, gateway_toml(
        inside_address="", children=[("host", "198.18.0.2/32", "198.18.0.1/32",
                                      "aes128gcm16")]), tmp_path)
    gw.wait_ready(timeout=20)
    charon = Charon(ns_a, lab.workdir / "charon-a")
    charon.conf_text = charon.conf_text.replace("    plugins {\n",
                                                CHARON_PEER_TS + "    plugins {\n", 1)
    lab.charons.append(charon)
    charon.start()
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [
        Child("host", "198.18.0.1/32", "198.18.0.2/32")])))
    charon.initiate(child="host", ike="a-b")
    assert "dev ipsc0" in lab.run(ns_b, ["ip", "route", "get", "198.18.0.1"]).stdout
    esp_before = _esp_in(lab, ns_a)
    res = traffic.ping(ns_b, "198.18.0.1", src="198.18.0.2", count=3, interval=0.05)
    assert res.ok, f"{res.output}\n{gw.log_text()[-3000:]}\n{charon.log_tail()}"
    res = traffic.ping(ns_a, "198.18.0.2", src="198.18.0.1", count=3, interval=0.05)
    assert res.ok, f"{res.output}\n{gw.log_text()[-3000:]}"
    assert _esp_in(lab, ns_a) - esp_before >= 2 * 3  # as ESP, not in clear
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(STOP_TIMEOUT_S)
    assert gw.proc.returncode == 0, gw.log_text()[-3000:]
    same(snapshot(lab, ns_b), before)
