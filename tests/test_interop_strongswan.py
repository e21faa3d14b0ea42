"""Our gateway against a real strongSwan (charon 5.9 with libipsec) in network
namespaces. charon initiates from 198.18.0.1 (namespace a); our gateway answers
at 198.18.0.2 (namespace b) with a TUN device as its inside. Inner hosts:
10.91.1.1 <-> 10.91.2.1 over the AES-GCM child, 10.91.11.1 <-> 10.91.12.1 over
the AES-CTR + HMAC-SHA-256 child. The last test swaps roles: our ``peer``
initiates, charon answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.cluster.events import EventType
from tests.cluster_util import event_is, spi_of, wait_for
from tests.interop_gw import OurProcess, gateway_toml
from tests.lab import traffic
from tests.lab.charon import Charon, CharonError, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

pytestmark = pytest.mark.interop

GCM = Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16")
CTR = Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24", esp_proposals="aes128ctr-sha256")
PAIRS = (("10.91.1.1", "10.91.2.1"), ("10.91.11.1", "10.91.12.1"))


def _setup(lab: Lab, tmp_path: Path, conn: Conn | None = None,
           **gw_kw: object) -> tuple[str, str, Charon, OurProcess]:
    ns_a, ns_b, _veth = lab.pair()
    for addr in ("10.91.1.1", "10.91.11.1"):
        lab.add_lo_addr(ns_a, addr)
    lab.add_lo_addr(ns_b, "10.91.12.1")
    gw = OurProcess(lab, ns_b, gateway_toml(**gw_kw), tmp_path)  # type: ignore[arg-type]
    gw.wait_ready()
    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(conn or Conn("a-b", "198.18.0.1", "198.18.0.2",
                                                 [GCM, CTR])))
    return ns_a, ns_b, charon, gw


def dpd_answered(gw: OurProcess) -> int:
    """DPD exchanges of ours the peer answered (the members' ``dpd_ok`` counters)."""
    stats = gw.control().request("stats")
    return sum(m["counters"].get("dpd_ok", 0) for m in stats["members"])


def _up(charon: Charon) -> dict[str, dict]:  # type: ignore[type-arg]
    charon.initiate(child="net-gcm", ike="a-b")
    charon.initiate(child="net-ctr", ike="a-b")
    return {c["name"]: c for c in charon.child_sas()}


def _traffic(ns_a: str, ns_b: str, lab: Lab, gw: OurProcess, port: int = 7001) -> None:
    """Ping both ways over both children; UDP both ways over both children."""
    for src, dst in PAIRS:
        for ns, s, d in ((ns_a, src, dst), (ns_b, dst, src)):
            res = traffic.ping(ns, d, src=s, count=3, interval=0.05)
            assert res.ok, f"ping {s} -> {d}: {res.output}\n{gw.log_text()[-3000:]}"
    for src, dst in PAIRS:
        for (sns, s), (dns, d) in (((ns_a, src), (ns_b, dst)), ((ns_b, dst), (ns_a, src))):
            with traffic.UdpServer(dns, d, port, lab=lab):
                res_udp = traffic.udp_send(sns, d, port, src=s, count=40, size=700,
                                           interval=0.002)
            assert res_udp.ok, f"UDP {s} -> {d}: {res_udp}"


def test_two_children_gcm_and_ctr_pass_ping_and_udp_both_ways(lab: Lab,
                                                             tmp_path: Path) -> None:
    ns_a, ns_b, charon, gw = _setup(lab, tmp_path)
    kids = _up(charon)
    assert set(kids) == {"net-gcm", "net-ctr"}
    assert kids["net-ctr"]["encr-alg"] == "AES_CTR"
    assert kids["net-ctr"]["integ-alg"] == "HMAC_SHA2_256_128"
    ike = charon.ike_sa("a-b")
    assert ike is not None and ike["remote-port"] == "4500" and ike["nat-any"] == "yes"
    _traffic(ns_a, ns_b, lab, gw)
    assert gw.alive()


def test_rekeys_initiated_by_strongswan(lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, charon, gw = _setup(lab, tmp_path)
    kids = _up(charon)
    for name in ("net-gcm", "net-ctr"):
        since = gw.mark()
        new = charon.rekey_child(name)
        assert new["spi-in"] != kids[name]["spi-in"]
        # (charon's outbound SPIs are our inbound ones)
        gw.wait_event(event_is(EventType.CHILD_REKEYED, child=name,
                               child_spi=spi_of(kids[name]["spi-out"]),
                               new_spi=spi_of(new["spi-out"])), since=since,
                      what=f"CHILD_REKEYED of {name}")
    _traffic(ns_a, ns_b, lab, gw, 7002)
    old = charon.ike_sa("a-b")
    since = gw.mark()
    new_ike = charon.rekey_ike("a-b")
    assert old is not None and new_ike["initiator-spi"] != old["initiator-spi"]
    gw.wait_event(event_is(EventType.IKE_REKEYED, conn="a-b",
                           ike_spi=spi_of(old["responder-spi"]),
                           new_spi=spi_of(new_ike["responder-spi"])), since=since,
                  what="IKE_REKEYED")
    _traffic(ns_a, ns_b, lab, gw, 7003)
    # children can still be rekeyed under the new IKE SA
    charon.rekey_child("net-gcm")
    _traffic(ns_a, ns_b, lab, gw, 7004)


def test_rekeys_initiated_by_us(lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, charon, gw = _setup(lab, tmp_path, child_rekey=3, rekey_time=6)
    kids = _up(charon)
    first = {c["spi-in"] for c in kids.values()}
    charon.wait_for("both children rekeyed by the gateway", lambda: (
        len(charon.child_sas()) == 2 and not first & {c["spi-in"] for c in charon.child_sas()}),
        timeout=15)
    old = charon.ike_sa("a-b")
    assert old is not None
    charon.wait_for("IKE SA rekeyed by the gateway", lambda: any(
        s["initiator-spi"] != old["initiator-spi"] and s["state"] == "ESTABLISHED"
        for s in charon.list_sas()), timeout=15)
    _traffic(ns_a, ns_b, lab, gw, 7005)
    log = charon.log_text()
    assert "received CREATE_CHILD_SA request" in log or "CREATE_CHILD_SA request" in log
    assert gw.alive()


def test_dpd_initiated_by_us(lab: Lab, tmp_path: Path) -> None:
    """An idle IKE SA: our gateway sends DPD (an empty INFORMATIONAL) every second."""
    conn = Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM, CTR], dpd_delay="0s")
    ns_a, ns_b, charon, gw = _setup(lab, tmp_path, conn, dpd_delay=1)
    _up(charon)
    # (not an SA state change: the member's counter of DPD exchanges answered)
    wait_for("a DPD answered", lambda: dpd_answered(gw) > 0, timeout=8, diag=gw.tail)
    _traffic(ns_a, ns_b, lab, gw, 7006)
    assert charon.ike_sa("a-b") is not None


def test_dpd_initiated_by_strongswan(lab: Lab, tmp_path: Path) -> None:
    conn = Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM, CTR], dpd_delay="1s")
    _ns_a, _ns_b, charon, gw = _setup(lab, tmp_path, conn, dpd_delay=0)
    _up(charon)
    charon.wait_for("charon sent DPD and got an answer", lambda: (
        "sending DPD request" in charon.log_text()
        and "parsed INFORMATIONAL response" in charon.log_text()), timeout=8)
    assert charon.ike_sa("a-b") is not None and gw.alive()


