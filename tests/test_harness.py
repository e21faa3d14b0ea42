"""The harness itself (bench/harness/): the TOML writer and the config
builders against tomllib and the product's config parser, the packet
builders against scapy, the process launcher's stop and die-with-parent,
and the control client against a fake control socket."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from bench.harness import configs, packets
from bench.harness.control import ControlClient, ControlError, ControlTimeout
from bench.harness.procs import Proc, Procs, pid_alive, python_argv, run_coro, stop_groups
from common.cluster.events import Event, EventType
from common.config import load_config
from common.packets import TrafficTemplate
from tests.fuzz import fuzz_settings

# -- the TOML writer -----------------------------------------------------------------------


@fuzz_settings(200)
@given(text=st.text(), name=st.text(min_size=1))
def test_any_string_and_key_round_trip(text: str, name: str) -> None:
    doc = configs.dumps({"t": {name: text, "list": [text, name]}})
    assert tomllib.loads(doc) == {"t": {name: text, "list": [text, name]}}


def test_values_tables_and_inline_tables() -> None:
    data: dict[str, Any] = {
        "top": 1, "flag": False, "big": -(2 ** 63), "f": 0.1, "path": Path("/a b/c"),
        "skipped": None,
        "cluster": {"address": "127.0.0.1", "quote": 'say "hi"\\ \n\t\x00\x7f é',
                    "arr": [1, 2.5, "x", [True], {"k": "v", "n": None}]},
        "connections": {"a-b": {"psk": "p", "children": {"net.x": {"ts": []}}}},
        "empty": {},
    }
    doc = configs.dumps(data)
    back = tomllib.loads(doc)
    assert back["top"] == 1 and back["flag"] is False and back["big"] == -(2 ** 63)
    assert back["f"] == 0.1 and back["path"] == "/a b/c" and "skipped" not in back
    assert back["cluster"]["quote"] == data["cluster"]["quote"]
    assert back["cluster"]["arr"] == [1, 2.5, "x", [True], {"k": "v"}]
    assert back["connections"] == {"a-b": {"psk": "p", "children": {"net.x": {"ts": []}}}}
    assert back["empty"] == {}
    assert "[connections]" not in doc            # only sub-tables: no header of its own
    assert '[connections.a-b.children."net.x"]' in doc
    assert "[cluster]\n" in doc


def test_special_floats_and_refusals() -> None:
    back = tomllib.loads(configs.dumps({"a": math.inf, "b": -math.inf, "c": math.nan}))
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"])
    with pytest.raises(TypeError):
        configs.dumps({"a": object()})
    with pytest.raises(TypeError):
        configs.dumps({"a": [None]})


# -- the config builders -------------------------------------------------------------------


def test_cluster_and_peer_configs_mirror_each_other() -> None:
    conns = configs.grid_connections(2, 3)
    gw = configs.gateway_toml(address="127.0.0.1", ports=(5000, 5001),
                              inside="udp:127.0.0.1:5002", inside_bind="127.0.0.1:5003",
                              members=3, conns=conns, psk="harness-psk-0123456789",
                              extra={"dead_after": 9})
    peer = configs.gateway_toml(address="127.0.0.2", ports=(6000, 6001),
                                inside="udp:127.0.0.1:6002", conns=conns,
                                psk="harness-psk-0123456789", remote=("127.0.0.1", 5000))
    g, p = load_config(gw, "gw.toml"), load_config(peer, "peer.toml")
    assert g.cluster.members == 3 and g.cluster.dead_after == 9 and g.cluster.ike_port == 5000
    assert sorted(g.connections) == sorted(p.connections) == ["k0", "k1"]
    for name, gc in g.connections.items():
        pc = p.connections[name]
        assert (gc.local_id, gc.remote_id) == (pc.remote_id, pc.local_id)
        assert gc.remote_addrs == ()   # %any
        assert [str(a) for a in pc.remote_addrs] == ["127.0.0.1"] and pc.remote_port == 5000
        for child, gch in gc.children.items():
            pch = pc.children[child]
            assert gch.local_nets == pch.remote_nets and gch.remote_nets == pch.local_nets
            assert [x.text for x in gch.esp_proposals] == [x.text for x in pch.esp_proposals]
            assert (gch.start_action, pch.start_action) == ("none", "start")
    k1 = tomllib.loads(gw)["connections"]["k1"]["children"]
    assert [k1[c]["esp_proposals"][0] for c in ("c0", "c1", "c2")] == \
        ["aes128ctr-sha256", "aes256gcm16", "aes128gcm16"]


def test_strongswan_gateway_and_single_child() -> None:
    kids = [configs.Child("many", ["10.91.2.0/24", "10.70.0.1/32"], "10.91.1.0/24")]
    text = configs.dumps(configs.strongswan_gateway(psk="p-0123456789abcdef", children=kids,
                                                    extra={"members": 2}))
    cfg = load_config(text, "gw.toml")
    conn = cfg.connections["a-b"]
    assert cfg.cluster.members == 2 and conn.remote_port == 500 and conn.dpd_delay == 10
    assert len(conn.children["many"].local_nets) == 2
    assert conn.children["many"].rekey_time == 3600
    one = load_config(configs.single_child_config(psk="p-0123456789abcdef"), "one.toml")
    assert list(one.connections["a-b"].children) == ["net"]
    assert "esp_proposals" not in configs.single_child_config(psk="x")


def test_pools_and_a_connections_fragment() -> None:
    rw = configs.Conn("rw", "gw.test", "%any", (configs.Child("net", "10.91.2.0/24",
                                                               "10.3.0.0/16"),),
                      options={"pools": ["rw"], "dpd_delay": 0})
    doc = configs.dumps(configs.gateway_config(
        {"address": "198.18.0.2", "inside": "tun:ipsc0"}, [rw], psk="p-0123456789abcdef",
        pools={"rw": {"addrs": "10.3.0.0/16", "dns": ["10.91.2.53"]}}))
    cfg = load_config(doc, "gw.toml")
    assert str(cfg.pools["rw"].addrs) == "10.3.0.0/16"
    assert cfg.connections["rw"].pools == ("rw",) and cfg.connections["rw"].dpd_delay == 0
    assert "pools" not in tomllib.loads(configs.dumps(configs.gateway_config(
        {"address": "198.18.0.2"}, [rw], psk="x")))
    # a second connection as text added to a whole config: its own psk and peer
    out = configs.Conn("out", "gw.test", "r.test",
                       (configs.Child("o1", "10.60.1.0/24", "10.60.2.0/24"),))
    fragment = configs.dumps({"connections": configs.connections(
        [out], psk="other-psk-0123456789", remote_addrs="127.0.0.3", remote_port=5000,
        start_action=None)})
    assert fragment.startswith("[connections.out]\n") and "start_action" not in fragment
    both = load_config(doc + fragment, "gw.toml").connections
    assert sorted(both) == ["out", "rw"]
    assert both["out"].psk == b"other-psk-0123456789" and both["out"].remote_port == 5000
    assert [str(a) for a in both["out"].remote_addrs] == ["127.0.0.3"]


def test_child_host_pair() -> None:
    assert configs.Child("c", "10.200.0.16/28", "10.100.0.16/28").host_pair() == \
        ("10.200.0.17", "10.100.0.17")
    assert configs.first_host("10.1.2.3/32") == "10.1.2.3"


# -- packets ---------------------------------------------------------------------------------


def _checksums_right(pkt: Any, layers: tuple[Any, ...]) -> None:
    rebuilt = pkt.__class__(bytes(pkt))
    for layer in layers:
        del rebuilt[layer].chksum
    again = pkt.__class__(bytes(rebuilt))
    for layer in layers:
        assert pkt[layer].chksum == again[layer].chksum, layer


@pytest.mark.parametrize("size", [0, 1, 33, 1200])
def test_whole_packets_have_the_checksums_scapy_computes(size: int) -> None:
    payload = bytes(range(256)) * 5
    payload = payload[:size]
    udp4 = packets.udp4_packet("10.0.0.1", "10.0.0.2", 1000, 2000, payload, ident=70000)
    _checksums_right(IP(udp4), (IP, UDP))
    assert packets.parse_udp4(udp4) == packets.Udp4("10.0.0.1", "10.0.0.2", 1000, 2000, payload)
    tcp4 = packets.tcp4_packet("10.0.0.1", "10.0.0.2", 1000, 443, payload)
    _checksums_right(IP(tcp4), (IP, TCP))
    echo = packets.icmp4_echo("10.0.0.1", "10.0.0.2", 7, 9, payload)
    _checksums_right(IP(echo), (IP, ICMP))
    assert IP(echo)[ICMP].type == 8 and IP(echo)[ICMP].seq == 9
    udp6 = packets.udp6_packet("2001:db8::1", "2001:db8::2", 1000, 2000, payload)
    _checksums_right(IPv6(udp6), (UDP,))


def test_parse_udp4_refuses_broken_packets() -> None:
    good = packets.udp4_packet("10.0.0.1", "10.0.0.2", 1, 2, b"payload")
    for i in (10, 26, 30):                     # header checksum, UDP checksum, payload
        bad = bytearray(good)
        bad[i] ^= 1
        assert packets.parse_udp4(bytes(bad)) is None
    assert packets.parse_udp4(good[:-1]) is None
    assert packets.parse_udp4(packets.tcp4_packet("10.0.0.1", "10.0.0.2", 1, 2)) is None


def test_pieces() -> None:
    opts = packets.ipv4("10.0.0.1", "10.0.0.2", packets.UDP, packets.ports(1, 2), ihl=7,
                        frag=0x2000 | 5)
    assert opts[0] == 0x47 and len(opts) == 28 + 8 and opts[28:30] == b"\x00\x01"
    assert IP(opts).frag == 5 and IP(opts).flags == "MF"
    six = packets.ipv6("2001:db8::1", "2001:db8::2", 0, packets.ext6(44, 6)
                       + packets.frag6(packets.UDP, 100, more=True, ident=9) + bytes(8))
    frag = IPv6(six)
    assert frag.plen == 8 + 8 + 8 and frag.nh == 0
    with pytest.raises(ValueError):
        packets.ext6(17, 5)
    assert packets.icmp(8, 0) == bytes([8, 0]) + bytes(6)


def test_traffic_template_mark_and_size() -> None:
    tpl = TrafficTemplate("10.0.0.1", "10.0.0.2", 1, 2, 64, mark=b"TEST")
    pkt = tpl.packet(5)
    assert pkt[28:32] == b"TEST" and packets.parse_udp4(pkt) is not None
    with pytest.raises(ValueError):
        TrafficTemplate("10.0.0.1", "10.0.0.2", 1, 2, 64, mark=b"LONGER")
    with pytest.raises(ValueError):
        TrafficTemplate("10.0.0.1", "10.0.0.2", 1, 2, 35)


# -- processes --------------------------------------------------------------------------------

#: a process that ignores SIGTERM, with a child in its group that does too
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print("child", child.pid, flush=True)
print("to stderr", file=sys.stderr, flush=True)
time.sleep(60)
"""


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_stop_ends_the_whole_group_with_sigkill_after_the_grace(tmp_path: Path) -> None:
    with Procs(tmp_path) as procs:
        p = procs.start("stubborn", [sys.executable, "-c", STUBBORN])
        _wait(lambda: "to stderr" in p.log_text() and "child" in p.log_text())
        child = int(p.log_text().split("child ")[1].split()[0])
        t0 = time.monotonic()
        assert p.stop(grace_s=0.5)
        assert 0.4 < time.monotonic() - t0 < 5
        assert not p.alive() and not p.group_alive() and not pid_alive(child)
        assert p.returncode == -signal.SIGKILL


