"""The lab itself, and the strongSwan-vs-strongSwan baseline.

Two charons in two namespaces (198.18.0.1 <-> 198.18.0.2 over veth), PSK, the
example proposals; inner hosts on ``lo``: 10.91.1.1 <-> 10.91.2.1 (AES-GCM child)
and 10.91.11.1 <-> 10.91.12.1 (AES-CTR + HMAC-SHA256 child).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.lab import netns, traffic
from tests.lab.charon import Child, Conn, parse_list_sas, parse_vici_raw, render_swanctl_conf
from tests.lab.netns import Lab

# Captured on this machine type (strongSwan 5.9.8): `swanctl --list-sas --raw` of an
# initiator with two CHILD_SAs, one of them rekeyed (old one lingers as DELETED).
RAW_INITIATOR = (
    "list-sa event {a-b {uniqueid=1 version=2 state=ESTABLISHED local-host=198.18.0.1 "
    "local-port=4500 local-id=gw-a.test remote-host=198.18.0.2 remote-port=4500 "
    "remote-id=gw-b.test initiator=yes initiator-spi=e9dc897b2b025c9b "
    "responder-spi=ef569e79b18f6c8e nat-remote=yes nat-any=yes encr-alg=AES_GCM_16 "
    "encr-keysize=128 prf-alg=PRF_HMAC_SHA2_256 dh-group=ECP_256 established=14 "
    "rekey-time=14325 child-sas {net-gcm-1 {name=net-gcm uniqueid=1 reqid=1 state=DELETED "
    "mode=TUNNEL protocol=ESP encap=yes spi-in=d549fdcb spi-out=3c9de1aa encr-alg=AES_GCM_16 "
    "encr-keysize=128 bytes-in=168 packets-in=2 use-in=14 bytes-out=0 packets-out=0 "
    "rekey-time=3277 life-time=3946 install-time=14 local-ts=[10.91.1.0/24] "
    "remote-ts=[10.91.2.0/24]} net-ctr-2 {name=net-ctr uniqueid=2 reqid=2 state=INSTALLED "
    "mode=TUNNEL protocol=ESP encap=yes spi-in=968ab444 spi-out=9253067c encr-alg=AES_CTR "
    "encr-keysize=128 integ-alg=HMAC_SHA2_256_128 bytes-in=168 packets-in=2 use-in=14 "
    "bytes-out=168 packets-out=2 use-out=14 rekey-time=3326 life-time=3946 install-time=14 "
    "local-ts=[10.91.11.0/24] remote-ts=[10.91.12.0/24]} net-gcm-3 {name=net-gcm uniqueid=3 "
    "reqid=1 state=INSTALLED mode=TUNNEL protocol=ESP encap=yes spi-in=cfb80523 "
    "spi-out=0ae7eeef encr-alg=AES_GCM_16 encr-keysize=128 bytes-in=0 packets-in=0 "
    "bytes-out=0 packets-out=0 rekey-time=3286 life-time=3960 install-time=0 "
    "local-ts=[10.91.1.0/24] remote-ts=[10.91.2.0/24]}}}}\n"
    "list-sas reply {}\n"
)


def test_parse_raw_list_sas_sample() -> None:
    sas = parse_list_sas(RAW_INITIATOR)
    assert len(sas) == 1
    ike = sas[0]
    assert ike["name"] == "a-b"
    assert ike["state"] == "ESTABLISHED"
    assert ike["initiator"] == "yes"
    assert (ike["initiator-spi"], ike["responder-spi"]) == ("e9dc897b2b025c9b",
                                                            "ef569e79b18f6c8e")
    assert [c["key"] for c in ike["child-sas"]] == ["net-gcm-1", "net-ctr-2", "net-gcm-3"]
    old, ctr, new = ike["child-sas"]
    assert (old["name"], old["state"], old["spi-in"]) == ("net-gcm", "DELETED", "d549fdcb")
    assert (new["name"], new["state"], new["spi-in"]) == ("net-gcm", "INSTALLED", "cfb80523")
    assert ctr["integ-alg"] == "HMAC_SHA2_256_128"
    assert ctr["local-ts"] == ["10.91.11.0/24"]
    assert new["remote-ts"] == ["10.91.2.0/24"]


def test_parse_raw_values_with_spaces_lists_and_empty() -> None:
    text = (
        "list-sa event {x {state=CONNECTING local-id=C=CH, O=strongSwan, CN=moon "
        "remote-id=%any tasks-queued=[IKE_VENDOR IKE_INIT IKE_AUTH] child-sas {}}}\n"
        "list-sas reply {}\n"
    )
    msgs = parse_vici_raw(text)
    assert [label for label, _ in msgs] == ["list-sa event", "list-sas reply"]
    x = msgs[0][1]["x"]
    assert x["local-id"] == "C=CH, O=strongSwan, CN=moon"
    assert x["remote-id"] == "%any"
    assert x["tasks-queued"] == ["IKE_VENDOR", "IKE_INIT", "IKE_AUTH"]
    assert x["child-sas"] == {}
    assert msgs[1][1] == {}
    assert parse_list_sas("list-sas reply {}\n") == []


@pytest.mark.parametrize("bad", ["list-sa event {a {x=1}", "garbage", "l {a {x=1}} junk"])
def test_parse_raw_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_vici_raw(bad)


def test_swanctl_conf_mirror() -> None:
    conn = Conn("a-b", "198.18.0.1", "198.18.0.2",
                [Child("net", "10.91.1.0/24", "10.91.2.0/24")], remote_port=4510)
    peer = conn.mirrored()
    assert (peer.local_addrs, peer.local_id, peer.local_port) == ("198.18.0.2", "gw-b.test",
                                                                   4510)
    assert peer.children[0].local_ts == "10.91.2.0/24"
    text = render_swanctl_conf(conn)
    assert "mobike = no" in text and "remote_port = 4510" in text
    assert 'secret = "interop-test-psk-0123456789"' in text


@pytest.mark.netns
def test_lab_veth_lo_and_teardown(lab: Lab) -> None:
    ns_a, ns_b, veth = lab.pair()
    lab.add_lo_addr(ns_a, "10.91.1.1")
    lab.add_lo_addr(ns_b, "10.91.2.1")
    lab.add_route(ns_a, "10.91.2.0/24", via=veth.ip_b)
    lab.add_route(ns_b, "10.91.1.0/24", via=veth.ip_a)
    assert traffic.ping(ns_a, veth.ip_b, count=2, interval=0.05).ok
    assert traffic.ping(ns_b, "10.91.1.1", src="10.91.2.1", count=2, interval=0.05).ok
    with traffic.UdpServer(ns_b, "10.91.2.1", 7001, lab=lab) as srv:
        res = traffic.udp_send(ns_a, "10.91.2.1", 7001, src="10.91.1.1", count=20)
    assert res.ok, res
    assert srv.stats is not None and srv.stats["received"] == 20
    sleeper = lab.popen(ns_a, ["sleep", "300"])
    lab.close()
    assert sleeper.poll() is not None
    assert ns_a not in netns.list_netns() and ns_b not in netns.list_netns()


@pytest.mark.netns
def test_cleanup_stale_removes_dead_runs_namespaces() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()  # its pid is now dead
    name = f"{netns.DEFAULT_PREFIX}t-{proc.pid}-1"
    netns.create_netns(name)
    try:
        assert netns.cleanup_stale(f"{netns.DEFAULT_PREFIX}t") == [name]
        assert name not in netns.list_netns()
    finally:
        netns.delete_netns(name)


GCM = Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16")
CTR = Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24", esp_proposals="aes128ctr-sha256")
INNER = {"a": ("10.91.1.1", "10.91.11.1"), "b": ("10.91.2.1", "10.91.12.1")}


def _both_ways(ns_a: str, ns_b: str, lab: Lab, port: int) -> None:
    """Ping both ways over both children, and UDP echo both ways over the GCM child."""
    for (src_ns, src), (_dst_ns, dst) in (
        ((ns_a, INNER["a"][0]), (ns_b, INNER["b"][0])),
        ((ns_a, INNER["a"][1]), (ns_b, INNER["b"][1])),
        ((ns_b, INNER["b"][0]), (ns_a, INNER["a"][0])),
        ((ns_b, INNER["b"][1]), (ns_a, INNER["a"][1])),
    ):
        res = traffic.ping(src_ns, dst, src=src, count=3, interval=0.05)
        assert res.ok, f"ping {src} -> {dst}: {res.output}"
    for (src_ns, src), (dst_ns, dst) in (
        ((ns_a, INNER["a"][0]), (ns_b, INNER["b"][0])),
        ((ns_b, INNER["b"][0]), (ns_a, INNER["a"][0])),
    ):
        with traffic.UdpServer(dst_ns, dst, port, lab=lab):
            udp = traffic.udp_send(src_ns, dst, port, src=src, count=50, size=512,
                                   interval=0.002)
        assert udp.ok, f"UDP {src} -> {dst}: {udp}"


@pytest.mark.interop
def test_strongswan_baseline(lab: Lab) -> None:
    ns_a, ns_b, veth = lab.pair()
    for side, ns in (("a", ns_a), ("b", ns_b)):
        for addr in INNER[side]:
            lab.add_lo_addr(ns, addr)
    a, b = lab.charon(ns_a, "charon-a"), lab.charon(ns_b, "charon-b")
    conn = Conn("a-b", veth.ip_a, veth.ip_b, [GCM, CTR])
    a.load(render_swanctl_conf(conn))
    b.load(render_swanctl_conf(conn.mirrored()))

    a.initiate(child="net-gcm", ike="a-b")
    a.initiate(child="net-ctr", ike="a-b")
    ike_a, ike_b = a.ike_sa("a-b"), b.ike_sa("a-b")
    assert ike_a is not None and ike_b is not None
    assert ike_a["initiator"] == "yes" and "initiator" not in ike_b
    assert ike_a["initiator-spi"] == ike_b["initiator-spi"]
    assert (ike_a["encr-alg"], ike_a["prf-alg"], ike_a["dh-group"]) == (
        "AES_GCM_16", "PRF_HMAC_SHA2_256", "ECP_256")
    assert ike_a["nat-any"] == "yes"  # libipsec fakes NAT: IKE and ESP on UDP 4500
    assert ike_a["remote-port"] == "4500"
    kids = {c["name"]: c for c in a.child_sas()}
    assert set(kids) == {"net-gcm", "net-ctr"}
    assert kids["net-ctr"]["integ-alg"] == "HMAC_SHA2_256_128"
    assert {c["spi-in"] for c in b.child_sas()} == {c["spi-out"] for c in kids.values()}
    _both_ways(ns_a, ns_b, lab, 7001)

    old_spi = kids["net-gcm"]["spi-in"]
    new = a.rekey_child("net-gcm")
    assert new["spi-in"] != old_spi
    b.wait_for("responder installed the rekeyed child",
               lambda: any(c["spi-out"] == new["spi-in"] for c in b.child_sas("net-gcm")))
    _both_ways(ns_a, ns_b, lab, 7002)

    new_ike = a.rekey_ike("a-b")
    assert new_ike["initiator-spi"] != ike_a["initiator-spi"]
    assert {c["name"] for c in new_ike["child-sas"] if c["state"] == "INSTALLED"} == {
        "net-gcm", "net-ctr"}
    _both_ways(ns_a, ns_b, lab, 7003)

    a.terminate_ike("a-b")
    b.wait_for("responder dropped the IKE SA", lambda: not b.list_sas())
    assert not traffic.ping(ns_a, INNER["b"][0], src=INNER["a"][0], count=1,
                            deadline_s=1).received
    assert "IKE_SA a-b[1] established" in a.log_text()


@pytest.mark.interop
def test_strongswan_custom_ports(lab: Lab) -> None:
    """Non-500 ports, as the cluster will use: after IKE_SA_INIT (from ``port``, with the
    non-ESP marker) everything goes from ``port_nat_t`` to the responder's ``remote_port``."""
    ns_a, ns_b, veth = lab.pair()
    lab.add_lo_addr(ns_a, INNER["a"][0])
    lab.add_lo_addr(ns_b, INNER["b"][0])
    a = lab.charon(ns_a, "charon-a", port=1501, port_nat_t=14501)
    b = lab.charon(ns_b, "charon-b", port=1500, port_nat_t=14500)
    conn = Conn("ports", veth.ip_a, veth.ip_b, [GCM], remote_port=14500)
    a.load(render_swanctl_conf(conn))
    b.load(render_swanctl_conf(conn.mirrored()))
    a.initiate(child="net-gcm")
    ike_a, ike_b = a.ike_sa("ports"), b.ike_sa("ports")
    assert ike_a is not None and ike_b is not None
    assert (ike_a["local-port"], ike_a["remote-port"]) == ("14501", "14500")
    assert (ike_b["local-port"], ike_b["remote-port"]) == ("14500", "14501")
    assert traffic.ping(ns_a, INNER["b"][0], src=INNER["a"][0], count=2, interval=0.05).ok
    assert f"from {veth.ip_a}[1501] to {veth.ip_b}[14500]" in a.log_text()
