"""Scale: 10,000 IKE SAs synced to a backup and failed over; all alive
(RFC 6027 §3.2 "a lot of long-lived state", §3.3 IKE counters).

In process, no sockets: a peer ``IkeEngine`` (tests/ike_pair.py) brings up
10,000 IKE SAs (X25519, each with one child, every other one with a second
child through CREATE_CHILD_SA) with member 1 of a two-member cluster. The
members are the real ``member.worker.Member`` + ``member.replication.Replicator``
pair a member process runs; ``ScaleCluster`` plays the dispatcher's part
(the SYNC / CHILD_PUSH relay, in order, like the one ZeroMQ socket per member)
and the part of ``MemberProcess.flush`` that feeds the replicator. Every IKE
change is replicated through the real codec (snapshot -> encode_sync ->
decode_sync) and ACKed before its datagrams reach the peer.

Then member 1 "dies" (nothing of it is used again), the table fails over
(``SegmentTable.fail_over``) and member 2 takes over in ``Replicator.on_table``
(``IkeEngine.adopt`` for each IKE SA, ``Member.install_replica`` for each
child). Every one of the 10,000 IKE SAs answers a DPD from the peer with the
right message IDs, member 2 runs DPDs of its own on every 10th (its message
ID counter goes on from the replica's), and a sample rekeys children and IKE
SAs both ways. The replay policy ``rekey`` (every child the dead member
carried rekeyed by the new carrier) is checked on 100 IKE SAs.

Run time: 21-30 s of CPU for the 10,000 (49-88 s wall on a shared 2-vCPU
VM): marked ``slow``; ``SCALE_SAS=1000`` for a quick run.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

import pytest

from bench.harness import configs
from common.cluster.segments import SegmentTable
from common.cluster.spi import segment_of_esp_spi
from common.cluster.wire import ChildDelete, ChildPush, RouteAdd, RouteDel, Sync
from common.config import load_config
from common.ike.context import IkeState, Outgoing
from common.ike.engine import IkeEngine
from common.ike.events import ChildSaInstalled, DpdSucceeded, IkeSaRekeyed
from common.ike.sa import IkeSa
from common.rand import deterministic_random
from member.replication import Replicator
from member.worker import Member
from tests.ike_pair import child, engine, policy

PSK = "scale-test-psk-0123456789abcdef"
CLUSTER_PORT = 4500
#: IKE SAs per peer engine (remote-access clients are many peers; it also
#: keeps each peer engine small).
PER_PEER = 500

#: connection ``c`` as the cluster sees it (the peer engines mirror it)
CONN = configs.Conn("c", "gw.test", "peer.test", (
    configs.Child("net", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),
    configs.Child("ctr", "10.91.12.0/24", "10.91.11.0/24", "aes128ctr-sha256")),
    proposals="aes128gcm16-prfsha256-x25519", options={"dpd_delay": 0})


def cluster_toml(replay_policy: str) -> str:
    cluster = {"address": "198.18.0.2", "inside": "udp:127.0.0.1:9", "members": 2,
               "log_level": "warning", "replay_after_failover": replay_policy}
    return configs.dumps(configs.gateway_config(cluster, [CONN], psk=PSK, start_action=None))


def peer_engine(seed: int) -> IkeEngine:
    children = [child("net", "10.91.1.0/24", "10.91.2.0/24", "aes128gcm16"),
                child("ctr", "10.91.11.0/24", "10.91.12.0/24", "aes128ctr-sha256")]
    p = policy("c", "peer.test", "gw.test", PSK.encode(), children,
               ike="aes128gcm16-prfsha256-x25519", dpd_delay=0.0)
    return engine([p], seed, 1)


@dataclass
class Node:
    member: Member
    rep: Replicator
    alive: bool = True


@dataclass
class ScaleCluster:
    """Two members and a peer, with time as data. ``pump`` moves everything
    (sync relay, IKE datagrams both ways) until all is quiet."""

    peers: dict[tuple[str, int], IkeEngine]
    nodes: dict[int, Node]
    table: SegmentTable
    now: float = 1.0
    #: (src, message) in flight through the "dispatcher", in order
    relay: deque[tuple[int, object]] = field(default_factory=deque)
    #: IKE datagrams the cluster sent to the peer (after their ACK)
    to_peer: list[Outgoing] = field(default_factory=list)
    sync_messages: int = 0
    sync_bytes: int = 0
    peers_used: int = 0

    @classmethod
    def build(cls, segment_bits: int = 8, replay_policy: str = "rekey") -> ScaleCluster:
        config = load_config(cluster_toml(replay_policy), "scale.toml")
        table = SegmentTable(segment_bits)
        table.assign([1, 2])
        c = cls({}, {}, table)
        for mid in (1, 2):
            owner_of_esp = c._owner_of_esp
            m = Member(config, member_id=mid, sender_id=mid,
                       segments=table.segments_of(mid), random=deterministic_random(100 + mid),
                       owner_of_esp=owner_of_esp)
            rep = Replicator(mid, m, c._sender(mid), c._releaser(mid),
                             seq_sync_packets=config.cluster.seq_sync_packets,
                             seq_sync_interval=config.cluster.seq_sync_interval,
                             replay_policy=config.cluster.replay_after_failover)
            c.nodes[mid] = Node(m, rep)
            rep.on_table(None, table.copy(), c.now)
        return c

    # -- the dispatcher's part ------------------------------------------------------

    def _owner_of_esp(self, spi: int) -> int:
        owner = self.table.owner(segment_of_esp_spi(spi, self.table.segment_bits))
        assert owner is not None
        return owner

    def _sender(self, mid: int):  # type: ignore[no-untyped-def]
        def send(msg: Sync) -> None:
            self.sync_messages += 1
            self.sync_bytes += len(msg.payload)
            self.relay.append((mid, msg))
        return send

    def _releaser(self, mid: int):  # type: ignore[no-untyped-def]
        def release(outs: list[Outgoing]) -> None:
            if self.nodes[mid].alive:
                self.to_peer.extend(outs)
        return release

    def _relay_one(self, src: int, msg: object) -> None:
        if isinstance(msg, Sync):
            dst = self.nodes.get(msg.dst)
            if dst is not None and dst.alive:
                dst.rep.on_sync(msg, self.now)
                self._flush(msg.dst)
        elif isinstance(msg, ChildPush | ChildDelete):
            # dispatcher/cluster.py _relay: owner and backup of the child's segment
            seg = segment_of_esp_spi(msg.spi_in, self.table.segment_bits)
            for t in {self.table.owner(seg), self.table.backup(seg)} - {None, src}:
                node = self.nodes[t]  # type: ignore[index]
                if not node.alive:
                    continue
                if isinstance(msg, ChildPush):
                    if self.table.owner(seg) == t:
                        if msg.spi_in not in node.member.by_spi:
                            node.member.install_pushed(msg)
                    else:
                        node.rep.push_replica(msg)
                else:
                    node.member.remove_pushed(msg.spi_in)
                    node.rep.child_replicas.pop(msg.spi_in, None)
                self._flush(t)  # type: ignore[arg-type]

    # -- MemberProcess.flush ------------------------------------------------------------

    def _flush(self, mid: int) -> None:
        node = self.nodes[mid]
        m, rep = node.member, node.rep
        for notice in m.notices:
            if isinstance(notice, RouteAdd):
                route = m.by_spi.get(notice.child_id)
                if route is not None:
                    rep.child_installed(notice.child_id, route, route.ike_spi)
            elif isinstance(notice, RouteDel):
                rep.child_removed(notice.child_id)
            elif isinstance(notice, ChildPush | ChildDelete):
                self.relay.append((mid, notice))
        m.notices.clear()
        self.to_peer.extend(rep.outgoing(m.ike_out(), m.touched, self.now))
        m.touched.clear()

    # -- moving things ----------------------------------------------------------------

    def owner_of_ike(self, data: bytes) -> int:
        from common.cluster.spi import segment_of_ike_spi
        from common.ike.message import decode_header

        h = decode_header(data)
        ours = h.spi_r if h.is_initiator else h.spi_i
        owner = self.table.owner(segment_of_ike_spi(int.from_bytes(ours, "big"),
                                                    self.table.segment_bits))
        assert owner is not None
        return owner

    def pump(self, rounds: int = 1000) -> None:
        for _ in range(rounds):
            moved = False
            for addr, peer in self.peers.items():
                for out in peer.datagrams_to_send():
                    moved = True
                    mid = self.owner_of_ike(out.data) if out.data[8:16] != bytes(8) else 1
                    node = self.nodes[mid]
                    if node.alive:
                        node.member.handle_ike(out.data, addr, CLUSTER_PORT, self.now)
                        self._flush(mid)
            while self.relay:
                moved = True
                src, msg = self.relay.popleft()
                self._relay_one(src, msg)
            outs, self.to_peer = self.to_peer, []
            for o in outs:
                moved = True
                self.peers[o.remote].receive_datagram(o.data, ("198.18.0.2", o.local_port),
                                                      o.remote[1], self.now)
            if not moved:
                return
        raise AssertionError("the cluster and the peer did not go quiet")

    def peer_events(self) -> list[object]:
        out = []
        for peer in self.peers.values():
            while (e := peer.next_event()) is not None:
                out.append(e)
        return out

    def peer_sas(self) -> list[IkeSa]:
        return [sa for peer in self.peers.values() for sa in peer.established()]

    def establish(self, n: int, batch: int = 50) -> None:
        """``n`` IKE SAs from the peer, ``batch`` handshakes in flight at a
        time (under the responder's cookie threshold of 100 half-open SAs);
        every other one gets its second child with CREATE_CHILD_SA."""
        for start in range(0, n, batch):
            for i in range(start, min(n, start + batch)):
                addr = (f"198.18.{1 + i // PER_PEER // 250}.{1 + i // PER_PEER % 250}", 4500)
                peer = self.peers.get(addr)
                if peer is None:
                    peer = self.peers[addr] = peer_engine(len(self.peers) * 10 + 5)
                kids = ["net", "ctr"] if i % 2 == 0 else ["net"]
                # One identity for all: only the very first IKE SA says
                # INITIAL_CONTACT (RFC 7296 §2.4), or each would end the others.
                peer.initiate("c", ("198.18.0.2", 500), self.now, kids,
                              initial_contact=not self.peers_used)
                self.peers_used += 1
            self.pump()

    def fail(self, dead: int) -> None:
        self.nodes[dead].alive = False
        old = self.table.copy()
        self.table.fail_over(dead)
        for mid, node in self.nodes.items():
            if node.alive:
                node.rep.on_table(old, self.table.copy(), self.now)
                self._flush(mid)


def _dpd_round(c: ScaleCluster, side: str, batch: int = 2000) -> int:
    """A DPD on every established IKE SA of ``side`` ("peer" or the member id),
    ``batch`` at a time; returns how many were answered."""
    if side == "peer":
        ids = [(peer, sa.ike_id) for peer in c.peers.values() for sa in peer.established()]
    else:
        eng = c.nodes[int(side)].member.engine
        ids = [(eng, sa.ike_id) for sa in eng.established()]
    ok = 0
    for start in range(0, len(ids), batch):
        for eng, ike_id in ids[start:start + batch]:
            eng.dpd(ike_id, c.now)
        if side != "peer":
            c._flush(int(side))
        c.pump()
        if side == "peer":
            ok += sum(isinstance(e, DpdSucceeded) for e in c.peer_events())
        else:
            m = c.nodes[int(side)].member
            ok = m.counters["dpd_ok"]
    return ok


N_SAS = int(os.environ.get("SCALE_SAS", "10000"))


@pytest.mark.slow
def test_ten_thousand_ike_sas_fail_over_and_all_stay_alive() -> None:
    """Replay policy ``learn`` here: with ``rekey`` the new carrier rekeys all
    15,000 children at once, and ``Member._install_local``/``_remove`` scan
    the route list (``route in self.routes``, field-by-field dataclass
    equality) per rekey, O(children) each; the policy itself is checked at a
    smaller scale below."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    c = ScaleCluster.build(replay_policy="learn")
    c.establish(N_SAS)
    t_established = time.perf_counter()
    c.peer_events()
    m1, m2 = c.nodes[1].member, c.nodes[2].member
    rep1, rep2 = c.nodes[1].rep, c.nodes[2].rep
    peer_sas = c.peer_sas()
    assert len(peer_sas) == N_SAS
    # Member 1 answered every IKE_SA_INIT, so it owns all IKE SAs (its SPIs
    # are in its segments) and carries all children; member 2 is the backup
    # of every segment member 1 owns (a two-member table).
    owned1 = {k for k, sa in m1.engine.sas.items() if sa.state is IkeState.ESTABLISHED}
    assert len(owned1) == N_SAS and not m2.engine.sas
    assert set(rep2.ike_replicas) == owned1 and not rep1.ike_replicas
    children_total = sum(len(sa.children) for sa in peer_sas)
    assert children_total == N_SAS + N_SAS // 2 == len(m1.by_spi)
    # Every IKE change was ACKed before its datagrams left (none timed out).
    assert rep1.counters["ack_timeouts"] == 0 and not rep1.held
    assert rep2.counters["sync_gaps"] == 0
    # Every replica is the IKE SA as the peer knows it: message IDs both ways.
    peer_by_spi = {sa.spi_r: sa for sa in peer_sas}
    for key, st in rep2.ike_replicas.items():
        p = peer_by_spi[key]
        assert (st.send_next, st.recv_next) == (p.mids.recv_next, p.mids.send_next)
    # Member 1 runs a DPD on every 10th IKE SA before it dies, so that some
    # replicas carry a send counter above 0 (and prove the peer accepts the
    # new owner's continuation of it).
    sample1 = [sa.ike_id for sa in m1.engine.established()][::10]
    for ike_id in sample1:
        m1.engine.dpd(ike_id, c.now)
    c._flush(1)
    c.pump()
    assert m1.counters["dpd_ok"] == len(sample1)
    replicated = dict(rep2.ike_replicas)
    assert sum(st.send_next == 1 for st in replicated.values()) == len(sample1)
    child_replicas = dict(rep2.child_replicas)
    carried_by_1 = set(m1.by_spi)
    assert set(child_replicas) == carried_by_1
    assert all(len(cs.ike_spi) == 8 for cs in child_replicas.values())

    # -- member 1 dies; member 2 takes over everything --------------------------------
    t_fail = time.perf_counter()
    c.fail(1)
    t_adopted = time.perf_counter()
    assert rep2.counters["ike_sas_adopted"] == N_SAS
    assert rep2.counters["child_sas_adopted"] == len(carried_by_1)
    assert len(m2.engine.established()) == N_SAS
    for key, st in replicated.items():
        sa = m2.engine.sas[key]
        assert (sa.mids.send_next, sa.mids.recv_next) == (st.send_next, st.recv_next)
    # New carrier: skipped ahead (§3.4), its own IV sender id (§3.7.1).
    for spi_in in carried_by_1:
        route = m2.by_spi[spi_in]
        skip = 2 * rep2.seq_sync_packets
        assert route.outbound.next_seq >= child_replicas[spi_in].out_seq + skip
        assert route.outbound.sender_id == 2

    # -- all alive: a DPD from the peer on every one of the 10,000 IKE SAs ----------------
    answered = _dpd_round(c, "peer")
    assert answered == N_SAS, f"{N_SAS - answered} IKE SAs did not answer a DPD"
    t_dpd = time.perf_counter()
    # ... and the new owner's own requests go on from the replicated counter
    # (every 10th SA: the ones with send_next 1 and the ones with 0).
    sample2 = [sa.ike_id for sa in m2.engine.established()][::10]
    for ike_id in sample2:
        m2.engine.dpd(ike_id, c.now)
    c._flush(2)
    c.pump()
    assert m2.counters["dpd_ok"] == len(sample2)

    # -- a sample rekeys: children both ways, IKE SAs both ways -------------------------
    c.peer_events()
    sample = sorted(m2.engine.established(), key=lambda sa: sa.spi_r)[::200]
    for sa in sample[::2]:
        m2.engine.rekey_child(sa.ike_id, next(iter(sa.children)), c.now)
    c._flush(2)
    psample = {sa.spi_r: (peer, sa) for peer in c.peers.values() for sa in peer.established()}
    for sa in sample[1::2]:
        peer, p = psample[sa.spi_r]
        peer.rekey_child(p.ike_id, next(iter(p.children)), c.now)
    c.pump()
    installed = [e for e in c.peer_events() if isinstance(e, ChildSaInstalled)]
    assert sum(e.replaces is not None for e in installed) == len(sample)
    ours = sample[:10]
    for sa in ours:
        m2.engine.rekey_ike(sa.ike_id, c.now)
    c._flush(2)
    theirs = [psample[k] for k in sorted(psample)[-10:] if k not in {sa.spi_r for sa in ours}]
    for peer, p in theirs:
        peer.rekey_ike(p.ike_id, c.now)
    c.pump()
    rekeyed = [e for e in c.peer_events() if isinstance(e, IkeSaRekeyed)]
    assert len(rekeyed) == len(ours) + len(theirs)
    assert len(c.peer_sas()) == N_SAS == len(m2.engine.established())
    t_end = time.perf_counter()
    print(f"\nscale: {N_SAS} IKE SAs ({children_total} children): establish + replicate "
          f"{t_established - t0:.1f} s, takeover {t_adopted - t_fail:.2f} s, "
          f"{N_SAS} DPDs {t_dpd - t_adopted:.1f} s, rest {t_end - t_dpd:.1f} s; "
          f"{c.sync_messages} sync messages, {c.sync_bytes / 1e6:.1f} MB; "
          f"CPU {time.process_time() - cpu0:.1f} s")


def test_replay_policy_rekey_rekeys_every_child_the_dead_member_carried() -> None:
    """RFC 6027 §3.5 "rekey all child SAs following a failover": each child
    replica names its IKE SA (from the carrier's ChildState, which the
    owner's ChildPush that follows must not wipe), so the new carrier, here
    also the new IKE SA owner, rekeys every one of them with the peer."""
    c = ScaleCluster.build(replay_policy="rekey")
    c.establish(100)
    m1, m2, rep2 = c.nodes[1].member, c.nodes[2].member, c.nodes[2].rep
    carried = set(m1.by_spi)
    assert len(carried) == 150
    assert {cs.ike_spi for cs in rep2.child_replicas.values()} == set(m1.engine.sas)
    out_spis = {cs.spi_out for cs in rep2.child_replicas.values()}
    c.peer_events()
    c.fail(1)
    assert rep2.counters["rekeys_after_failover"] == len(carried)
    c._flush(2)
    c.pump()
    installed = [e for e in c.peer_events() if isinstance(e, ChildSaInstalled)]
    assert {e.replaces for e in installed} == out_spis  # the peer's inbound SPIs
    # every rekeyed child replaced (old ones deleted), every IKE SA alive
    live = {s for sa in m2.engine.established() for s in sa.children}
    assert not live & carried and len(live) == len(carried)
    assert _dpd_round(c, "peer") == 100