def test_delete_child_and_ike_by_strongswan(lab: Lab, tmp_path: Path) -> None:
    ns_a, _ns_b, charon, gw = _setup(lab, tmp_path)
    kids = _up(charon)
    ike = charon.ike_sa("a-b")
    assert ike is not None
    since = gw.mark()
    charon.swanctl("--terminate", "--child", "net-ctr")
    down = gw.wait_event(event_is(EventType.CHILD_DOWN, child="net-ctr",
                                  child_spi=spi_of(kids["net-ctr"]["spi-out"])), since=since,
                         what="CHILD_DOWN of net-ctr")
    assert down.reason == "deleted by peer", down
    assert traffic.ping(ns_a, "10.91.2.1", src="10.91.1.1", count=2, interval=0.05).ok
    since = gw.mark()
    charon.terminate_ike("a-b")
    down = gw.wait_event(event_is(EventType.IKE_DOWN, ike_spi=spi_of(ike["responder-spi"])),
                         since=since, what="IKE_DOWN")
    assert down.reason == "deleted by peer", down
    assert not traffic.ping(ns_a, "10.91.2.1", src="10.91.1.1", count=1,
                            deadline_s=1).received


def test_wrong_psk_is_refused_with_a_reason(lab: Lab, tmp_path: Path) -> None:
    _ns_a, _ns_b, charon, gw = _setup(lab, tmp_path, psk="not-the-same-psk-at-all")
    with pytest.raises(CharonError):
        charon.initiate(child="net-gcm", ike="a-b", timeout=5)
    failed = gw.wait_event(event_is(EventType.IKE_FAILED, conn="a-b"), what="IKE_FAILED")
    assert "failed PSK authentication" in failed.reason, failed
    assert "gw-a.test" in failed.reason and "wrong pre-shared key" in failed.reason, failed
    assert failed.peer == "198.18.0.1"
    assert "AUTHENTICATION_FAILED" in charon.log_text()
    assert charon.ike_sa("a-b") is None
    assert gw.alive()


