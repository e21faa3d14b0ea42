"""Hostile members (docs/design.md "Trust model"): something that can reach the
members' endpoint is not a member.

Live: a real 3-member cluster (``ipsec-cluster run``, members started by the
supervisor with a key pair per incarnation) and our peer with children
carrying traffic, on ipc:// and on tcp:// (loopback; across namespaces:
tests/test_cluster_multihost.py); a fake member (plain pyzmq, in this process)
tries every message type with no key, a wrong key, the authorized key of
another member, a live member's id and routing id, and the bulk channel of a
live member. It gets nothing (no TABLE, CHILD_PUSH, SYNC, keys), the
dispatcher sends no datagram for it, no member process changes, the
dispatcher's drop counters show each refusal, and traffic still flows.

In-process: what an authenticated member may say, from its role (the
dispatcher's ``Guard``): each refused message is counted by its reason and
changes nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from hypothesis import given
from hypothesis import strategies as st

from bench.harness.net import in_netns
from common.cluster.routing import init_segment
from common.cluster.stats import MemberStats
from common.cluster.wire import (
    Channel,
    ChildClaim,
    ChildDelete,
    ChildPush,
    Datagram,
    DatagramIn,
    DatagramOut,
    Heartbeat,
    Hello,
    InnerOut,
    Message,
    Notice,
    NoticeKind,
    RouteAdd,
    RouteDel,
    Status,
    StatusReq,
    Sync,
    encode,
)
from common.config import load_config
from common.ike.constants import TsType
from common.ike.ts import TrafficSelector
from dispatcher.cluster import Conn, Dispatcher
from dispatcher.membership import MemberInfo
from dispatcher.supervisor import members_endpoint
from dispatcher.trust import KeyRing
from tests.cluster_util import (
    DOWN,
    UP,
    Endpoint,
    Proc,
    Procs,
    alive_members,
    cli_argv,
    esp_sas,
    exchange_traffic,
    gateway_toml,
    grid_connections,
    pid_alive,
    sas,
    status,
    tail,
    wait_assigned,
    wait_for,
    wait_status,
)
from tests.fuzz import fuzz_settings

BASE = 31800
GW, PEER = "127.0.0.1", "127.0.0.2"
N_IKE, N_CHILD, N_MEMBERS = 3, 2, 3
PER_FLOW = 5
#: how long the fake listens for anything the dispatcher might send it
LISTEN_S = 1.5
#: how long a fake waits to send before it takes itself as shut out
SEND_TIMEOUT_MS = 2000
V4_ANY = TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535,
                         ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("255.255.255.255"))


# -- the live cluster ------------------------------------------------------------------------


@dataclass
class Cluster:
    config: Path
    endpoint: str
    server_key: bytes
    keys: Path
    dispatcher: Proc
    gw_ep: Endpoint
    peer_ep: Endpoint
    flows: list[tuple[str, str]]
    pids: list[int]
    ports: tuple[int, int]

    def status(self) -> dict[str, Any]:
        return status(self.config)

    def drops(self) -> dict[str, int]:
        d: dict[str, int] = self.status()["dispatcher"]["drops"]
        return d

    def diag(self) -> str:
        return tail(self.dispatcher.log_path)


def keygen(keys: Path, name: str) -> None:
    keys.mkdir(exist_ok=True, mode=0o700)
    zmq.auth.create_certificates(str(keys), name)


@pytest.fixture(params=["ipc", "tcp"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """3 members started by the supervisor (a fresh key pair each, through
    stdin); authorized besides: ``member4.key`` (a member that is not
    running: the fake's "authorized key of another member")."""
    offset = 0 if request.param == "ipc" else 50
    ports = (BASE + offset, BASE + offset + 1)
    inside, bind = (GW, BASE + offset + 10), (GW, BASE + offset + 11)
    peer_inside, peer_bind = (GW, BASE + offset + 20), (GW, BASE + offset + 21)
    keys = tmp_path / "keys"
    for name in ("dispatcher", "member4", "stranger"):
        keygen(keys, name)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "member4.key").write_bytes((keys / "member4.key").read_bytes())
    extra: dict[str, Any] = {"curve_secret_key": "keys/dispatcher.key_secret",
                             "curve_authorized": "authorized"}
    if request.param == "tcp":
        extra["sync"] = f"tcp://127.0.0.1:{BASE + offset + 40}"
    procs = Procs(tmp_path)
    endpoints: list[Endpoint] = []
    try:
        conns = grid_connections(N_IKE, N_CHILD)
        config = tmp_path / "cluster.toml"
        config.write_text(gateway_toml(
            address=GW, ports=ports, inside=f"udp:{inside[0]}:{inside[1]}",
            inside_bind=f"{bind[0]}:{bind[1]}", members=N_MEMBERS, conns=conns, extra=extra))
        disp = procs.start("cluster", cli_argv("run", "--config", str(config)))
        wait_assigned(disp, N_MEMBERS, timeout=20)
        gw_ep, peer_ep = Endpoint(inside, bind), Endpoint(peer_inside, peer_bind)
        endpoints += [gw_ep, peer_ep]
        peer_cfg = tmp_path / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=PEER, ports=(BASE + offset + 30, BASE + offset + 31),
            inside=f"udp:{peer_inside[0]}:{peer_inside[1]}",
            inside_bind=f"{peer_bind[0]}:{peer_bind[1]}", conns=conns, remote=(GW, ports[0])))
        peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)))
        st = wait_status(config, "children up", lambda s: sum(
            m["child_sas"] for m in s["members"]) == N_IKE * N_CHILD,
            timeout=40, diag=lambda: tail(disp.log_path) + tail(peer.log_path))
        assert len(alive_members(st)) == N_MEMBERS
        loaded = load_config(config.read_text(), str(config))
        server_key, _ = zmq.auth.load_certificate(str(keys / "dispatcher.key"))
        yield Cluster(config, members_endpoint(loaded, str(config)), server_key, keys, disp,
                      gw_ep, peer_ep, [ch.host_pair() for c in conns for ch in c.children],
                      [disp.pid] + [m["pid"] for m in st["members"]], ports)
    finally:
        for ep in endpoints:
            ep.close()
        procs.close()