def test_procs_close_reports_and_logs(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    quick = procs.start("quick", python_argv("this_module_does_not_exist"))
    assert quick.wait(10) == 1
    assert "No module named" in quick.log_text()
    piped = procs.start("piped", [sys.executable, "-c", "print('out'); import sys; "
                                  "print('err', file=sys.stderr)"], stdout_pipe=True, text=True)
    assert piped.proc.stdout is not None and piped.proc.stdout.read() == "out\n"
    piped.wait(10)
    assert piped.log_text() == "err\n"
    env = procs.start("env", [sys.executable, "-c", "import os; print(os.environ['HARNESS_X'])"],
                      env={"HARNESS_X": "42"})
    env.wait(10)
    assert env.log_text() == "42\n"
    assert len(procs) == 3
    assert procs.close() == [] and len(procs) == 0


PARENT = """
import sys, time
from pathlib import Path
from bench.harness.procs import Proc
p = Proc([sys.executable, "-c", "import time; time.sleep(60)"], Path(sys.argv[1]))
print(p.pid, flush=True)
time.sleep(60)
"""


def test_a_proc_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    parent = Proc([sys.executable, "-c", PARENT, str(tmp_path / "child.log")],
                  tmp_path / "parent.log", env={"PYTHONPATH": str(Path.cwd())})
    try:
        _wait(lambda: parent.log_text().strip().isdigit())
        child = int(parent.log_text())
        assert pid_alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        _wait(lambda: not pid_alive(child), timeout=5)
    finally:
        parent.stop(0.5)


def test_stop_groups_stops_popens_started_elsewhere(tmp_path: Path) -> None:
    """The lab's processes are plain Popens in their own sessions: the same
    stop (SIGTERM, the grace, SIGKILL to the group) ends them and their children."""
    meek = subprocess.Popen(["sleep", "60"], start_new_session=True)
    with (tmp_path / "stubborn.log").open("wb") as log:
        stubborn = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    _wait(lambda: "to stderr" in (tmp_path / "stubborn.log").read_text())
    child = int((tmp_path / "stubborn.log").read_text().split("child ")[1].split()[0])
    t0 = time.monotonic()
    assert stop_groups([meek, stubborn], grace_s=0.5) == []
    assert 0.4 < time.monotonic() - t0 < 5
    assert meek.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL
    assert not pid_alive(child)
    assert stop_groups([meek]) == []           # already gone: nothing to do


def test_run_coro_returns_the_value_on_the_products_loop() -> None:
    async def go() -> tuple[str, int]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__, 7

    module, value = run_coro(go())
    assert value == 7 and module.startswith("uvloop")


# -- the control client ------------------------------------------------------------------------


class FakeControl:
    """A REP socket answering with ``answer(request)``; None: no answer (the
    request is swallowed and the socket made anew, as a stuck server)."""

    def __init__(self, endpoint: str,
                 answer: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        self.endpoint, self.answer = endpoint, answer
        self.requests: list[dict[str, Any]] = []
        self.ctx = zmq.Context()
        self.stopping = False
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        sock = self._bind()
        try:
            while not self.stopping:
                if not sock.poll(50):
                    continue
                data = sock.recv()
                # the bare words, as the product takes them
                req = {"cmd": data.decode()} if data in (b"status", b"sas") else json.loads(data)
                self.requests.append(req)
                reply = self.answer(req)
                if reply is None:
                    sock.close(linger=0)
                    sock = self._bind()
                    continue
                sock.send(json.dumps(reply).encode())
        finally:
            sock.close(linger=0)

    def _bind(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.REP)
        sock.bind(self.endpoint)
        self.ready.set()
        return sock

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.ctx.term()


EVENTS = [Event(EventType.MEMBER_JOINED, member=1, sender_id=7),
          Event(EventType.MEMBER_DEAD, member=2, reason="missed heartbeats"),
          Event(EventType.TAKEOVER, member=1, dead=2, segments=(3, 4)),
          Event(EventType.SEGMENTS_MOVED, epoch=5, segments=(3, 4))]


def _events_answer(req: dict[str, Any], log: list[Event], first: int = 1,
                   limit: int = 2) -> dict[str, Any]:
    if "since" not in req:   # (the product: only where the next event goes)
        return {"ok": True, "events": [], "next": first + len(log), "dropped": 0}
    # (past the end: from the end, as the product does; ``next`` then is below ``since``)
    since = min(max(int(req["since"]), first), first + len(log))
    out = [{"seq": first + i, "time": 100.0 + i, **e.to_json()}
           for i, e in enumerate(log) if first + i >= since][:limit]
    nxt = out[-1]["seq"] + 1 if out else max(since, first + len(log))
    return {"ok": True, "events": out, "next": nxt, "dropped": 0}


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/control.ipc"


@pytest.fixture
def fake(endpoint: str) -> Iterator[Callable[..., FakeControl]]:
    made: list[FakeControl] = []

    def make(answer: Callable[[dict[str, Any]], dict[str, Any] | None]) -> FakeControl:
        made.append(FakeControl(endpoint, answer))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_request_answers_errors_and_a_fresh_socket_after_a_timeout(
        endpoint: str, fake: Callable[..., FakeControl]) -> None:
    calls = {"n": 0}

    def answer(req: dict[str, Any]) -> dict[str, Any] | None:
        calls["n"] += 1
        if req["cmd"] == "stuck" and calls["n"] == 1:
            return None
        if req["cmd"] == "bad":
            return {"ok": False, "error": "bad: no such thing"}
        return {"ok": True, "echo": req}

    server = fake(answer)
    with ControlClient(endpoint, timeout=0.3) as client:
        with pytest.raises(ControlTimeout):
            client.request("stuck")
        assert client.request("status", timeout=2.0) == {
            "ok": True, "echo": {"cmd": "status"}}
        assert client.request("initiate", ike="k0")["echo"] == {"cmd": "initiate", "ike": "k0"}
        with pytest.raises(ControlError, match="no such thing"):
            client.request("bad")
        assert client.try_request("bad") is None
        assert client.raw(b"sas")["ok"] is True
    assert [r["cmd"] for r in server.requests][:2] == ["stuck", "status"]


def test_no_server_is_a_timeout(endpoint: str) -> None:
    with ControlClient(endpoint, timeout=0.2) as client:
        t0 = time.monotonic()
        with pytest.raises(ControlTimeout):
            client.status()
        assert time.monotonic() - t0 < 2
        assert client.try_request("status") is None


def test_events_are_parsed_and_waited_for(endpoint: str,
                                          fake: Callable[..., FakeControl]) -> None:
    log: list[Event] = []
    fake(lambda req: _events_answer(req, log))
    with ControlClient(endpoint, timeout=2.0) as client:
        got = client.events(0)
        assert got.events == [] and got.next == 1
        log.extend(EVENTS[:3])
        got = client.events(0)
        assert [e.seq for e in got.events] == [1, 2] and got.next == 3
        assert got.events[1].event == EVENTS[1] and got.events[1].time == 101.0
        dead = client.wait_event(lambda e: e.type is EventType.MEMBER_DEAD, timeout=2)
        assert dead.seq == 2 and dead.event.member == 2
        took = client.wait_event(lambda e: e.type is EventType.TAKEOVER, timeout=2)
        assert took.event.segments == (3, 4)

        def later() -> None:
            time.sleep(0.3)
            log.append(EVENTS[3])
        threading.Thread(target=later).start()
        moved = client.wait_event(lambda e: e.type is EventType.SEGMENTS_MOVED, timeout=5)
        assert moved.seq == 4 and moved.event.epoch == 5
        assert client.mark() == 5
        with pytest.raises(TimeoutError, match="no matching event"):
            client.wait_event(lambda e: e.type is EventType.MEMBER_DEAD, timeout=0.3)
        # from the start again: the earlier one is found
        assert client.wait_event(lambda e: e.type is EventType.MEMBER_DEAD, timeout=1,
                                 since=0).seq == 2


def test_a_wait_outlasts_unanswered_requests_and_a_restarted_stream(
        endpoint: str, fake: Callable[..., FakeControl]) -> None:
    log: list[Event] = [EVENTS[0]]
    calls = {"n": 0}
    restarted = {"at": 0}

    def answer(req: dict[str, Any]) -> dict[str, Any] | None:
        calls["n"] += 1
        if calls["n"] <= 2:          # starting: nothing answers yet
            return None
        if restarted["at"] and calls["n"] >= restarted["at"]:
            return _events_answer(req, log[:1] if calls["n"] == restarted["at"] else log)
        return _events_answer(req, log)

    fake(answer)
    with ControlClient(endpoint, timeout=0.2) as client:
        joined = client.wait_event(lambda e: e.type is EventType.MEMBER_JOINED, timeout=5)
        assert joined.seq == 1 and calls["n"] >= 3
        log.extend(EVENTS[1:3])
        assert client.wait_event(lambda e: e.type is EventType.TAKEOVER, timeout=2).seq == 3
        assert client.cursor == 4
        # the gateway starts anew: one event so far (next 2, below our 4): from 1 again
        log[:] = [EVENTS[3], EVENTS[1]]
        restarted["at"] = calls["n"] + 1
        moved = client.wait_event(lambda e: e.type is EventType.SEGMENTS_MOVED, timeout=2)
        assert moved.seq == 1
        assert client.wait_event(lambda e: e.type is EventType.MEMBER_DEAD, timeout=2).seq == 2
        with pytest.raises(TimeoutError, match="exited"):
            client.wait_event(lambda e: False, timeout=5, alive=lambda: False)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no matching event"):
            client.wait_event(lambda e: False, timeout=0.3)
        assert time.monotonic() - t0 < 2


def test_a_wait_with_nobody_answering_times_out_saying_so(endpoint: str) -> None:
    with ControlClient(endpoint, timeout=0.1) as client:
        with pytest.raises(TimeoutError, match="requests not answered"):
            client.wait_event(lambda e: True, timeout=0.5)


def test_the_event_stream_of_a_real_gateway(tmp_path: Path) -> None:
    """The client against the product, root-less on loopback: a single
    gateway started after the client began to wait (requests unanswered
    until it listens), our peer bringing up an SA, a rekey and a terminate
    through the control API, a wait on a gateway that exited, and the same
    client reading the stream of the gateway started anew from its start."""
    from bench.harness.net import free_udp_ports
    from bench.harness.procs import cli_argv

    ports = free_udp_ports(4, ("127.0.0.1", "127.0.0.2"))
    conns = configs.grid_connections(1, 1)
    psk = "harness-events-psk-0123456789abcdef"
    gw_cfg, peer_cfg = tmp_path / "gw.toml", tmp_path / "peer.toml"
    gw_cfg.write_text(configs.gateway_toml(
        address="127.0.0.1", ports=(ports[0], ports[1]), inside="udp:127.0.0.1:9", conns=conns,
        psk=psk, extra={"control": str(tmp_path / "run")}))
    peer_cfg.write_text(configs.gateway_toml(
        address="127.0.0.2", ports=(ports[2], ports[3]), inside="udp:127.0.0.1:9", conns=conns,
        psk=psk, remote=("127.0.0.1", ports[0])))
    run_gw = ["sh", "-c", 'sleep 1; exec "$@"', "sh", *cli_argv("run", "--config", str(gw_cfg))]
    with Procs(tmp_path) as procs, ControlClient(config=gw_cfg, timeout=0.3) as client:
        gw = procs.start("gw", run_gw)
        ready = client.wait_event(lambda e: e.type is EventType.READY, timeout=30,
                                  alive=gw.alive)
        assert (ready.seq, ready.event.peer, ready.event.member) == (1, "127.0.0.1", 0)
        assert abs(ready.time - time.time()) < 30
        before = client.mark()
        assert before == 2
        procs.start("peer", cli_argv("peer", "--config", str(peer_cfg), "--seconds", "60"))
        client.timeout = 5.0
        up = client.wait_event(lambda e: e.type is EventType.CHILD_UP, timeout=30).event
        ike_up = client.wait_event(lambda e: e.type is EventType.IKE_UP, timeout=1, since=before)
        assert ike_up.event.ike_spi == up.ike_spi and len(up.ike_spi) == 16
        assert (up.member, up.conn, up.child, up.peer) == (1, "k0", "c0", "127.0.0.2")
        (m,) = client.sas()["members"]
        (ike,) = m["ike_sas"]
        (child,) = ike["children"]
        assert int(child["spi_in"], 16) == int(up.child_spi, 16)
        assert int(ike["spi"].replace(":", ""), 16) == int(up.ike_spi, 16)

        client.request("rekey", child="c0")
        rekeyed = client.wait_event(lambda e: e.type is EventType.CHILD_REKEYED, timeout=20)
        assert rekeyed.event.child_spi == up.child_spi and rekeyed.event.new_spi
        client.request("terminate", ike="k0")
        down = client.wait_event(lambda e: e.type is EventType.IKE_DOWN, timeout=20).event
        assert down.ike_spi == up.ike_spi and down.reason
        with pytest.raises(TimeoutError, match="no matching event"):
            client.wait_event(lambda e: e.type is EventType.IKE_DOWN, timeout=0.5)
        seen = client.cursor
        assert seen > 5

        assert gw.stop()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="exited"):
            client.wait_event(lambda e: True, timeout=30, alive=gw.alive)
        assert time.monotonic() - t0 < 10
        again = procs.start("gw2", cli_argv("run", "--config", str(gw_cfg)))
        ready = client.wait_event(lambda e: e.type is EventType.READY, timeout=30,
                                  alive=again.alive)
        assert ready.seq == 1 and client.cursor == 2


def test_bad_events_answers_are_errors(endpoint: str,
                                       fake: Callable[..., FakeControl]) -> None:
    answers = iter([
        {"ok": True, "events": [{"seq": 1, "time": 1.0, "type": "no-such-type"}], "next": 2},
        {"ok": True, "events": [{"time": 1.0, "type": "ready"}], "next": 2},
        {"ok": True, "events": "nope", "next": 2},
        {"ok": False, "error": "unknown command 'events'"},
    ])
    fake(lambda req: next(answers))
    with ControlClient(endpoint, timeout=2.0) as client:
        for _ in range(4):
            with pytest.raises(ControlError):
                client.events(0)


def test_a_client_needs_one_address() -> None:
    with pytest.raises(ValueError):
        ControlClient()
    with pytest.raises(ValueError):
        ControlClient("ipc:///x", config="y.toml")
