"""Virtual IPs with real road warriors: two charons (``vips = 0.0.0.0``) in
their own namespaces ask our gateway for an address (RFC 7296 §3.15), get
different ones from one pool, and ping the inside through them; against a
3-member cluster they keep their addresses across a ``kill -9`` of the member
that owns their IKE SAs.

    rw1 (198.18.0.1) --veth-- gateway (198.18.0.2, 198.18.1.2) --veth-- rw2 (198.18.1.1)
                                  inside: TUN, 10.91.2.1
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bench.harness import configs
from common.cluster.events import EventType
from tests.cluster_util import event_is
from tests.failover_lab import sas, status, wait_assigned
from tests.interop_gw import PSK, OurProcess
from tests.lab import traffic
from tests.lab.charon import Charon, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

pytestmark = pytest.mark.interop

POOL = "10.3.0.0/16"
INSIDE = "10.91.2.1"


def _toml(members: int = 0) -> str:
    cluster = {"members": members, "mode": "load-sharing",
               "replay_after_failover": "rekey"} if members else {}
    conn = configs.Conn("rw", "gw-b.test", "%any",
                        (configs.Child("net", "10.91.2.0/24", POOL, "aes128gcm16"),),
                        options={"dpd_delay": 0, "pools": ["rw"]})
    return configs.dumps(configs.gateway_config(
        {"address": configs.LAB_GATEWAY, "inside": "tun:ipsc0", "inside_address": INSIDE,
         "log_level": "info", **cluster},
        [conn], psk=PSK, start_action=None,
        pools={"rw": {"addrs": POOL, "dns": ["10.91.2.53"]}}))


def _road_warrior(lab: Lab, ns: str, name: str, local: str) -> Charon:
    charon = lab.charon(ns, name)
    conn = Conn("rw", local, "198.18.0.2",
                [Child("net", "dynamic", "10.91.2.0/24")],
                local_id=f"{name}.test", remote_id="gw-b.test", psk=PSK, dpd_delay="1s",
                extra={"vips": "0.0.0.0"})
    charon.load(render_swanctl_conf(conn))
    charon.initiate(child="net", ike="rw")
    return charon


def _vip(charon: Charon) -> str:
    ike = charon.ike_sa("rw")
    assert ike is not None, charon.log_tail()
    vips = ike.get("local-vips") or []
    assert len(vips) == 1, ike
    return str(vips[0])


def _lab(lab: Lab, tmp_path: Path, members: int) -> tuple[str, str, str, OurProcess]:
    ns1, gw_ns, _v = lab.pair("198.18.0.1/24", "198.18.0.2/24")
    ns2 = lab.netns()
    lab.veth(ns2, gw_ns, "198.18.1.1/24", "198.18.1.2/24")
    lab.add_route(ns2, "198.18.0.0/24", via="198.18.1.2")
    gw = OurProcess(lab, gw_ns, _toml(members), tmp_path, name="gw")
    if members:
        wait_assigned(gw, members, timeout=30)
    else:
        gw.wait_ready(timeout=30)
    return ns1, ns2, gw_ns, gw


def _ping(ns: str, vip: str, gw: OurProcess) -> None:
    res = traffic.ping(ns, INSIDE, src=vip, count=3, interval=0.05)
    assert res.ok, f"ping {vip} -> {INSIDE}: {res.output}\n{gw.log_text()[-3000:]}"


def _pools(config: Path) -> dict[str, Any]:
    st = status(config)
    return {p["name"]: p for p in st.get("pools", [])}


def _leases(config: Path) -> list[str]:
    """Every address the members' IKE SAs hold (``ipsec-cluster sas``)."""
    return sorted(a for m in sas(config)["members"] for sa in m.get("ike_sas", [])
                  for a in sa.get("virtual_ips", []))


