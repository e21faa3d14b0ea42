"""Certificate authentication against a real strongSwan 5.9 charon.

One charon per run, several connections under it (distinct identities, one
child each): RSA (PKCS#1 v1.5 and RSASSA-PSS), ECDSA (P-256, P-384) and
Ed25519 certificates on both sides with RFC 7427 signatures, PSK one way and
a certificate the other, and a certificate of an untrusted CA that must be
refused with AUTHENTICATION_FAILED and one log line naming the check; charon
initiating to our gateway, and our ``peer`` initiating to charon. A third run
turns RFC 7427 off in charon: the classic methods 1 (RSA) and 9/10/11 (ECDSA)
both ways. A fourth runs a 2-member cluster with a certificate and kills the
owner of the IKE SA. The certificates are made here with ``cryptography``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.harness import configs
from common.cluster.events import EventType
from tests.cluster_util import event_is, wait_assigned, wait_peer_result
from tests.interop_gw import PSK, OurProcess
from tests.lab.charon import (
    DEFAULT_PLUGINS,
    Charon,
    CharonError,
    Child,
    Conn,
    render_swanctl_conf,
)
from tests.lab.netns import Lab
from tests.pki import Issued, make_ca, make_cert

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PLUGINS = DEFAULT_PLUGINS + " pkcs8 constraints"
#: connection -> (our key type, charon's key type, our auth, charon's auth)
GOOD = {
    "rsa": ("rsa2048", "rsa2048", "pubkey", "pubkey"),
    "rsapss": ("rsa2048", "rsa2048", "rsa/pss", "rsa/pss"),  # RSASSA-PSS both ways
    "ecdsa": ("p256", "p384", "pubkey", "pubkey"),
    "ed25519": ("ed25519", "ed25519", "pubkey", "pubkey"),
    "mixed": ("p256", "", "pubkey", "psk"),  # we sign, charon uses the PSK
}
#: charon with ``signature_authentication = no`` (no RFC 7427): the classic
#: methods 1 (RSA) and 9/10/11 (ECDSA P-256/384/521) both ways
CLASSIC = {
    "rsa": ("rsa2048", "rsa2048", "pubkey", "pubkey"),
    "p256": ("p256", "p384", "pubkey", "pubkey"),
    "p521": ("p521", "p521", "pubkey", "pubkey"),
}
Table = dict[str, tuple[str, str, str, str]]


def _nets(k: int) -> tuple[str, str]:
    return f"10.91.{40 + 2 * k}.0/24", f"10.91.{41 + 2 * k}.0/24"


def _auth(lauth: str, rauth: str, cert: Path, ca: Path) -> dict[str, Any]:
    """A connection's authentication keys: our certificate unless we use the
    PSK, the CA unless they do, the PSK if either does."""
    out: dict[str, Any] = {"local_auth": lauth, "remote_auth": rauth}
    if lauth != "psk":
        out.update(local_cert=f"{cert}.crt", local_key=f"{cert}.key")
    if rauth != "psk":
        out["remote_cacerts"] = [str(ca)]
    if "psk" in (lauth, rauth):
        out["psk"] = PSK
    return out


def _our_toml(address: str, remote: str, conns: list[tuple[str, str, str, str, str, str]],
              start: bool, tmp: Path) -> str:
    """conns: (name, local_id, remote_id, local_auth, remote_auth, cert basename)."""
    cluster = {"address": address, "inside": f"tun:ipsc{'p' if start else 'g'}0",
               "inside_address": f"10.91.250.{1 if start else 2}", "log_level": "debug"}
    ours = []
    for k, (name, lid, rid, lauth, rauth, cert) in enumerate(conns):
        theirs, mine = _nets(k)
        ours.append(configs.Conn(name, lid, rid, (configs.Child(f"c{k}", mine, theirs, None),),
                                 proposals=None,
                                 options=_auth(lauth, rauth, tmp / cert, tmp / "ca.crt")))
    return configs.dumps(configs.gateway_config(cluster, ours, psk=None, remote_addrs=remote,
                                                start_action="start" if start else "none"))


def _setup(tmp: Path, we: str, they: str, good: Table = GOOD) -> tuple[Issued, Issued]:
    ca = make_ca("C=CH, O=Interop, CN=Interop CA", "p256")
    rogue = make_ca("C=CH, O=Rogue, CN=Rogue CA", "p256")
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    for name, (ours, theirs, _, _) in {**good, "rogue": ("p256", "p256", "", "")}.items():
        make_cert(ca, f"C=CH, O=Interop, CN={we}-{name}.test", ours,
                  sans=(f"@{we}-{name}.test",)).write(tmp, f"{we}-{name}")
        if theirs:
            issuer = rogue if name == "rogue" else ca
            make_cert(issuer, f"C=CH, O=Interop, CN={they}-{name}.test", theirs,
                      sans=(f"@{they}-{name}.test",)).write(tmp, f"{they}-{name}")
    return ca, rogue


def _charon_conns(tmp: Path, we: str, they: str, our_addr: str,
                  their_addr: str, good: Table = GOOD) -> list[Conn]:
    out = []
    for k, name in enumerate([*good, "rogue"]):
        theirs, ours = _nets(k)
        _, _, our_auth, their_auth = good.get(name, ("", "p256", "pubkey", "pubkey"))
        pub = their_auth != "psk"
        out.append(Conn(
            name, their_addr, our_addr,
            [Child(f"c{k}", theirs, ours, start_action="none")],
            local_id=f"{they}-{name}.test", remote_id=f"{we}-{name}.test",
            local_auth=their_auth, remote_auth=our_auth,
            local_cert=f"{they}-{name}.crt" if pub else "", remote_cacerts="ca.crt"))
    return out


def _hosts(lab: Lab, ns_charon: str, ns_ours: str, good: Table = GOOD) -> None:
    """charon installs routes for its children only from an address inside them."""
    for k in range(len(good) + 1):
        theirs, ours = _nets(k)
        lab.add_lo_addr(ns_charon, theirs.replace(".0/24", ".1"))
        lab.add_lo_addr(ns_ours, ours.replace(".0/24", ".1"))


def _install(charon: Charon, tmp: Path, they: str) -> None:
    charon.add_file("x509ca", tmp / "ca.crt")
    for crt in tmp.glob(f"{they}-*.crt"):
        charon.add_file("x509", crt)
        charon.add_file("private", crt.with_suffix(".key"))


def _our_conns(we: str, they: str,
               good: Table = GOOD) -> list[tuple[str, str, str, str, str, str]]:
    out = []
    for name in [*good, "rogue"]:
        _, _, ours, theirs = good.get(name, ("", "", "pubkey", "pubkey"))
        theirs = "psk" if theirs == "psk" else "pubkey"  # we accept PKCS#1 and PSS alike
        out.append((name, f"{we}-{name}.test", f"{they}-{name}.test", ours, theirs,
                    f"{we}-{name}"))
    return out


def test_charon_initiates_with_certificates(lab: Lab, tmp_path: Path) -> None:
    """charon (namespace a) initiates each connection; our gateway answers."""
    ns_a, ns_b, _veth = lab.pair()
    _hosts(lab, ns_a, ns_b)
    _setup(tmp_path, "gw-b", "gw-a")
    gw = OurProcess(lab, ns_b, _our_toml("198.18.0.2", "198.18.0.1",
                                         _our_conns("gw-b", "gw-a"), False, tmp_path), tmp_path)
    gw.wait_ready()
    charon = lab.charon(ns_a, "charon-a", plugins=PLUGINS)
    _install(charon, tmp_path, "gw-a")
    charon.load(render_swanctl_conf(*_charon_conns(tmp_path, "gw-b", "gw-a", "198.18.0.2",
                                                   "198.18.0.1")))
    for k, name in enumerate(GOOD):
        charon.initiate(child=f"c{k}", ike=name)
        ike = charon.ike_sa(name)
        assert ike is not None and ike.get("state") == "ESTABLISHED", name
    with pytest.raises(CharonError):
        charon.initiate(child=f"c{len(GOOD)}", ike="rogue")
    failed = gw.wait_event(event_is(EventType.IKE_FAILED, peer="198.18.0.1"),
                           what="IKE_FAILED of the rogue")
    assert "gw-a-rogue.test" in failed.reason, failed
    assert "is not issued by a trusted CA" in failed.reason, failed
    theirs = charon.log_text()
    assert "received AUTHENTICATION_FAILED" in theirs
    # what charon verified of ours (RFC 7427 method 14 each time)
    for who, scheme in (("rsa", "RSA_EMSA_PKCS1_SHA2_256"), ("rsapss", "RSA_EMSA_PSS"),
                        ("ecdsa", "ECDSA_WITH_SHA256_DER"), ("ed25519", "ED25519"),
                        ("mixed", "ECDSA_WITH_SHA256_DER")):
        assert f"authentication of 'gw-b-{who}.test' with {scheme}" in theirs, who
    assert gw.alive()


def test_our_peer_initiates_to_charon_with_certificates(lab: Lab, tmp_path: Path) -> None:
    """Our ``peer`` (namespace a) initiates each connection; charon answers and
    sends its certificate because our IKE_AUTH carries CERTREQ."""
    ns_a, ns_b, _veth = lab.pair()
    _hosts(lab, ns_b, ns_a)
    _setup(tmp_path, "gw-a", "gw-b")
    charon = lab.charon(ns_b, "charon-b", plugins=PLUGINS)
    _install(charon, tmp_path, "gw-b")
    charon.load(render_swanctl_conf(*_charon_conns(tmp_path, "gw-a", "gw-b", "198.18.0.1",
                                                   "198.18.0.2")))
    peer = OurProcess(lab, ns_a, _our_toml("198.18.0.1", "198.18.0.2",
                                           _our_conns("gw-a", "gw-b"), True, tmp_path),
                      tmp_path, command="peer", name="peer", args=["--json"])
    charon.wait_for("the children up at the responder",
                    lambda: len(charon.child_sas()) == len(GOOD) or None, timeout=30)
    up = {sa.get("name") for sa in charon.list_sas()}
    assert up >= set(GOOD), up
    # (our peer serves no event stream: its --json result names why the rogue failed)
    result = wait_peer_result(peer, timeout=15)
    (reason,) = [r for r in result["reasons"] if "is not issued by a trusted CA" in r]
    assert "gw-b-rogue.test" in reason, result
    assert peer.alive()


def test_classic_methods_with_charon_without_rfc7427(lab: Lab, tmp_path: Path) -> None:
    """charon without RFC 7427 sends no N(SIGNATURE_HASH_ALGORITHMS): both
    sides sign with the classic methods, and an untrusted CA is still refused."""
    ns_a, ns_b, _veth = lab.pair()
    _hosts(lab, ns_a, ns_b, CLASSIC)
    _setup(tmp_path, "gw-b", "gw-a", CLASSIC)
    gw = OurProcess(lab, ns_b, _our_toml("198.18.0.2", "198.18.0.1",
                                         _our_conns("gw-b", "gw-a", CLASSIC), False, tmp_path),
                    tmp_path)
    gw.wait_ready()
    charon = lab.charon(ns_a, "charon-a", plugins=PLUGINS,
                        charon_options={"signature_authentication": "no"})
    _install(charon, tmp_path, "gw-a")
    charon.load(render_swanctl_conf(*_charon_conns(tmp_path, "gw-b", "gw-a", "198.18.0.2",
                                                   "198.18.0.1", CLASSIC)))
    for k, name in enumerate(CLASSIC):
        charon.initiate(child=f"c{k}", ike=name)
    with pytest.raises(CharonError):
        charon.initiate(child=f"c{len(CLASSIC)}", ike="rogue")
    theirs = charon.log_text()
    assert "N(HASH_ALG)" not in theirs
    for who, scheme in (("rsa", "RSA signature"), ("p256", "ECDSA-256 signature"),
                        ("p521", "ECDSA-521 signature")):
        assert f"authentication of 'gw-b-{who}.test' with {scheme}" in theirs, [
            ln for ln in theirs.splitlines() if "authentication of" in ln]
    failed = gw.wait_event(event_is(EventType.IKE_FAILED, peer="198.18.0.1"),
                           what="IKE_FAILED of the rogue")
    assert "is not issued by a trusted CA" in failed.reason, failed


def test_cluster_member_takes_over_a_certificate_ike_sa(lab: Lab, tmp_path: Path) -> None:
    """A 2-member cluster authenticated with a certificate: kill -9 the member
    that owns the IKE SA; the other one continues it (same SPIs, no new
    IKE_SA_INIT), rekeys with charon and passes traffic. Every member loaded
    the same certificate and key from the config; nothing else is needed."""
    import os
    import signal

    from tests.failover_lab import owners, status
    from tests.lab import traffic

    ns_a, ns_b, _veth = lab.pair()
    _setup(tmp_path, "gw-b", "gw-a", {"ha": ("p256", "p256", "pubkey", "pubkey")})
    lab.add_lo_addr(ns_a, "10.91.60.1")
    lab.add_lo_addr(ns_b, "10.91.61.1")
    cert = tmp_path / "gw-b-ha"
    ha = configs.Conn("ha", "gw-b-ha.test", "gw-a-ha.test",
                      (configs.Child("h1", "10.91.61.0/24", "10.91.60.0/24", None),),
                      proposals=None, options={
                          **_auth("pubkey", "pubkey", cert, tmp_path / "ca.crt"),
                          "dpd_delay": 0})
    cluster = OurProcess(lab, ns_b, configs.dumps(configs.gateway_config(
        {"address": configs.LAB_GATEWAY, "inside": "tun:ipsc0", "inside_address": "10.91.2.1",
         "members": 2, "log_level": "info", "replay_after_failover": "rekey"},
        [ha], psk=None, start_action=None)), tmp_path, name="cluster")
    wait_assigned(cluster, 2, timeout=30)
    charon = lab.charon(ns_a, "charon-a", plugins=PLUGINS, charon_options={"uniqueids": "no"})
    _install(charon, tmp_path, "gw-a")
    charon.load(render_swanctl_conf(Conn(
        "ha", "198.18.0.1", "198.18.0.2", [Child("h1", "10.91.60.0/24", "10.91.61.0/24")],
        local_id="gw-a-ha.test", remote_id="gw-b-ha.test", local_auth="pubkey",
        remote_auth="pubkey", local_cert="gw-a-ha.crt", remote_cacerts="ca.crt",
        dpd_delay="1s")))
    charon.initiate(child="h1", ike="ha")
    ike = charon.ike_sa("ha")
    assert ike is not None
    spis = (ike["initiator-spi"], ike["responder-spi"])
    ike_owner, _ = owners(cluster.config)
    pid = next(m["pid"] for m in status(cluster.config)["members"]
               if m["id"] == ike_owner["ha"])
    os.kill(pid, signal.SIGKILL)
    charon.rekey_child("h1")            # answered by the member that took over
    res = traffic.ping(ns_a, "10.91.61.1", src="10.91.60.1", count=3, interval=0.05)
    assert res.ok, res.output
    after = charon.ike_sa("ha")
    assert after is not None and (after["initiator-spi"], after["responder-spi"]) == spis
    assert charon.log_text().count("initiating IKE_SA") == 1
    assert owners(cluster.config)[0]["ha"] != ike_owner["ha"]
