"""Two dispatcher hosts with strongSwan as the peer (issue #11, docs/failover.md
"Two dispatcher hosts"): the rig of tests/test_cluster_twohost.py (a bridge,
two dispatcher namespaces with keepalived moving the cluster's address
198.18.50.10, two member namespaces over tcp:// with CURVE) with charon in the
peer namespace as the initiator to the cluster's address, and the lab of
tests/test_dispatcher_failover_strongswan.py: IKE SAs ``a-b`` and ``c-d`` with
three children each (charon's DPD every second), 200 pings/s through every
child, the children carried by both members, a TUN inside on each dispatcher
host (the cluster's inner addresses on its ``lo``).

The active dispatcher host is stopped: its processes killed -9 and its link
taken down; right after it charon starts a third connection ``e-f`` (a new
IKE SA; its IKE_SA_INIT retransmitted every 0.1 s). Then:

- the standby is active at a higher term, with both members back;
- charon holds the same IKE SAs (same SPIs) and started no IKE_SA_INIT for
  them;
- nothing was sent twice: no (SPI, sequence number) and no (SPI, IV) pair
  twice in a capture of the cluster's ESP, and charon logged no failed
  sequence number check;
- every child passes traffic after the failover, and the new IKE SA came up;
- then a child rekey, an IKE rekey and DPD exchanges all succeed.

The timings (the gap on each child, the time to the new IKE SA, when the
standby was active and the members back) are printed here and measured in
bench/test_failover_bench.py part (f); they are not asserted.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.harness import configs
from bench.harness.control import ask
from tests.cluster_util import Procs, alive_members, cli_argv, wait_for, wait_status
from tests.failover_lab import CHILDREN, IDS, Setup, Streams, owners
from tests.interop_gw import PSK
from tests.lab.charon import Charon, CharonError, Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab
from tests.test_cluster_twohost import (
    DISP,
    PEER,
    SYNC_PORT,
    TIMING,
    VIP,
    Pair,
    _need_keepalived,
)
from tests.test_dispatcher_failover_strongswan import (
    NEW_IKE_TIMEOUT_S,
    RETRANSMIT_S,
    RETRANSMIT_TRIES,
    SPARE,
    SPARE_IDS,
    Killed,
    _initiations,
    all_children_pass,
    esp_rows,
    ike_spis,
    lab_toml,
    rekeys_and_dpd,
    replay_failures,
)

pytestmark = [pytest.mark.interop, pytest.mark.netns, pytest.mark.slow]

#: how long the pings run, and when the host is stopped (the pings go on well
#: past VRRP's takeover and the members' reattach)
STREAM_S = 10.0
KILL_AFTER_S = 2.0
#: how often the new active's status is asked while it takes over
POLL_S = 0.05


def cluster_text(extra: dict[str, Any]) -> str:
    """The one-host lab's cluster (connections a-b, c-d and e-f, a TUN
    inside) at the cluster's address, for a dispatcher host (``extra`` with
    ``members = 0``) or a member host."""
    data = tomllib.loads(lab_toml())
    data["cluster"].pop("members")
    data["cluster"].update({"address": VIP, **TIMING, **extra})
    return configs.dumps(data)


def charon_text() -> str:
    """charon's side of a-b, c-d and e-f, from the peer's address to the VIP."""
    conns = []
    for conn in ("a-b", "c-d"):
        kids = [Child(name, f"10.91.{k}.0/24", f"10.91.{k + 1}.0/24",
                      esp_proposals="aes128ctr-sha256" if k in (11, 41) else "aes128gcm16")
                for c, name, k in CHILDREN if c == conn]
        conns.append(Conn(conn, PEER, VIP, kids, local_id=IDS[conn][0],
                          remote_id=IDS[conn][1], psk=PSK, dpd_delay="1s"))
    name, child, k = SPARE
    conns.append(Conn(name, PEER, VIP, [Child(child, f"10.91.{k}.0/24", f"10.91.{k + 1}.0/24")],
                      local_id=SPARE_IDS[0], remote_id=SPARE_IDS[1], psk=PSK, dpd_delay="1s"))
    return render_swanctl_conf(*conns)


class SwanPair(Pair):
    """tests/test_cluster_twohost.py's rig with the strongSwan lab's cluster
    config (ports 500/4500, a TUN inside on each dispatcher host)."""

    def _dispatcher_config(self, side: str) -> Path:
        path = self.tmp / f"dispatcher-{side}.toml"
        path.write_text(cluster_text({
            "sync": f"tcp://0.0.0.0:{SYNC_PORT}", "members": 0, "expect_members": 2,
            "curve_secret_key": f"keys/dispatcher-{side}.key_secret",
            "curve_authorized": "authorized", "role": "standby",
            "control": str(self.tmp / f"run-{side}")}))
        return path

    def start_member(self, m: int) -> None:
        path = self.tmp / f"member{m}.toml"
        path.write_text(cluster_text({
            "sync": f"tcp://0.0.0.0:{SYNC_PORT}",
            "curve_secret_key": f"keys/member{m}.key_secret",
            "curve_server_key": "keys/dispatcher-a.key",
            "sync_standby": f"tcp://{DISP['b']}:{SYNC_PORT}",
            "curve_server_key_standby": "keys/dispatcher-b.key"}))
        self.members[m] = self.procs.start(f"member{m}", cli_argv(
            "member", "--config", str(path), "--id", str(m),
            "--connect", f"tcp://{DISP['a']}:{SYNC_PORT}"), ns=self.ns[f"host{m}"])

    def diag(self) -> str:
        out = super().diag()
        log = self.tmp / "charon" / "charon.log"
        if log.exists():
            out += "\n--- charon\n" + "\n".join(log.read_text().splitlines()[-60:])
        return out


@dataclass
class Takeover:
    """When the standby's status first showed it active, and both members
    alive (unix times), polled every POLL_S."""

    config: Path
    active_at: float | None = None
    term: int | None = None
    reattached_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set() and self.reattached_at is None:
            try:
                st = ask(self.config, "status", timeout=1.0)
            except Exception:   # (the standby busy activating: ask again)
                st = None
            now = time.time()
            if st is not None and st["dispatcher"]["role"] == "active":
                if self.active_at is None:
                    self.active_at, self.term = now, st["dispatcher"]["term"]
                if len(alive_members(st)) == 2:
                    self.reattached_at = now
            time.sleep(POLL_S)


@dataclass
class HostStopped:
    """What one stop of the active dispatcher host did."""

    pair: SwanPair
    killed: Killed
    term_before: int
    takeover: Takeover
    ids_before: dict[int, tuple[int, int]]
    after: dict[str, Any]


def start(lab: Lab, tmp: Path) -> tuple[SwanPair, Charon, int]:
    """Both dispatcher hosts (a active), both members, charon's IKE SAs a-b and
    c-d with their children; disp-a's term."""
    keepalived = _need_keepalived()
    pair = SwanPair(lab, tmp, Procs(tmp), keepalived)
    try:
        ns_peer = pair.ns["peer"]
        for _c, _n, k in [*CHILDREN, SPARE]:
            lab.add_lo_addr(ns_peer, f"10.91.{k}.1")
            if k + 1 != 2:
                for side in ("a", "b"):
                    lab.add_lo_addr(pair.ns[side], f"10.91.{k + 1}.1")
        pair.start_dispatcher("a")
        wait_status(pair.config["a"], "disp-a active (VRRP master)",
                    lambda s: s["dispatcher"]["role"] == "active", timeout=15, diag=pair.diag)
        pair.start_dispatcher("b")
        time.sleep(1.0)
        assert pair.status("b")["dispatcher"]["role"] == "standby", pair.diag()
        for m in (1, 2):
            pair.start_member(m)
        wait_status(pair.config["a"], "2 members with segments at disp-a",
                    lambda s: len(alive_members(s)) == 2
                    and all(m["segments"] and m["backup_segments"] for m in s["members"]),
                    timeout=30, diag=pair.diag)
        charon = lab.charon(ns_peer, "charon", charon_options={"uniqueids": "no"},
                            retransmit_timeout=RETRANSMIT_S, retransmit_base=1.0,
                            retransmit_tries=RETRANSMIT_TRIES)
        charon.load(charon_text())
        for c, name, _k in CHILDREN:
            charon.initiate(child=name, ike=c)
        wait_for("children replicated", lambda: all(
            not m["replication"].get("degraded") for m in pair.status("a")["members"]),
            timeout=10, diag=pair.diag)
        return pair, charon, pair.status("a")["dispatcher"]["term"]
    except BaseException:
        pair.close()
        raise


