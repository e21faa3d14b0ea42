"""strongSwan (charon 5.9, libipsec) against a 3-member cluster in network
namespaces: charon initiates from 198.18.0.1 (ns a); the cluster answers at
198.18.0.2 (ns b): a dispatcher with a TUN inside and 3 member processes. One
IKE SA with three children (GCM, CTR, GCM), placed by the IKE SA's owner on
different members; ping through every child both ways; child and IKE rekeys
initiated by charon keep the traffic flowing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from common.cluster.events import EventType
from tests.cluster_util import (
    DEAD_AFTER,
    esp_sas,
    event_is,
    sas,
    spi_of,
    status,
    wait_assigned,
    wait_for,
)
from tests.interop_gw import OurProcess, gateway_toml
from tests.lab import traffic
from tests.lab.charon import Charon, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

pytestmark = pytest.mark.interop

CHILDREN = (Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16"),
            Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24",
                  esp_proposals="aes128ctr-sha256"),
            Child("net-gcm2", "10.91.21.0/24", "10.91.22.0/24", esp_proposals="aes256gcm16"))
# (charon's host, the cluster side's host) per child
PAIRS = (("10.91.1.1", "10.91.2.1"), ("10.91.11.1", "10.91.12.1"),
         ("10.91.21.1", "10.91.22.1"))
N_MEMBERS = 3


def _setup(lab: Lab, tmp_path: Path) -> tuple[str, str, Charon, OurProcess, Path]:
    ns_a, ns_b, _veth = lab.pair()
    for host, _ in PAIRS:
        lab.add_lo_addr(ns_a, host)
    for _, host in PAIRS[1:]:         # 10.91.2.1 is the TUN's own address
        lab.add_lo_addr(ns_b, host)
    children = [(c.name, c.remote_ts, c.local_ts, c.esp_proposals) for c in CHILDREN]
    extra = f"members = {N_MEMBERS}\ndead_after = {DEAD_AFTER}"
    gw = OurProcess(lab, ns_b, gateway_toml(children=children, extra=extra), tmp_path)
    wait_assigned(gw, N_MEMBERS, timeout=15)
    config = gw.config
    wait_for("3 members alive", lambda: sum(
        m["alive"] and m["segments"] > 0 for m in status(config)["members"]) == N_MEMBERS,
        timeout=15, diag=lambda: gw.log_text()[-3000:])
    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", list(CHILDREN))))
    return ns_a, ns_b, charon, gw, config


def _pings(ns_a: str, ns_b: str, gw: OurProcess) -> None:
    for a, b in PAIRS:
        for ns, src, dst in ((ns_a, a, b), (ns_b, b, a)):
            res = traffic.ping(ns, dst, src=src, count=3, interval=0.05)
            assert res.ok, f"ping {src} -> {dst}: {res.output}\n{gw.log_text()[-4000:]}"


def _children(config: Path) -> dict[str, dict[str, Any]]:
    """The cluster's installed ESP SAs by name (the newest per name)."""
    answer = sas(config)
    live = {c["spi_in"] for m in answer["members"] for s in m["ike_sas"]
            if s["state"] == "ESTABLISHED" for c in s["children"] if c["state"] == "INSTALLED"}
    return {e["name"]: e for e in esp_sas(answer) if e["spi_in"] in live}


def _all_children(config: Path) -> dict[str, dict[str, Any]] | None:
    children = _children(config)
    return children if len(children) == len(CHILDREN) else None


def _wait_installed(config: Path, name: str, charon_child: dict[str, Any],
                    gw: OurProcess) -> None:
    """The cluster carries the child SA pair charon just installed."""
    spi_in, spi_out = charon_child["spi-out"], charon_child["spi-in"]
    wait_for(f"{name} {spi_in}_i installed at the cluster", lambda: (
        (c := _children(config).get(name)) is not None
        and (int(c["spi_in"], 16), int(c["spi_out"], 16)) == (int(spi_in, 16), int(spi_out, 16))),
        timeout=5, diag=lambda: gw.log_text()[-3000:])


def test_three_children_on_different_members_with_rekeys(lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, charon, gw, config = _setup(lab, tmp_path)
    for child in CHILDREN:
        charon.initiate(child=child.name, ike="a-b")
    kids = {c["name"]: c for c in charon.child_sas()}
    assert set(kids) == {c.name for c in CHILDREN}
    assert kids["net-ctr"]["encr-alg"] == "AES_CTR"

    ours = wait_for("3 children at the cluster", lambda: _all_children(config), timeout=5)
    # charon's inbound SPI is our outbound one and vice versa
    assert {n: int(c["spi_out"], 16) for n, c in ours.items()} == {
        n: int(k["spi-in"], 16) for n, k in kids.items()}
    members = Counter(c["member"] for c in ours.values())
    assert len(members) >= 2, f"children all on one member: {members}"
    _pings(ns_a, ns_b, gw)
    carried = {n: c for n, c in _children(config).items()}
    assert all(c["packets_in"] >= 3 and c["packets_out"] >= 3 for c in carried.values()), carried

    # child rekeys initiated by charon: the new SAs are placed and carry traffic
    for name in (c.name for c in CHILDREN):
        new = charon.rekey_child(name)
        assert new["spi-in"] != kids[name]["spi-in"]
        _wait_installed(config, name, new, gw)
    _pings(ns_a, ns_b, gw)
    after = _children(config)
    assert len(after) == 3
    assert not {c["spi_in"] for c in after.values()} & {c["spi_in"] for c in ours.values()}

    # IKE rekey initiated by charon; then the children still pass and rekey
    old = charon.ike_sa("a-b")
    since = gw.mark()
    new_ike = charon.rekey_ike("a-b")
    assert old is not None and new_ike["initiator-spi"] != old["initiator-spi"]
    gw.wait_event(event_is(EventType.IKE_REKEYED, conn="a-b",
                           ike_spi=spi_of(old["responder-spi"]),
                           new_spi=spi_of(new_ike["responder-spi"])), since=since,
                  what="IKE_REKEYED")
    _pings(ns_a, ns_b, gw)
    _wait_installed(config, "net-ctr", charon.rekey_child("net-ctr"), gw)
    _pings(ns_a, ns_b, gw)

    st = status(config)
    assert [m["alive"] for m in st["members"]] == [True] * N_MEMBERS
    # nobody died or restarted
    assert st["dispatcher"]["counters"].get("members_died", 0) == 0
    assert all(m["alive"] for m in st["members"])
    assert sum(m["child_sas"] for m in st["members"]) >= 3
    # With a TUN inside, members give decrypted packets to the kernel themselves
    # (member/rawinside.py): the dispatcher handled each inbound packet once.
    assert sum(m["packets_in"] for m in st["members"]) > 0
    assert st["dispatcher"]["counters"].get("inner_out", 0) == 0, st["dispatcher"]
    assert gw.alive() and charon.ike_sa("a-b") is not None
