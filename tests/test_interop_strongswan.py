"""Our gateway against a real strongSwan (charon with libipsec) in network
namespaces: charon initiates from 198.18.0.1, our gateway answers at 198.18.0.2
with a TUN device as its inside."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop_gw import OurProcess, gateway_toml
from tests.lab import traffic
from tests.lab.charon import Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

GCM = Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16")
CTR = Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24", esp_proposals="aes128ctr-sha256")


def _setup(lab: Lab, tmp_path: Path, **gw_kw: object):  # type: ignore[no-untyped-def]
    ns_a, ns_b, veth = lab.pair()
    for addr in ("10.91.1.1", "10.91.11.1"):
        lab.add_lo_addr(ns_a, addr)
    lab.add_lo_addr(ns_b, "10.91.12.1")
    gw = OurProcess(lab, ns_b, gateway_toml(**gw_kw), tmp_path)  # type: ignore[arg-type]
    gw.wait_log("gateway listening")
    charon = lab.charon(ns_a, "charon-a")
    return ns_a, ns_b, charon, gw


@pytest.mark.interop
def test_strongswan_establishes_two_children_and_passes_traffic(lab: Lab,
                                                                tmp_path: Path) -> None:
    ns_a, ns_b, charon, gw = _setup(lab, tmp_path)
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM, CTR])))
    charon.initiate(child="net-gcm", ike="a-b")
    charon.initiate(child="net-ctr", ike="a-b")
    kids = {c["name"]: c for c in charon.child_sas()}
    assert set(kids) == {"net-gcm", "net-ctr"}
    for src, dst in (("10.91.1.1", "10.91.2.1"), ("10.91.11.1", "10.91.12.1")):
        res = traffic.ping(ns_a, dst, src=src, count=3, interval=0.05)
        assert res.ok, f"ping {src} -> {dst}: {res.output}\n{gw.log_text()[-3000:]}"
    for src, dst in (("10.91.2.1", "10.91.1.1"), ("10.91.12.1", "10.91.11.1")):
        res = traffic.ping(ns_b, dst, src=src, count=3, interval=0.05)
        assert res.ok, f"ping {src} -> {dst}: {res.output}"
    assert gw.alive()