def stop_the_active_host(lab: Lab, tmp: Path) -> HostStopped:
    """Set the rig up, stop disp-a's host (kill -9 of its processes, its link
    down) under 200 pings/s per child, start e-f right after, and collect
    what happened. The caller closes ``.pair``."""
    pair, charon, term_a = start(lab, tmp)
    try:
        ns_peer = pair.ns["peer"]
        ike_owner, carriers = owners(pair.config["a"])
        assert len(ike_owner) == 2 and len(carriers) == 6, (ike_owner, carriers)
        before = pair.status("a")
        ids = {m["id"]: (m["pid"], m["sender_id"]) for m in before["members"]}
        spis_before = ike_spis(charon)
        inits_before = _initiations(charon, ("a-b", "c-d"))
        pcap = tmp / "esp.pcap"
        dump = lab.popen(ns_peer, ["tcpdump", "-i", pair.dev["peer"], "-n", "-U", "-s", "96",
                                   "-w", str(pcap), "udp port 4500"],
                         stdout=open(os.devnull, "w"), stderr=open(tmp / "tcpdump.err", "w"))
        time.sleep(0.5)
        streams = Streams(lab, ns_peer, tmp, seconds=STREAM_S)
        time.sleep(KILL_AFTER_S)
        takeover = Takeover(pair.config["b"])
        poller = threading.Thread(target=takeover.run, daemon=True)
        new_ike: dict[str, Any] = {}

        def initiate() -> None:
            try:
                charon.initiate(child=SPARE[1], ike=SPARE[0], timeout=NEW_IKE_TIMEOUT_S)
                new_ike["up"] = time.time()
            except CharonError as exc:
                new_ike["error"] = str(exc)

        killed_at = time.time()
        for proc in (pair.disp["a"], pair.ka["a"]):
            proc.signal_group(signal.SIGKILL)
        starter = threading.Thread(target=initiate)
        starter.start()
        poller.start()
        # (after the threads: taking a veth down can take a second here)
        lab.run(pair.ns["a"], ["ip", "link", "set", pair.dev["a"], "down"])
        streams.wait(timeout=STREAM_S + 20)
        starter.join(NEW_IKE_TIMEOUT_S + 10)
        takeover.stop.set()
        poller.join(5)
        time.sleep(0.3)
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=5)
        after = pair.status("b")
        # (Killed's setup: the peer's side; no single cluster process here)
        setup = Setup(ns_peer, pair.ns["b"], charon, None, pair.config["b"])  # type: ignore[arg-type]
        killed = Killed(
            setup=setup, killed_at=killed_at, before=before, after=after,
            spis_before=spis_before, spis_after=ike_spis(charon), inits_before=inits_before,
            inits_after=_initiations(charon, ("a-b", "c-d")), carriers=carriers,
            replies=streams.replies(), esp=esp_rows(pcap, VIP),
            new_ike_s=None if "up" not in new_ike else new_ike["up"] - killed_at,
            new_ike_error=new_ike.get("error", ""), replay_failures=replay_failures(charon))
        return HostStopped(pair, killed, term_a, takeover, ids, after)
    except BaseException:
        pair.close()
        raise