def test_no_common_proposal(lab: Lab, tmp_path: Path) -> None:
    conn = Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM],
                proposals="aes256gcm16-prfsha384-ecp384")
    _ns_a, _ns_b, charon, gw = _setup(lab, tmp_path, conn)
    with pytest.raises(CharonError):
        charon.initiate(child="net-gcm", ike="a-b", timeout=5)
    assert "NO_PROPOSAL_CHOSEN" in charon.log_text()
    failed = gw.wait_event(event_is(EventType.IKE_FAILED, peer="198.18.0.1"),
                           what="IKE_FAILED")
    assert "no common proposal" in failed.reason and failed.conn == "a-b", failed
    assert gw.alive()


def test_other_ike_suites(lab: Lab, tmp_path: Path) -> None:
    """CBC + HMAC IKE encryption with MODP and curve25519, ESP with PFS."""
    conn = Conn("a-b", "198.18.0.1", "198.18.0.2",
                [Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24",
                       esp_proposals="aes256gcm16-curve25519"),
                 Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24",
                       esp_proposals="aes256ctr-sha256-modp2048")],
                proposals="aes256-sha256-prfsha384-curve25519")
    ns_a, ns_b, charon, gw = _setup(
        lab, tmp_path, conn, proposals="aes256-sha256-prfsha384-curve25519",
        children=[("net-gcm", "10.91.2.0/24", "10.91.1.0/24", "aes256gcm16-curve25519"),
                  ("net-ctr", "10.91.12.0/24", "10.91.11.0/24",
                   "aes256ctr-sha256-modp2048")])
    kids = _up(charon)
    assert kids["net-ctr"]["encr-keysize"] == "256"
    # a rekey with PFS (the KE payload is in CREATE_CHILD_SA)
    charon.rekey_child("net-ctr")
    charon.rekey_child("net-gcm")
    _traffic(ns_a, ns_b, lab, gw, 7007)


def test_our_peer_against_strongswan_responder(lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, _veth = lab.pair()
    lab.add_lo_addr(ns_b, "10.91.2.1")
    lab.add_lo_addr(ns_b, "10.91.12.1")
    charon = lab.charon(ns_b, "charon-b")
    charon.load(render_swanctl_conf(
        Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM, CTR]).mirrored()))
    peer = OurProcess(lab, ns_a, gateway_toml(
        address="198.18.0.1", remote="198.18.0.2", inside="tun:ipsp0",
        inside_address="10.91.1.1", local_id="gw-a.test", remote_id="gw-b.test",
        start_action="start",
        children=[("net-gcm", "10.91.1.0/24", "10.91.2.0/24", "aes128gcm16"),
                  ("net-ctr", "10.91.11.0/24", "10.91.12.0/24", "aes128ctr-sha256")]),
        tmp_path, command="peer", name="peer")
    lab.add_lo_addr(ns_a, "10.91.11.1")
    charon.wait_for("both children up at the responder",
                    lambda: len(charon.child_sas()) == 2, timeout=10)
    ike = charon.ike_sa("a-b")
    assert ike is not None and "initiator" not in ike
    for src, dst in PAIRS:
        assert traffic.ping(ns_a, dst, src=src, count=3, interval=0.05).ok, peer.log_text()
        assert traffic.ping(ns_b, src, src=dst, count=3, interval=0.05).ok
    charon.rekey_child("net-gcm")
    charon.rekey_ike("a-b")
    for src, dst in PAIRS:
        assert traffic.ping(ns_a, dst, src=src, count=2, interval=0.05).ok, peer.log_text()
