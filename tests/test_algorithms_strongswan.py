"""The algorithms a strongSwan 5.9 peer offers, against a real charon.

One IKE SA per IKE proposal (charon initiates from namespace a, our gateway
answers in namespace b), several children under it, one per ESP proposal;
for each child a ping both ways.  Children whose proposal names a DH group
are rekeyed once, so that the group runs in CREATE_CHILD_SA (PFS), and pinged
again; then the IKE SA is rekeyed (its suite and group once more, and the
new SK_d) and the first child rekeyed and pinged under it.  What charon
reports as negotiated is checked against the proposal, so the matrix below is
what really ran:

    IKE proposal                             ESP proposals
    aes128-sha1-modp2048                     aes128-sha1, aes256-sha1, aes128-sha256
    aes256-sha512-ecp521                     aes256-sha384, aes256-sha512, aes128-sha256-ecp521
    aes256-sha384-modp4096                   aes256-sha256-modp4096, aes128-sha384,
                                             aes128-sha512
    chacha20poly1305-prfsha256-ecp384        chacha20poly1305, chacha20poly1305-modp3072
    default (both sides)                     default (both sides)

and with roles swapped (our ``peer`` initiates with ``default`` for both, charon
answers with one choice of its own): chacha20poly1305-prfsha512-ecp521 (we
offered curve25519 first: INVALID_KE_PAYLOAD, then ecp521) with ESP aes256-sha512.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop_gw import OurProcess, gateway_toml
from tests.lab import traffic
from tests.lab.charon import Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@dataclass(frozen=True, slots=True)
class Expect:
    """What charon's ``list-sas`` must show (None: do not check)."""

    encr: str
    keysize: str | None = None
    integ: str | None = None
    prf: str | None = None
    dh: str | None = None


@dataclass(frozen=True, slots=True)
class Kid:
    esp: str
    expect: Expect


@dataclass(frozen=True, slots=True)
class Case:
    ike: str
    expect: Expect
    kids: tuple[Kid, ...]


CASES = {
    "cbc-sha1-modp2048": Case(
        "aes128-sha1-modp2048",
        Expect("AES_CBC", "128", "HMAC_SHA1_96", "PRF_HMAC_SHA1", "MODP_2048"),
        (Kid("aes128-sha1", Expect("AES_CBC", "128", "HMAC_SHA1_96")),
         Kid("aes256-sha1", Expect("AES_CBC", "256", "HMAC_SHA1_96")),
         Kid("aes128-sha256", Expect("AES_CBC", "128", "HMAC_SHA2_256_128")))),
    "cbc-sha512-ecp521": Case(
        "aes256-sha512-ecp521",
        Expect("AES_CBC", "256", "HMAC_SHA2_512_256", "PRF_HMAC_SHA2_512", "ECP_521"),
        (Kid("aes256-sha384", Expect("AES_CBC", "256", "HMAC_SHA2_384_192")),
         Kid("aes256-sha512", Expect("AES_CBC", "256", "HMAC_SHA2_512_256")),
         Kid("aes128-sha256-ecp521", Expect("AES_CBC", "128", "HMAC_SHA2_256_128",
                                            dh="ECP_521")))),
    "cbc-sha384-modp4096": Case(
        "aes256-sha384-modp4096",
        Expect("AES_CBC", "256", "HMAC_SHA2_384_192", "PRF_HMAC_SHA2_384", "MODP_4096"),
        (Kid("aes256-sha256-modp4096", Expect("AES_CBC", "256", "HMAC_SHA2_256_128",
                                              dh="MODP_4096")),
         Kid("aes128-sha384", Expect("AES_CBC", "128", "HMAC_SHA2_384_192")),
         Kid("aes128-sha512", Expect("AES_CBC", "128", "HMAC_SHA2_512_256")))),
    "chacha-ecp384": Case(
        "chacha20poly1305-prfsha256-ecp384",
        Expect("CHACHA20_POLY1305", None, None, "PRF_HMAC_SHA2_256", "ECP_384"),
        (Kid("chacha20poly1305", Expect("CHACHA20_POLY1305")),
         Kid("chacha20poly1305-modp3072", Expect("CHACHA20_POLY1305", dh="MODP_3072")))),
    "default": Case(
        "default",
        Expect("AES_CBC", "128", "HMAC_SHA2_256_128", "PRF_HMAC_SHA2_256", "CURVE_25519"),
        (Kid("default", Expect("AES_CBC", "128", "HMAC_SHA2_256_128")),)),
}


def _nets(k: int) -> tuple[str, str, str, str]:
    """Child k: charon's inside net and host, ours and our host."""
    return (f"10.91.{30 + 2 * k}.0/24", f"10.91.{30 + 2 * k}.1",
            f"10.91.{31 + 2 * k}.0/24", f"10.91.{31 + 2 * k}.1")