def test_the_active_host_stopped_with_strongswan(lab: Lab, tmp_path: Path) -> None:
    h = stop_the_active_host(lab, tmp_path)
    pair, k = h.pair, h.killed
    charon = k.setup.charon
    try:
        diag = pair.diag()
        # the children were carried by both members
        assert len(set(k.carriers.values())) >= 2, k.carriers
        # the standby is active at a higher term, with the same members
        st = wait_status(pair.config["b"], "disp-b active with both members",
                         lambda s: s["dispatcher"]["role"] == "active"
                         and len(alive_members(s)) == 2, timeout=10, diag=pair.diag)
        assert st["dispatcher"]["term"] > h.term_before, (h.term_before, st["dispatcher"])
        assert {m["id"]: (m["pid"], m["sender_id"]) for m in st["members"]} == h.ids_before
        # the same IKE SAs at charon, no new IKE_SA_INIT for them
        assert {n: v for n, v in k.spis_after.items() if n != SPARE[0]} == k.spis_before, diag
        assert k.inits_after == k.inits_before, diag
        # nothing sent twice, nothing refused as a replay by charon
        assert k.esp, "no ESP captured"
        assert k.seq_repeats() == 0 and k.iv_repeats() == 0
        assert k.replay_failures == 0, diag
        # every child answered after the failover; the new IKE SA came up
        children = k.children()
        t = h.takeover
        print(f"\ntwo hosts, strongSwan: per child (gap ms, lost, carrier): "
              f"{ {n: (round(c['gap_ms']), c['lost'], c['carrier']) for n, c in children.items()} }"
              f"; new IKE SA up after {k.new_ike_s} s; standby active after "
              f"{None if t.active_at is None else round(t.active_at - k.killed_at, 2)} s, "
              f"members back after "
              f"{None if t.reattached_at is None else round(t.reattached_at - k.killed_at, 2)} s"
              f"; term {h.term_before} -> {st['dispatcher']['term']}")
        for name, c in children.items():
            assert c["last_reply_after_kill_s"] is not None \
                and c["last_reply_after_kill_s"] > STREAM_S - KILL_AFTER_S - 3, (name, children)
        assert k.new_ike_s is not None, k.new_ike_error + pair.diag()
        assert charon.ike_sa(SPARE[0]) is not None
        all_children_pass(k.setup.ns_a)
        # then rekeys and DPD, through the new active
        rekeys_and_dpd(k.setup, k.spis_before)
        assert "Traceback" not in (tmp_path / "dispatcher-b.log").read_text()
    finally:
        pair.close()