class Fake:
    """A would-be member: one DEALER with the given routing id and CURVE keys
    (None: no CURVE at all)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, routing_id: bytes,
                 keys: tuple[bytes, bytes, bytes] | None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, routing_id)
        # a DEALER whose handshake never completes would block on send
        self.sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        if keys is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = keys
        self.sock.connect(endpoint.replace("tcp://0.0.0.0", "tcp://127.0.0.1"))
        self.seq = 0
        #: the dispatcher never let it in (no connection to send on)
        self.shut_out = False

    def say(self, *msgs: Message) -> None:
        for msg in msgs:
            if self.shut_out:
                return
            try:
                self.sock.send(encode(msg, self.seq))
            except zmq.Again:
                self.shut_out = True
            self.seq += 1

    def heard(self) -> list[bytes]:
        out = []
        while self.sock.poll(0):
            out.append(self.sock.recv())
        return out


def _selector(cidr: str) -> TrafficSelector:
    net = ipaddress.ip_network(cidr)
    return TrafficSelector(TsType.TS_IPV4_ADDR_RANGE, 0, 0, 65535, net.network_address,
                           net.broadcast_address)


def every_message(ports: tuple[int, int], trap_port: int, real_spi: int, peer_ip: bytes,
                  claim: int) -> list[Message]:
    """One of each message a member can send, claiming to be member ``claim``."""
    trap = socket.inet_aton(GW)
    ike = struct.pack("!QQBBBBII", 0x1111, 0x2222, 33, 0x20, 37, 0x20, 0, 28)
    return [
        Hello(claim, os.getpid(), "fake"),
        Hello(claim, os.getpid(), "fake", Channel.BULK, 1),
        Hello(claim, os.getpid(), "fake", Channel.HEARTBEAT, 1),
        Heartbeat(claim, 1, os.getpid(), 1, stats=MemberStats(ike_sas=999)),
        DatagramOut([Datagram(ports[1], trap, trap_port, b"spoofed from the cluster"),
                     Datagram(ports[0], trap, trap_port, ike),
                     Datagram(ports[1], peer_ip, ports[1], struct.pack("!II", real_spi, 1))]),
        InnerOut([b"E" + bytes(27)]),
        RouteAdd(real_spi, claim, (V4_ANY,), (V4_ANY,)),
        RouteAdd(0x7F000001, claim, (V4_ANY,), (V4_ANY,)),
        RouteDel(real_spi),
        ChildPush(real_spi, 1, "evil", real_spi, 0x1234, "no-such-transform", False,
                  bytes(32), bytes(32), (V4_ANY,), (V4_ANY,), trap, 4500, bytes(8)),
        ChildDelete(real_spi, real_spi),
        Sync(2, claim, 0, b"\x01\x02forged replica"),
        Sync(1, 3, 0, b"\x01\x02forged replica"),
        Status(b'{"member": 1}'),
        StatusReq(),
        DatagramIn([]),
    ]


def test_a_fake_member_gets_nothing_and_breaks_nothing(cluster: Cluster) -> None:
    c = cluster
    before = c.status()
    d0 = before["dispatcher"]["drops"]
    answer = sas(c.config)
    children = esp_sas(answer)
    real_spi = int(children[0]["spi_in"], 16)
    peer_ip = socket.inet_aton(PEER)
    ike_before = sum(m["ike_sas"] for m in before["members"])
    routes_before = before["dispatcher"]["inside_routes"]
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trap.bind((GW, 0))
    trap.settimeout(0.2)
    trap_port = trap.getsockname()[1]

    def pair(name: str) -> tuple[bytes, bytes]:
        public, secret = zmq.auth.load_certificate(str(c.keys / f"{name}.key_secret"))
        assert secret is not None
        return public, secret

    member4, stranger = pair("member4"), pair("stranger")
    bad_server = zmq.curve_keypair()[0]
    ctx: zmq.Context[Any] = zmq.Context()
    fakes = {
        "no key": Fake(ctx, c.endpoint, b"member-1", None),
        "wrong server key": Fake(ctx, c.endpoint, b"member-1-bulk", (*member4, bad_server)),
        "unauthorized key": Fake(ctx, c.endpoint, b"member-2", (*stranger, c.server_key)),
        "another member's key, live ids": Fake(ctx, c.endpoint, b"member-3-hb",
                                               (*member4, c.server_key)),
        "another member's key, bulk": Fake(ctx, c.endpoint, b"member-1-bulk",
                                           (*member4, c.server_key)),
    }
    try:
        time.sleep(0.5)   # handshakes
        for fake in fakes.values():
            for claim in (1, 2, 3):
                fake.say(*every_message(c.ports, trap_port, real_spi, peer_ip, claim))
        # member 4's key (it could join as member 4: it is authorized), on the
        # channels of an incarnation that does not exist, and without HELLO
        sender_id = before["members"][0]["sender_id"]
        fakes["another member's key, bulk"].say(
            Hello(4, 1, "fake", Channel.BULK, sender_id),
            Hello(4, 1, "fake", Channel.HEARTBEAT, sender_id),
            Sync(1, 4, 0, b"x"), Heartbeat(4, sender_id, 1, 1, {}))

        def refused() -> dict[str, int] | None:
            d = c.drops()
            grown = {k: v - d0.get(k, 0) for k, v in d.items() if v > d0.get(k, 0)}
            ok = (grown.get("member_handshake_failed", 0) >= 1
                  and grown.get("member_refused", 0) >= 1
                  and grown.get("refused_hello_wrong_id", 0) >= 2 * 3 * 3
                  and grown.get("refused_hello_no_incarnation", 0) >= 2
                  and grown.get("refused_no_hello", 0) >= 2 * 3 * 12)
            return grown if ok else None

        grown = wait_for("every refusal counted", refused, timeout=15,
                         diag=lambda: f"{d0}\n{c.drops()}\n{c.diag()}")
        time.sleep(LISTEN_S)
        for name, fake in fakes.items():
            assert fake.heard() == [], f"the fake ({name}) was told something"
        with pytest.raises(TimeoutError):
            trap.recvfrom(100)
    finally:
        for fake in fakes.values():
            fake.sock.close(linger=0)
        ctx.term()
        trap.close()
    after = c.status()
    assert [m["pid"] for m in after["members"]] == c.pids[1:], "a member was restarted"
    assert all(pid_alive(p) for p in c.pids), c.diag()
    assert len(alive_members(after)) == N_MEMBERS
    assert [m["sender_id"] for m in after["members"]] == \
        [m["sender_id"] for m in before["members"]]
    assert sum(m["ike_sas"] for m in after["members"]) == ike_before
    assert after["dispatcher"]["inside_routes"] == routes_before
    assert {e["spi_in"] for e in esp_sas(sas(c.config))} == {e["spi_in"] for e in children}
    # nothing the fakes said was relayed or sent
    assert "refused_unauthenticated" not in grown
    res = exchange_traffic(c.flows, c.peer_ep, c.gw_ep, per_flow=PER_FLOW)
    every = set(range(len(c.flows)))
    assert res.bad == 0 and res.misrouted == 0
    assert res.flows_seen(UP) == every and res.flows_seen(DOWN) == every, c.diag()


def test_a_run_directory_of_someone_else_is_refused(tmp_path: Path) -> None:
    """An existing run directory open to others (or not ours) is refused
    with one line naming it; a stale one of ours is taken over."""
    from dispatcher.cli import main

    control = tmp_path / "run"
    control.mkdir(mode=0o755)
    control.chmod(0o755)
    config = tmp_path / "c.toml"
    config.write_text(gateway_toml(
        address=GW, ports=(BASE + 90, BASE + 91), inside=f"udp:{GW}:{BASE + 92}",
        inside_bind=f"{GW}:{BASE + 93}", members=2, conns=grid_connections(1, 1),
        extra={"control": str(control)}))
    with pytest.raises(SystemExit) as e1:
        raise SystemExit(main(["run", "--config", str(config)]))
    assert e1.value.code == 2
    os.chown(control, 65534, 65534)
    control.chmod(0o700)
    with pytest.raises(SystemExit) as e2:
        raise SystemExit(main(["run", "--config", str(config)]))
    assert e2.value.code == 2


def test_run_directory_messages(tmp_path: Path) -> None:
    from common.errors import StartupError
    from dispatcher.trust import secure_run_dir

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(StartupError, match=f"{open_dir}.*mode 755.*chmod 700"):
        secure_run_dir(open_dir, ["members.ipc"])
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StartupError, match=f"{theirs} belongs to uid 65534"):
        secure_run_dir(theirs, ["members.ipc"])
    link = tmp_path / "link"
    link.symlink_to(theirs)
    with pytest.raises(StartupError, match="not a directory"):
        secure_run_dir(link, ["members.ipc"])
    stale = tmp_path / "stale"
    stale.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale / "members.ipc"))
    dead.close()                                   # a socket file nobody listens on
    secure_run_dir(stale, ["members.ipc"])
    assert not (stale / "members.ipc").exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(stale / "control.ipc"))
    live.listen()
    try:
        with pytest.raises(StartupError, match="already runs"):
            secure_run_dir(stale, ["control.ipc"])
    finally:
        live.close()
    fresh = tmp_path / "fresh" / "run"
    secure_run_dir(fresh, ["members.ipc"])
    assert fresh.stat().st_mode & 0o777 == 0o700


# -- roles, in-process -----------------------------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.to: list[tuple[int, Message]] = []
        self.udp: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        self.udp.append((bytes(data), addr))
        return len(data)


def _rig() -> tuple[Dispatcher, Sent]:
    text = gateway_toml(address=GW, ports=(500, 4500), inside="udp:127.0.0.1:1",
                        inside_bind="127.0.0.1:2", members=3, conns=grid_connections(2, 2))
    config = load_config(text, "roles.toml")
    d = Dispatcher(config, "inproc://roles", keys=KeyRing(), expect_members=3)
    sent = Sent()
    d.udp = {500: sent, 4500: sent}   # type: ignore[dict-item]
    d._send = lambda info, msg: sent.to.append((info.member_id, msg))  # type: ignore[method-assign]
    # (HELLOs straight to the membership machine: sender ids 1..4; the third
    # assigns the table to 1, 2, 3 with spread backups; what it says is not sent)
    for m in (1, 2, 3, 4):   # 4: alive, but owns no segment (not yet balanced)
        identity = f"live{m}".encode()
        d.membership.hello(m, 100 + m, "", 0, time.monotonic())
        d.members[m] = MemberInfo(d.membership.members[m], identity)
        d.by_identity[identity] = m
        d.conns[identity] = Conn(m, Channel.LIVE)
        d.conns[f"bulk{m}".encode()] = Conn(m, Channel.BULK)
        d.bulk_identity[m] = f"bulk{m}".encode()
    assert [d.members[m].sender_id for m in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert d.table.members == (1, 2, 3) and not d.table.segments_of(4)
    return d, sent


def _say(d: Dispatcher, member: int, msg: Message, channel: str = "live") -> None:
    d._peer = member
    try:
        d._from_member(f"{channel}{member}".encode(), 0, msg)
    finally:
        d._peer = None


def _segment_spi(d: Dispatcher, owner: int, bits: int) -> int:
    """An SPI (``bits`` wide) in a segment ``owner`` owns, and a random low part."""
    segment = d.table.segments_of(owner)[0]
    return (segment << (bits - d.table.segment_bits)) | 0x1234


def _push(d: Dispatcher, sender: int, carrier: int, remote: str = "10.100.0.0/28") -> ChildPush:
    spi_in = _segment_spi(d, carrier, 32)
    ike_spi = _segment_spi(d, sender, 64).to_bytes(8, "big")
    return ChildPush(spi_in, 1, "k0/c0", spi_in, 0xC0DE0000 | carrier, "aes128gcm16", False,
                     bytes(20), bytes(20), (_selector("10.200.0.0/28"),),
                     (_selector(remote),), socket.inet_aton(PEER), 4500, ike_spi)


def test_role_checks_refuse_and_count(tmp_path: Path) -> None:
    d, sent = _rig()
    push = _push(d, sender=1, carrier=2)
    # the owner of the IKE SA's segment may push; 3 may not (nor for 1's SA)
    _say(d, 3, push)
    assert d.drops["refused_child_push_not_ike_owner"] == 1 and not sent.to
    _say(d, 1, push)
    assert {m for m, _ in sent.to} == {2, d.table.backup(d.table.segments_of(2)[0])} - {1}
    sent.to.clear()
    # the same child with another outbound SPI
    _say(d, 1, dataclasses.replace(push, spi_out=0x0BAD))
    assert d.drops["refused_child_push_conflict"] == 1 and not sent.to
    # a child wider than anything configured
    _say(d, 1, _push(d, 1, 1, remote="0.0.0.0/0"))
    assert d.drops["refused_child_push_outside_config"] == 1 and not sent.to
    # ROUTE_ADD: only the carrier, only its own, never wider than the child
    route = RouteAdd(push.spi_in, 2, push.local_ts, push.remote_ts)
    _say(d, 3, route)
    assert d.drops["refused_route_add_other_member"] == 1
    _say(d, 3, RouteAdd(push.spi_in, 3, push.local_ts, push.remote_ts))
    assert d.drops["refused_route_add_not_carrier"] == 1
    _say(d, 2, RouteAdd(push.spi_in, 2, (V4_ANY,), (V4_ANY,)))
    assert d.drops["refused_route_add_wider_than_child"] == 1
    assert len(d.routes) == 0
    _say(d, 2, route)
    assert len(d.routes) == 1
    _say(d, 3, RouteDel(push.spi_in))
    assert d.drops["refused_route_del_not_own"] == 1 and len(d.routes) == 1
    # DATAGRAM_OUT: ESP only on a child the sender carries
    peer = socket.inet_aton(PEER)
    esp = Datagram(4500, peer, 4500, struct.pack("!II", push.spi_out, 1) + bytes(40))
    _say(d, 3, DatagramOut([esp]))
    assert d.drops["refused_datagram_esp_not_carrier"] == 1 and not sent.udp
    _say(d, 2, DatagramOut([Datagram(4500, peer, 4500, struct.pack("!II", 0x99999999, 1))]))
    assert d.drops["refused_datagram_esp_unknown_sa"] == 1 and not sent.udp
    _say(d, 2, DatagramOut([esp]))
    assert len(sent.udp) == 1
    sent.udp.clear()
    # IKE only in an IKE SA whose (our) SPI lies in the sender's segment
    ike_spi = int.from_bytes(push.ike_spi, "big")
    resp = struct.pack("!QQBBBBII", 0x77, ike_spi, 46, 0x20, 37, 0x20, 2, 28)  # R, not I
    _say(d, 2, DatagramOut([Datagram(500, peer, 500, resp)]))
    assert d.drops["refused_datagram_ike_not_owner"] == 1 and not sent.udp
    _say(d, 1, DatagramOut([Datagram(500, peer, 500, resp)]))
    assert len(sent.udp) == 1
    sent.udp.clear()
    # an IKE_SA_INIT answer without SA (SPIr 0): from the member the request was hashed to
    spi_i = 0xABCDEF
    owner = d.table.owner(init_segment(peer, 500, spi_i, d.table.segment_bits))
    cookie = struct.pack("!QQBBBBII", spi_i, 0, 41, 0x20, 34, 0x20, 0, 28)
    for m in (1, 2, 3):
        _say(d, m, DatagramOut([Datagram(500, peer, 500, cookie)]))
    assert len(sent.udp) == 1 and d.drops["refused_datagram_ike_not_owner"] == 3
    sent.udp.clear()
    assert owner is not None
    # not from any other port
    _say(d, 2, DatagramOut([Datagram(53, peer, 53, b"x")]))
    assert not sent.udp
    # CHILD_DELETE: only from the IKE SA's owner
    _say(d, 2, ChildDelete(push.spi_in, push.spi_in))
    assert d.drops["refused_child_delete_not_ike_owner"] == 1 and not sent.to
    # SYNC: src is the sender, dst a synch partner (owner <-> backup)
    partner = d.table.backup(d.table.segments_of(1)[0])
    assert partner is not None
    _say(d, 1, Sync(partner, 2, 0, b"x"))
    assert d.drops["refused_sync_wrong_src"] == 1 and not sent.to
    _say(d, 1, Sync(partner, 1, 0, b"x"))
    assert [m for m, _ in sent.to] == [partner]
    sent.to.clear()
    # HELLO: only for the authenticated id, never for a live one
    _say(d, 1, Hello(2, 1, "x"))
    _say(d, 1, Hello(1, 1, "x"))
    assert d.drops["refused_hello_wrong_id"] == 1
    assert d.drops["refused_hello_member_alive"] == 1
    assert d.members[1].identity == b"live1" and not sent.to
    # another channel of member 1's incarnation: its sender id is not enough
    bulk = Hello(1, 1, "x", Channel.BULK, d.members[1].sender_id, 0x5EC2E7)
    _say(d, 1, bulk, channel="new")
    assert d.drops["refused_hello_no_incarnation"] == 1 and b"new1" not in d.conns
    d.members[1].incarnation.token = 0x5EC2E7
    _say(d, 1, bulk, channel="new")
    assert d.conns[b"new1"].channel is Channel.BULK and d.bulk_identity[1] == b"new1"
    # what only the dispatcher says
    for msg in (DatagramIn([]), StatusReq()):
        _say(d, 1, msg)
    assert d.drops["refused_wrong_direction"] == 2
    # a heartbeat for someone else
    _say(d, 1, Heartbeat(2, 2, 1, 1, {}))
    assert d.drops["refused_heartbeat_not_own"] == 1
    # the bulk channel carries SYNC only
    _say(d, 1, RouteAdd(push.spi_in, 1, push.local_ts, push.remote_ts), channel="new")
    assert d.drops["refused_bulk_not_sync"] == 1
    _say(d, 1, Sync(partner, 1, 0, b"x"), channel="bulk")   # the replaced bulk connection
    assert d.drops["refused_no_hello"] == 1 and not sent.to
    d.close()


def test_a_dead_member_is_fenced_and_its_successor_joins() -> None:
    d, sent = _rig()
    _say(d, 2, Hello(2, 999, "x"))
    assert d.drops["refused_hello_member_alive"] == 1
    d.fence(2, 999)                  # not that incarnation's pid: nothing
    assert d.members[2].alive
    d.fence(2, 102)
    assert not d.members[2].alive
    d._peer = 2
    d._from_member(b"new2", 0, Hello(2, 999, "x"))
    d._peer = None
    assert d.members[2].alive and d.members[2].identity == b"new2"
    assert any(m == 2 and isinstance(msg, Heartbeat) for m, msg in sent.to)
    assert b"live2" not in d.conns and b"bulk2" not in d.conns
    d.close()


def _notices(d: Dispatcher) -> list[tuple[bytes, Notice]]:
    told: list[tuple[bytes, Notice]] = []
    d._notify = lambda identity, notice: told.append((identity, notice))  # type: ignore[method-assign]
    return told


def test_a_dead_incarnation_is_told_to_rejoin_and_a_replaced_one_to_stop() -> None:
    d, _sent = _rig()
    told = _notices(d)
    old_sid = d.members[2].sender_id
    d.fence(2, 102)
    _say(d, 2, Heartbeat(2, old_sid, 102, 1, stats=MemberStats()))
    assert told == [(b"live2", Notice(NoticeKind.DEAD, old_sid,
                                       f"member 2 sender id {old_sid} was declared dead"))]
    # its other output stays ignored, and it is told nothing more for it
    _say(d, 2, RouteDel(1))
    assert d.drops["dead_member"] == 1 and len(told) == 1
    # its successor joins; the old connection is gone: it hears nothing there
    d._peer = 2
    d._from_member(b"new2", 0, Hello(2, 999, "x"))
    d._peer = None
    told.clear()
    _say(d, 2, Heartbeat(2, old_sid, 102, 1, stats=MemberStats()))
    assert told == [] and d.drops["refused_no_hello"] == 1
    d.close()


def test_a_hello_with_other_timing_keys_is_refused_with_the_line() -> None:
    from common.cluster.wire import Timing

    d, _sent = _rig()
    told = _notices(d)
    d.fence(2, 102)
    d._peer = 2
    d._from_member(b"new2", 0, Hello(2, 999, "x", timing=Timing.of(0.5, 3, 8, "load-sharing")))
    d._peer = None
    assert d.drops["refused_hello_timing"] == 1 and not d.members[2].alive
    assert told and told[0][0] == b"new2" and told[0][1].kind is NoticeKind.REFUSED
    assert told[0][1].text.startswith("cluster.heartbeat_interval is 0.5 at member 2 but ")
    d.close()


def test_a_child_is_claimed_only_by_the_carrier_of_its_segment() -> None:
    d, _sent = _rig()
    spi_in = _segment_spi(d, 1, 32)
    ike_spi = _segment_spi(d, 2, 64).to_bytes(8, "big")
    claim = ChildClaim(spi_in, 0xC0DE0001, ike_spi, (_selector("10.200.0.0/28"),),
                       (_selector("10.100.0.0/28"),))
    _say(d, 2, claim)                                    # not the carrier
    assert d.drops["refused_child_claim_not_carrier"] == 1 and spi_in not in d.route_info
    _say(d, 1, dataclasses.replace(claim, ike_spi=b"x"))
    assert d.drops["refused_child_claim_no_ike_sa"] == 1
    _say(d, 1, dataclasses.replace(claim, remote_ts=(V4_ANY,)))
    assert d.drops["refused_child_claim_outside_config"] == 1
    _say(d, 1, claim)
    assert d.route_info[spi_in].member == 1 and d.counters["children_claimed"] == 1
    _say(d, 1, claim)                                    # the same claim again: fine
    assert d.counters["children_claimed"] == 2
    # another outbound SPI for a known child, another child over a known outbound SPI
    _say(d, 1, dataclasses.replace(claim, spi_out=0xC0DE0002))
    other = _segment_spi(d, 1, 32) ^ 0x10
    _say(d, 1, dataclasses.replace(claim, spi_in=other))
    assert d.drops["refused_child_claim_conflict"] == 2 and other not in d.route_info
    # its ESP may leave now (the guard knows the child)
    esp = struct.pack("!II", 0xC0DE0001, 1) + bytes(32)
    assert d.guard.datagram(Datagram(4500, socket.inet_aton(PEER), 4500, esp), 1) is None
    d.close()


_messages = st.one_of(
    st.builds(RouteAdd, st.integers(0, 2**32 - 1), st.integers(1, 4), st.just((V4_ANY,)),
              st.just((V4_ANY,))),
    st.builds(RouteDel, st.integers(0, 2**32 - 1)),
    st.builds(ChildDelete, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(Sync, st.integers(0, 5), st.integers(0, 5), st.integers(0, 9), st.binary()),
    st.builds(Hello, st.integers(0, 5), st.integers(0, 9), st.just("h"),
              st.sampled_from(list(Channel)), st.integers(0, 9)),
    st.builds(lambda p, b: DatagramOut([Datagram(p, socket.inet_aton(PEER), 1, b)]),
              st.sampled_from([500, 4500, 53]), st.binary(max_size=64)),
)


@pytest.mark.fuzz
@fuzz_settings(200)
@given(channel=st.sampled_from(["live", "bulk", "other"]),
       msgs=st.lists(_messages, max_size=8))
def test_hostile_messages_never_send_or_route(channel: str, msgs: list[Message]) -> None:
    """An authenticated member that owns no segment and carries no child:
    whatever it says adds no route, sends no datagram (but a NAT keepalive),
    reaches no other member, and raises nothing."""
    d, sent = _rig()
    try:
        for msg in msgs:
            _say(d, 4, msg, channel=channel)
        assert len(d.routes) == 0 and not sent.to
        assert all(data == b"\xff" for data, _ in sent.udp), sent.udp
    finally:
        d.close()


# -- strongSwan as the peer ------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.slow
def test_strongswan_sas_survive_a_local_fake_member(lab: Any, tmp_path: Path) -> None:
    """The attack of the issue, on one host: the members' ipc:// socket is
    reachable from any local process (and from every network namespace). A
    fake with no key, or with keys of its own, says everything a member can;
    it hears nothing, charon's IKE and child SAs stay up with the same SPIs,
    pings pass every child, and no member process changes."""
    from tests.test_cluster_strongswan import CHILDREN, _all_children, _pings, _setup

    ns_a, ns_b, charon, gw, config = _setup(lab, tmp_path)
    for child in CHILDREN:
        charon.initiate(child=child.name, ike="a-b")
    ours = wait_for("3 children at the cluster", lambda: _all_children(config), timeout=10)
    _pings(ns_a, ns_b, gw)
    ike_before = charon.ike_sa("a-b")
    kids_before = {c["name"]: c["spi-in"] for c in charon.child_sas()}
    st0 = status(config)
    loaded = load_config(config.read_text(), str(config))
    endpoint = members_endpoint(loaded, str(config))
    run_dir = Path(endpoint[len("ipc://"):]).parent
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert Path(endpoint[len("ipc://"):]).stat().st_mode & 0o777 == 0o600
    real_spi = int(next(iter(ours.values()))["spi_in"], 16)
    ctx: zmq.Context[Any] = zmq.Context()
    own = zmq.curve_keypair()
    fakes = [Fake(ctx, endpoint, b"member-1", None),
             Fake(ctx, endpoint, b"member-2-bulk", (*own, zmq.curve_keypair()[0]))]
    try:
        time.sleep(0.3)
        for fake in fakes:
            for claim in (1, 2, 3):
                fake.say(*every_message((500, 4500), 9, real_spi,
                                        socket.inet_aton("198.18.0.1"), claim))
        wait_for("handshakes refused", lambda: status(config)["dispatcher"]["drops"].get(
            "member_handshake_failed", 0) >= 2, timeout=10)
        time.sleep(LISTEN_S)
        assert all(fake.heard() == [] for fake in fakes)
    finally:
        for fake in fakes:
            fake.sock.close(linger=0)
        ctx.term()
    _pings(ns_a, ns_b, gw)
    ike_after = charon.ike_sa("a-b")
    assert ike_after is not None and ike_before is not None
    assert ike_after["initiator-spi"] == ike_before["initiator-spi"]
    assert {c["name"]: c["spi-in"] for c in charon.child_sas()} == kids_before
    st = status(config)
    assert [m["pid"] for m in st["members"]] == [m["pid"] for m in st0["members"]]
    assert all(m["alive"] for m in st["members"])
    assert st["dispatcher"]["counters"].get("members_died", 0) == 0


# -- across hosts (network namespaces), tcp:// + CURVE ---------------------------------------


def _key_pair(keys: Path, name: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
    assert secret is not None
    return public, secret


def _in_netns(ns: str, fn: Any) -> Any:
    """Run ``fn()`` on a thread that entered ``ns`` (setns(2) is per thread;
    the ZeroMQ context ``fn`` makes starts its I/O threads from there)."""
    return in_netns(ns, fn)


@pytest.mark.netns
@pytest.mark.slow
def test_across_hosts_a_stolen_key_gets_nothing(lab: Any, tmp_path: Path) -> None:
    """Dispatcher (with members 1 and 2) in one namespace, member 3 on another
    "host" over tcp:// with its own key, the attacker on a third with member
    3's key file (stolen) and member 4's (authorized, not running): it cannot
    join as the live member 3, cannot open member 3's heartbeat or bulk
    channel (it does not know the incarnation's token), cannot speak for
    anyone without a HELLO, and hears nothing; traffic still flows."""
    gw, peer_addr, sync_port = "198.18.20.2", "198.18.20.1", 31990
    gw_ports, peer_ports, inside, inside_bind = (31900, 31901), (31930, 31931), \
        ("127.0.0.1", 31910), ("127.0.0.1", 31911)
    procs = Procs(tmp_path)
    endpoints: list[Endpoint] = []
    try:
        ns_d, ns_p, ns_m, ns_f = lab.netns(), lab.netns(), lab.netns(), lab.netns()
        lab.veth(ns_p, ns_d, f"{peer_addr}/24", f"{gw}/24")
        lab.veth(ns_d, ns_m, "198.18.21.1/24", "198.18.21.2/24")
        lab.veth(ns_d, ns_f, "198.18.22.1/24", "198.18.22.2/24")
        keys = tmp_path / "keys"
        for name in ("dispatcher", "member3", "member4"):
            keygen(keys, name)
        authorized = tmp_path / "authorized"
        authorized.mkdir()
        for name in ("member3", "member4"):
            (authorized / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
        conns = grid_connections(2, 2)
        common = {"sync": f"tcp://0.0.0.0:{sync_port}",
                  "curve_server_key": "keys/dispatcher.key"}
        config = tmp_path / "dispatcher.toml"
        config.write_text(gateway_toml(
            address=gw, ports=gw_ports, inside=f"udp:{inside[0]}:{inside[1]}",
            inside_bind=f"{inside_bind[0]}:{inside_bind[1]}", members=2, conns=conns,
            extra={**common, "expect_members": 3, "curve_authorized": "authorized",
                   "curve_secret_key": "keys/dispatcher.key_secret"}))
        disp = procs.start("dispatcher", cli_argv("run", "--config", str(config)), ns=ns_d)
        member_cfg = tmp_path / "member3.toml"
        member_cfg.write_text(gateway_toml(
            address=gw, ports=gw_ports, inside=f"udp:{inside[0]}:{inside[1]}", conns=conns,
            extra={**common, "curve_secret_key": "keys/member3.key_secret"}))
        procs.start("member3", cli_argv("member", "--config", str(member_cfg), "--id", "3",
                                        "--connect", f"tcp://198.18.21.1:{sync_port}"), ns=ns_m)
        wait_status(config, "3 members", lambda s: len(alive_members(s)) == 3
                    and all(m["segments"] for m in s["members"]), timeout=30,
                    diag=lambda: tail(disp.log_path) + tail(tmp_path / "member3.log"))
        gw_ep = Endpoint(inside, inside_bind, ns=ns_d)
        peer_ep = Endpoint(inside, inside_bind, ns=ns_p)
        endpoints += [gw_ep, peer_ep]
        peer_cfg = tmp_path / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=peer_addr, ports=peer_ports, inside=f"udp:{inside[0]}:{inside[1]}",
            inside_bind=f"{inside_bind[0]}:{inside_bind[1]}", conns=conns,
            remote=(gw, gw_ports[0])))
        procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)), ns=ns_p)
        before = wait_status(config, "children up", lambda s: sum(
            m["child_sas"] for m in s["members"]) == 4, timeout=30,
            diag=lambda: tail(disp.log_path))
        d0 = before["dispatcher"]["drops"]
        m3 = next(m for m in before["members"] if m["id"] == 3)
        real_spi = int(esp_sas(sas(config))[0]["spi_in"], 16)

        def attack() -> list[bytes]:
            ctx: zmq.Context[Any] = zmq.Context()
            endpoint = f"tcp://198.18.22.1:{sync_port}"
            server, _ = zmq.auth.load_certificate(str(keys / "dispatcher.key"))
            stolen, borrowed = _key_pair(keys, "member3"), _key_pair(keys, "member4")
            fakes = [Fake(ctx, endpoint, b"member-3", (*stolen, server)),
                     Fake(ctx, endpoint, b"member-3-bulk", (*stolen, server)),
                     Fake(ctx, endpoint, b"member-1", (*borrowed, server))]
            try:
                time.sleep(0.5)
                live, bulk, _borrowed = fakes
                live.say(Hello(3, 1, "fake"))
                for token in (0, 1):
                    bulk.say(Hello(3, 1, "fake", Channel.BULK, m3["sender_id"], token),
                             Hello(3, 1, "fake", Channel.HEARTBEAT, m3["sender_id"],
                                   token))
                for fake in fakes:
                    for claim in (1, 2, 3):
                        fake.say(*every_message(gw_ports, 9, real_spi,
                                                socket.inet_aton(peer_addr), claim))
                time.sleep(3.0)
                return [f for fake in fakes for f in fake.heard()]
            finally:
                for fake in fakes:
                    fake.sock.close(linger=0)
                ctx.term()

        heard = _in_netns(ns_f, attack)
        assert heard == [], f"the attacker was told {len(heard)} frames"
        d = status(config)["dispatcher"]["drops"]
        grown = {k: v - d0.get(k, 0) for k, v in d.items() if v > d0.get(k, 0)}
        assert grown.get("refused_hello_member_alive", 0) >= 1, grown
        assert grown.get("refused_hello_no_incarnation", 0) >= 4, grown
        assert grown.get("refused_hello_wrong_id", 0) >= 1, grown
        assert grown.get("refused_no_hello", 0) >= 3 * 3 * 12, grown
        after = status(config)
        assert [(m["id"], m["pid"], m["sender_id"]) for m in after["members"]] == \
            [(m["id"], m["pid"], m["sender_id"]) for m in before["members"]]
        assert all(m["alive"] for m in after["members"])
        flows = [ch.host_pair() for c in conns for ch in c.children]
        res = exchange_traffic(flows, peer_ep, gw_ep, per_flow=PER_FLOW)
        every = set(range(len(flows)))
        assert res.bad == 0 and res.flows_seen(UP) == every and res.flows_seen(DOWN) == every
    finally:
        for ep in endpoints:
            ep.close()
        procs.close()