def _check(sa: dict, expect: Expect, what: str) -> None:  # type: ignore[type-arg]
    got = {"encr-alg": sa.get("encr-alg"), "encr-keysize": sa.get("encr-keysize"),
           "integ-alg": sa.get("integ-alg"), "prf-alg": sa.get("prf-alg"),
           "dh-group": sa.get("dh-group")}
    want = {"encr-alg": expect.encr, "encr-keysize": expect.keysize,
            "integ-alg": expect.integ, "prf-alg": expect.prf, "dh-group": expect.dh}
    for key, value in want.items():
        if value is not None:
            assert got[key] == value, f"{what}: {key} {got[key]!r}, expected {value!r}"


def _ping_both_ways(lab: Lab, ns_a: str, ns_b: str, k: int, gw: OurProcess) -> None:
    _, host_a, _, host_b = _nets(k)
    for ns, src, dst in ((ns_a, host_a, host_b), (ns_b, host_b, host_a)):
        res = traffic.ping(ns, dst, src=src, count=2, interval=0.05)
        assert res.ok, f"ping {src} -> {dst}: {res.output}\n{gw.log_text()[-3000:]}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_proposal_handshake_and_ping_both_ways(lab: Lab, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    ns_a, ns_b, _veth = lab.pair()
    charon_kids, our_kids = [], []
    for k, kid in enumerate(case.kids):
        net_a, host_a, net_b, host_b = _nets(k)
        lab.add_lo_addr(ns_a, host_a)
        lab.add_lo_addr(ns_b, host_b)
        charon_kids.append(Child(f"c{k}", net_a, net_b, esp_proposals=kid.esp))
        our_kids.append((f"c{k}", net_b, net_a, kid.esp))
    gw = OurProcess(lab, ns_b, gateway_toml(proposals=case.ike, children=our_kids), tmp_path)
    gw.wait_ready()
    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", charon_kids,
                                         proposals=case.ike)))
    for k in range(len(case.kids)):
        charon.initiate(child=f"c{k}", ike="a-b")
    ike = charon.ike_sa("a-b")
    assert ike is not None
    _check(ike, case.expect, f"IKE SA {case.ike}")
    kids = {c["name"]: c for c in charon.child_sas()}
    for k, kid in enumerate(case.kids):
        _check(kids[f"c{k}"], Expect(kid.expect.encr, kid.expect.keysize, kid.expect.integ),
               f"child {kid.esp}")
        _ping_both_ways(lab, ns_a, ns_b, k, gw)
    for k, kid in enumerate(case.kids):
        if kid.expect.dh is None:
            continue
        rekeyed = charon.rekey_child(f"c{k}")      # PFS: a KE payload in CREATE_CHILD_SA
        _check(rekeyed, kid.expect, f"rekeyed child {kid.esp}")
        _ping_both_ways(lab, ns_a, ns_b, k, gw)
    new_ike = charon.rekey_ike("a-b")
    _check(new_ike, case.expect, f"rekeyed IKE SA {case.ike}")
    charon.rekey_child("c0")          # keys from the new IKE SA's SK_d
    _ping_both_ways(lab, ns_a, ns_b, 0, gw)
    assert gw.alive()


def test_our_initiator_with_default_against_charon_responder(lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, _veth = lab.pair()
    net_a, host_a, net_b, host_b = _nets(0)
    lab.add_lo_addr(ns_b, host_b)
    charon = lab.charon(ns_b, "charon-b")
    charon.load(render_swanctl_conf(Conn(
        "a-b", "198.18.0.1", "198.18.0.2", [Child("c0", net_a, net_b,
                                                  esp_proposals="aes256-sha512")],
        proposals="chacha20poly1305-prfsha512-ecp521").mirrored()))
    peer = OurProcess(lab, ns_a, gateway_toml(
        address="198.18.0.1", remote="198.18.0.2", inside="tun:ipsp0", inside_address=host_a,
        local_id="gw-a.test", remote_id="gw-b.test", start_action="start", proposals="default",
        children=[("c0", net_a, net_b, "default")]), tmp_path, command="peer", name="peer")
    charon.wait_for("the child up at the responder", lambda: len(charon.child_sas()) == 1,
                    timeout=15)
    ike = charon.ike_sa("a-b")
    assert ike is not None
    _check(ike, Expect("CHACHA20_POLY1305", None, None, "PRF_HMAC_SHA2_512", "ECP_521"),
           "IKE SA (we initiated)")
    _check(charon.child_sas()[0], Expect("AES_CBC", "256", "HMAC_SHA2_512_256"), "child")
    for ns, src, dst in ((ns_a, host_a, host_b), (ns_b, host_b, host_a)):
        res = traffic.ping(ns, dst, src=src, count=2, interval=0.05)
        assert res.ok, f"ping {src} -> {dst}: {res.output}\n{peer.log_text()[-3000:]}"
    assert "DH group CURVE_25519 unacceptable, requesting ECP_521" in charon.log_text()
    assert peer.alive()