def test_two_road_warriors_get_different_addresses_and_ping(lab: Lab,
                                                           tmp_path: Path) -> None:
    ns1, ns2, gw_ns, gw = _lab(lab, tmp_path, 0)
    rw1 = _road_warrior(lab, ns1, "rw1", "198.18.0.1")
    rw2 = _road_warrior(lab, ns2, "rw2", "198.18.1.1")
    vip1, vip2 = _vip(rw1), _vip(rw2)
    assert vip1 != vip2 and vip1.startswith("10.3.") and vip2.startswith("10.3.")
    (child1,) = rw1.child_sas()
    assert child1["local-ts"] == [f"{vip1}/32"]
    _ping(ns1, vip1, gw)
    _ping(ns2, vip2, gw)
    # the inside answers from behind the gateway, to each road warrior's address
    res = traffic.ping(gw_ns, vip2, src=INSIDE, count=2, interval=0.05)
    assert res.ok, res.output
    held = {sa["remote_id"]: sa.get("virtual_ips") for m in sas(gw.config)["members"]
            for sa in m.get("ike_sas", [])}
    assert held == {"rw1.test": [vip1], "rw2.test": [vip2]}, held
    # deleting the IKE SA returns the address
    since = gw.mark()
    rw1.terminate_ike("rw")
    released = gw.wait_event(event_is(EventType.LEASE_RELEASED, address=vip1), since=since,
                             what=f"LEASE_RELEASED of {vip1}")
    assert released.conn == "rw", released
    assert not [e for e in gw.events() if e.type is EventType.LEASE_RELEASED
                and e.address == vip2]


@pytest.mark.slow
def test_road_warriors_keep_their_addresses_across_a_member_kill(lab: Lab,
                                                                tmp_path: Path) -> None:
    ns1, ns2, _gw_ns, gw = _lab(lab, tmp_path, 3)
    rw1 = _road_warrior(lab, ns1, "rw1", "198.18.0.1")
    rw2 = _road_warrior(lab, ns2, "rw2", "198.18.1.1")
    vip1, vip2 = _vip(rw1), _vip(rw2)
    assert vip1 != vip2
    _ping(ns1, vip1, gw)
    _ping(ns2, vip2, gw)
    owner = {sa["remote_id"]: m["member"] for m in sas(gw.config)["members"]
             for sa in m.get("ike_sas", []) if sa["state"] == "ESTABLISHED"}
    victim = owner["rw1.test"]
    spis = {c.ike_sa("rw")["responder-spi"] for c in (rw1, rw2)}  # type: ignore[index]
    pid = next(m["pid"] for m in status(gw.config)["members"] if m["id"] == victim)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if traffic.ping(ns1, INSIDE, src=vip1, count=1, interval=0.05).ok:
            break
        time.sleep(0.5)
    _ping(ns1, vip1, gw)
    _ping(ns2, vip2, gw)
    # the same IKE SAs, the same addresses; the new owner holds the lease
    assert {c.ike_sa("rw")["responder-spi"] for c in (rw1, rw2)} == spis  # type: ignore[index]
    assert (_vip(rw1), _vip(rw2)) == (vip1, vip2)
    held = {sa["remote_id"]: sa.get("virtual_ips") for m in sas(gw.config)["members"]
            for sa in m.get("ike_sas", []) if sa["state"] == "ESTABLISHED"}
    assert held.get("rw1.test") == [vip1], held
    # the new owner counts the lease it took over
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pools(gw.config)["rw"]["leased"] != 2:
        time.sleep(0.2)
    pool = _pools(gw.config)["rw"]
    # (the supervisor restarts the killed member, which may take its segments
    # back: whoever holds rw1's IKE SA now counts its lease)
    holder = {sa["remote_id"]: m["member"] for m in sas(gw.config)["members"]
              for sa in m.get("ike_sas", []) if sa["state"] == "ESTABLISHED"}
    counts = {int(k): v for k, v in pool["by_member"].items()}
    assert counts[holder["rw1.test"]] >= 1 and counts[holder["rw2.test"]] >= 1, (pool, holder)
    assert pool["leased"] == 2, pool
    assert _leases(gw.config) == sorted([vip1, vip2])
