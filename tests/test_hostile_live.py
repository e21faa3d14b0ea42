"""The crash barrier against a live cluster: strongSwan (namespace a) keeps
two IKE SAs with six children through a 3-member cluster (namespace b) and
pings through every child, while a second address of namespace a sends the
32-byte IKE_SA_INIT whose only payload is SK (it once raised out of the IKE
engine and ended the member that received it) at 100 datagrams/s for 30 s,
to the cluster's ports 500 and 4500, with a fresh initiator SPI each time
so that every member gets its share.

Done when: every member process keeps its pid, charon keeps the same IKE SAs
and children (same SPIs, no new IKE_SA_INIT), the pings are still answered,
and each datagram is counted in ``status`` (a refusal, or once the engine
drops it itself, an IKE drop), per member."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_util import socket_in_netns
from tests.failover_lab import CHILDREN, Streams, owners, setup, status
from tests.lab import traffic
from tests.lab.netns import Lab

pytestmark = [pytest.mark.interop, pytest.mark.slow]

CLUSTER = "198.18.0.2"
ATTACKER = "198.18.0.3"
#: IKE_SA_INIT (exchange 34, flags 0x08: initiator), message ID 0, length 32,
#: first payload SK (46) with an empty body and nothing else (RFC 7296 §3.1,
#: §3.14): the initiator SPI is filled in
ATTACK_TAIL = bytes.fromhex("0000000000000000" "2e202208" "00000000" "00000020" "00000004")
RATE_PER_S = 100
ATTACK_S = 30.0
PING_INTERVAL_S = 0.02
#: replies a child may miss over the whole run (the box is shared and slow)
MAX_LOSS = 0.10


def attack_datagram(n: int) -> bytes:
    data = n.to_bytes(8, "big") + ATTACK_TAIL
    assert len(data) == 32
    return data


def _charon_sas(charon: Any) -> dict[str, tuple[str, str, frozenset[tuple[str, str]]]]:
    """IKE SA name -> (SPIi, SPIr, its installed children's (spi-in, spi-out))."""
    out = {}
    for s in charon.list_sas():
        if s["state"] != "ESTABLISHED":
            continue
        kids = frozenset((c["spi-in"], c["spi-out"]) for c in s["child-sas"]
                         if c["state"] == "INSTALLED")
        out[s["name"]] = (s["initiator-spi"], s["responder-spi"], kids)
    return out


def _counted(member: dict[str, Any]) -> int:
    """What the attack can show as in a member's status: refusals (a failure
    of the engine caught by the barrier) or the engine's own IKE drops."""
    return sum(member.get("refused", {}).values()) + sum(
        v for k, v in member["drops"].items() if k.startswith("ike_"))


def _attacker_address(lab: Lab, ns: str) -> None:
    """A second address on namespace a's veth (same subnet: no route needed)."""
    out = lab.run(ns, ["ip", "-o", "-4", "addr", "show"]).stdout
    dev = next(line.split()[1] for line in out.splitlines() if " 198.18.0.1/" in line)
    lab.run(ns, ["ip", "addr", "add", f"{ATTACKER}/24", "dev", dev])


def _flood(ns: str, stop: threading.Event, sent: list[int]) -> None:
    sock = socket_in_netns(ns)
    sock.bind((ATTACKER, 0))
    n = 0
    start = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() - start < ATTACK_S:
            spi = int.from_bytes(os.urandom(8), "big") | 1
            data = attack_datagram(spi)
            if n % 2:
                sock.sendto(bytes(4) + data, (CLUSTER, 4500))   # RFC 3948 non-ESP marker
            else:
                sock.sendto(data, (CLUSTER, 500))
            n += 1
            delay = start + n / RATE_PER_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        sent.append(n)
        sock.close()


def test_members_survive_the_32_byte_ike_datagram_flood(lab: Lab, tmp_path: Path) -> None:
    s = setup(lab, tmp_path)
    ike_owner, child_owner = owners(s.config)
    assert len(ike_owner) == 2 and len(child_owner) == 6, (ike_owner, child_owner)
    before_status = status(s.config)
    pids = {m["id"]: m["pid"] for m in before_status["members"]}
    assert len(pids) == 3 and all(m["alive"] for m in before_status["members"])
    counted_before = {m["id"]: _counted(m) for m in before_status["members"]}
    sas_before = _charon_sas(s.charon)
    assert set(sas_before) == {"a-b", "c-d"}
    inits_before = s.charon.log_text().count("initiating IKE_SA")

    _attacker_address(lab, s.ns_a)
    streams = Streams(lab, s.ns_a, tmp_path, seconds=ATTACK_S + 2, interval=PING_INTERVAL_S)
    stop, sent = threading.Event(), []   # type: ignore[var-annotated]
    flood = threading.Thread(target=_flood, args=(s.ns_a, stop, sent), daemon=True)
    time.sleep(1.0)
    flood.start()
    try:
        flood.join(timeout=ATTACK_S + 20)
    finally:
        stop.set()
    streams.wait(timeout=30)
    assert sent and sent[0] >= 0.9 * RATE_PER_S * ATTACK_S, sent

    after = status(s.config)
    replies = {name: len(rows) for name, rows in streams.replies().items()}
    (tmp_path / "flood.txt").write_text(repr({
        "sent": sent[0], "replies": replies,
        "refused": {m["id"]: m.get("refused", {}) for m in after["members"]},
        "dispatcher": after["dispatcher"]}))
    # Every member process is the one from before the flood.
    assert {m["id"]: m["pid"] for m in after["members"]} == pids, after["members"]
    assert all(m["alive"] for m in after["members"]), after["members"]
    for pid in pids.values():
        os.kill(pid, 0)
    assert s.cluster.alive()
    # strongSwan kept its IKE SAs and children: same SPIs, no new IKE_SA_INIT.
    assert _charon_sas(s.charon) == sas_before
    assert s.charon.log_text().count("initiating IKE_SA") == inits_before
    # The pings were answered throughout, and still are.
    count = int((ATTACK_S + 2) / PING_INTERVAL_S)
    for name, rows in streams.replies().items():
        assert len(rows) >= (1 - MAX_LOSS) * count, f"child {name}: {len(rows)} of {count}"
    for _c, name, k in CHILDREN:
        res = traffic.ping(s.ns_a, f"10.91.{k + 1}.1", src=f"10.91.{k}.1", count=3,
                           interval=0.05)
        assert res.ok, f"child {name}: {res.output}"
    # Each member counted its share of the flood (a refusal or an IKE drop).
    moved = {m["id"]: _counted(m) - counted_before[m["id"]] for m in after["members"]}
    assert all(n > 0 for n in moved.values()), moved
    assert sum(moved.values()) >= 0.5 * sent[0], (moved, sent)
    # ... without a traceback per datagram in the log.
    assert s.cluster.log_text().count("Traceback") <= 3 * len(pids)
