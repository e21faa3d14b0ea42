"""The control API (docs/operations.md "Control API") against running
gateways, in both modes: the single-process gateway and a 3-member cluster.

On loopback, root-less: the gateway under test G at 127.0.0.1 answers our
peer (``ipsec-cluster peer`` at 127.0.0.2, connection ``c``, traffic through
an echo inside) and initiates connection ``out`` to a responder R (our
single-process gateway at 127.0.0.3) on request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.harness import configs
from bench.harness.procs import run_coro
from common.cluster.stats import ClusterStatus, DispatcherStatus, StatusReport
from common.config import load_config
from dispatcher.control import ControlRelay, answer, parse_request
from dispatcher.supervisor import control_endpoint
from tests.cluster_util import DEAD_AFTER, Proc, Procs, cli_argv, wait_for
from tests.test_peer import _Echo, _free_port_pair, gateway_config, peer_config

ROOT = Path(__file__).resolve().parent.parent
G, PEER, R = "127.0.0.1", "127.0.0.2", "127.0.0.3"


OUT_PSK = "out-psk-0123456789abcdef0123"


def _out(name: str, esp: configs.Selectors, net: int) -> configs.Conn:
    """Connection ``name`` from G to R as G sees it: one child ``{name}1``."""
    return configs.Conn(name, f"{name}.gw.test", "r.test", (
        configs.Child(f"{name}1", f"10.{net}.1.0/24", f"10.{net}.2.0/24", esp),))


def out_conn(ports: tuple[int, int], name: str = "out", esp: str = "aes128gcm16",
             net: int = 60) -> str:
    """G's connection ``name`` to R, as TOML text to add to G's config."""
    return configs.dumps({"connections": configs.connections(
        [_out(name, esp, net)], psk=OUT_PSK, remote_addrs=R, remote_port=ports[0],
        start_action=None)})


def gw_config(ports: tuple[int, int], echo_port: int, members: int) -> str:
    cluster = {"members": members, "dead_after": DEAD_AFTER} if members > 1 else {}
    return gateway_config(ports, echo_port, extra=cluster) + "\n" + out_conn(ports)


def r_config(ports: tuple[int, int]) -> str:
    conns = [_out(name, ["aes128gcm16", "aes128ctr-sha256"], net).mirrored()
             for name, net in (("out", 60), ("new", 61))]
    return configs.gateway_toml(address=R, ports=ports, inside="udp:127.0.0.1:9", conns=conns,
                                psk=OUT_PSK, log_level=None)


def ctl(config: Path, *args: str, ok: bool = True) -> dict[str, Any]:
    """``ipsec-cluster VERB --config F --json ...``: the answer (or the error line)."""
    proc = subprocess.run(cli_argv(*args[:1], "--config", str(config), "--json", *args[1:]),
                          capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    if not ok:
        assert proc.returncode == 2, proc.stdout
        return {"error": proc.stderr.strip()}
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def ask(endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """A request on the control socket itself (JSON in, JSON out)."""
    import zmq

    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        req.connect(endpoint)
        req.send(json.dumps(request).encode())
        reply: dict[str, Any] = json.loads(req.recv())
        return reply
    finally:
        req.close(linger=0)


def ike_sas(answer: dict[str, Any], name: str | None = None) -> list[dict[str, Any]]:
    return [sa for m in answer["members"] for sa in m.get("ike_sas", [])
            if sa["state"] == "ESTABLISHED" and (name is None or sa["name"] == name)]


def esp(answer: dict[str, Any], name: str) -> set[str]:
    return {c["spi_in"] for m in answer["members"] for c in m.get("child_sas", [])
            if c["name"] == name}


@dataclass
class Lab:
    members: int
    ports: tuple[int, int]
    gw_cfg: Path
    r_cfg: Path
    gw: Proc
    r: Proc
    peer: Proc
    echo: _Echo


@pytest.fixture(scope="module", params=[1, 3], ids=["single", "cluster3"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Lab]:
    members: int = request.param
    work = tmp_path_factory.mktemp(f"control{members}")
    procs = Procs(work)
    echo = _Echo()
    echo.start()
    ports = _free_port_pair()
    try:
        gw_cfg, r_cfg, peer_cfg = work / "gw.toml", work / "r.toml", work / "peer.toml"
        gw_cfg.write_text(gw_config(ports, echo.port, members))
        r_cfg.write_text(r_config(ports))
        peer_cfg.write_text(peer_config(ports))
        r = procs.start("r", cli_argv("run", "--config", str(r_cfg)))
        r.wait_ready()
        gw = procs.start("gw", cli_argv("run", "--config", str(gw_cfg)))
        wait_for("the gateway's members", lambda: len(
            [m for m in ctl(gw_cfg, "status")["members"] if m["alive"]]) == members,
            timeout=30, diag=gw.log_text)
        peer = procs.start("peer", cli_argv("peer", "--config", str(peer_cfg), "--traffic",
                                            "50", "--seconds", "600"))
        wait_for("our peer's IKE SA", lambda: len(ike_sas(ctl(gw_cfg, "list-sas"), "c")) >= 1,
                 timeout=30, diag=gw.log_text)
        yield Lab(members, ports, gw_cfg, r_cfg, gw, r, peer, echo)
    finally:
        procs.close()
        echo.stop()


# -- without processes -----------------------------------------------------------------


class _NoBackend:
    def status_report(self) -> StatusReport:
        return StatusReport(ClusterStatus(), DispatcherStatus(), ())

    def connections(self) -> list[dict[str, Any]]:
        return []

    async def ask(self, req: dict[str, Any], *, one: bool = False) -> list[dict[str, Any]]:
        return [{"ok": True, "done": 0}]

    async def reload(self) -> dict[str, Any]:
        return {"ok": False, "error": "x"}


@pytest.mark.parametrize("data,error", [
    (b"\xff", "not JSON"), (b"[1]", "JSON object"), (b'{"cmd": 5}', "JSON object"),
    (b'{"cmd": "nope"}', "unknown command"), (b'{"cmd": "terminate"}', "give one of"),
    (b'{"cmd": "rekey", "ike": "1", "child": "2"}', "give one of"),
    (b'{"cmd": "terminate", "ike": "x"}', "no SA matches"),
    (b"x" * 5000, "at most")])
def test_bad_requests_get_one_line_errors(data: bytes, error: str) -> None:
    result = run_coro(answer(_NoBackend(), data))
    assert result["ok"] is False and error in result["error"]
    assert "\n" not in result["error"]


def test_old_clients_words_still_work() -> None:
    assert parse_request(b"status") == {"cmd": "status"}
    assert parse_request(b"sas") == {"cmd": "sas"}


def test_relay_takes_answers_only_from_members_it_asked() -> None:
    import asyncio

    async def go() -> None:
        relay = ControlRelay()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        req = relay.open({1, 2}, done)
        assert relay.answer(3, req, b'{"ok": true}') == "control_unasked"
        assert relay.answer(1, req + 1, b'{"ok": true}') == "control_unasked"
        assert relay.answer(1, req, b"[]") == "control_not_json"
        assert relay.answer(1, req, b'{"ok": true}') is None
        assert relay.answer(1, req, b'{"ok": true}') == "control_answered"
        assert not done.done()
        assert relay.answer(2, req, b'{"ok": false}') is None
        assert done.done()
        assert set(relay.close(req)) == {1, 2}
        assert relay.answer(1, req, b'{"ok": true}') == "control_unasked"

    run_coro(go())


def test_dispatcher_takes_control_answers_only_from_members_it_asked() -> None:
    """The role check of the new member messages, in the dispatcher itself."""
    import asyncio

    from common.cluster.wire import Control, ControlReq
    from tests.test_hostile_member import _rig, _say

    async def go() -> None:
        d, sent = _rig()
        _say(d, 2, Control(1, b'{"ok": true}'))          # nobody asked
        assert d.drops["refused_control_unasked"] == 1
        _say(d, 2, ControlReq(1, b"{}"))                  # members may not ask
        assert d.drops["refused_wrong_direction"] == 1
        ask = asyncio.ensure_future(d.control({"cmd": "stats"}, one=True, timeout=2))
        await asyncio.sleep(0)
        ((to, req),) = sent.to
        assert to == 1 and isinstance(req, ControlReq)
        _say(d, 2, Control(req.req_id, b'{"ok": true, "done": 9}'))   # not asked
        assert d.drops["refused_control_unasked"] == 2
        _say(d, 1, Control(req.req_id, b"not json"))
        assert d.drops["refused_control_not_json"] == 1
        _say(d, 1, Control(req.req_id, b'{"ok": true, "done": 1}'))
        assert await ask == [{"ok": True, "done": 1, "member": 1}]
        _say(d, 1, Control(req.req_id, b'{"ok": true}'))   # too late: closed
        assert d.drops["refused_control_unasked"] == 3

    run_coro(go())


# -- against running gateways ------------------------------------------------------------


def test_status_and_sas_answer_in_both_modes(lab: Lab) -> None:
    st = ctl(lab.gw_cfg, "status")
    assert st["ok"] is True and len(st["members"]) == lab.members
    assert sum(m["ike_sas"] for m in st["members"]) >= 1
    sas = ctl(lab.gw_cfg, "sas")
    assert len(ike_sas(sas, "c")) >= 1
    text = subprocess.run(cli_argv("status", "--config", str(lab.gw_cfg)), capture_output=True,
                          text=True, timeout=30, cwd=ROOT, check=True).stdout
    assert "cluster 127.0.0.1" in text


def test_list_conns(lab: Lab) -> None:
    conns = {c["name"]: c for c in ctl(lab.gw_cfg, "list-conns")["connections"]}
    assert set(conns) == {"c", "out"}
    assert conns["out"]["remote_addrs"] == [R]
    assert {ch["name"] for ch in conns["c"]["children"]} == {"gcm", "ctr"}


def test_list_sas_shows_owner_timers_and_traffic(lab: Lab) -> None:
    def traffic() -> dict[str, Any] | None:
        sas = ctl(lab.gw_cfg, "list-sas")
        kids = [c for m in sas["members"] for c in m["child_sas"] if c["name"] == "gcm"]
        return sas if kids and all(c["packets_in"] > 0 for c in kids) else None

    sas = wait_for("traffic on the peer's child", traffic, timeout=20)
    sa = ike_sas(sas, "c")[0]
    assert sa["member"] in range(1, lab.members + 1)
    assert sa["age_s"] >= 0 and "rekey_in_s" in sa and len(sa["spi"]) == 16
    child = sa["children"][0]
    assert child["member"] in range(1, lab.members + 1) and child["age_s"] >= 0
    text = subprocess.run(cli_argv("list-sas", "--config", str(lab.gw_cfg)),
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          check=True).stdout
    assert "on member" in text and ", up " in text and "pkts" in text
    st = ctl(lab.gw_cfg, "status")
    assert sum(m["bytes_in"] for m in st["members"]) > 0


def test_initiate_rekey_terminate(lab: Lab) -> None:
    assert ctl(lab.gw_cfg, "initiate", "--ike", "out")["done"] == 1
    def up() -> dict[str, Any] | None:
        s = ctl(lab.gw_cfg, "list-sas")
        return s if ike_sas(s, "out") and esp(s, "out1") else None

    sas = wait_for("IKE SA out", up, timeout=20)
    assert len(ike_sas(ctl(lab.r_cfg, "list-sas"), "out")) == 1
    sa = ike_sas(sas, "out")[0]
    (old_child,) = esp(sas, "out1")
    # rekey the child by its inbound SPI, the IKE SA by its SPI
    assert ctl(lab.gw_cfg, "rekey", "--child", old_child)["done"] == 1
    wait_for("the rekeyed child", lambda: (e := esp(ctl(lab.gw_cfg, "list-sas"), "out1"))
             and old_child not in e, timeout=20)
    assert ctl(lab.gw_cfg, "rekey", "--ike", sa["spi"])["done"] == 1
    wait_for("the rekeyed IKE SA", lambda: [s for s in ike_sas(ctl(lab.gw_cfg, "list-sas"),
                                                                 "out")
                                            if s["spi"] != sa["spi"]], timeout=20)
    # a second child of the same connection, then terminate it by name
    assert ctl(lab.gw_cfg, "initiate", "--child", "out1")["done"] == 1
    wait_for("two out1 children", lambda: len(esp(ctl(lab.gw_cfg, "list-sas"), "out1")) == 2,
             timeout=20)
    assert ctl(lab.gw_cfg, "terminate", "--child", "out1")["done"] == 2
    wait_for("no out1 child", lambda: not esp(ctl(lab.gw_cfg, "list-sas"), "out1"), timeout=20)
    assert ctl(lab.gw_cfg, "terminate", "--ike", "out")["done"] == 1
    wait_for("R without IKE SA out", lambda: not ike_sas(ctl(lab.r_cfg, "list-sas"), "out"),
             timeout=20)
    assert "no SA matches" in ctl(lab.gw_cfg, "terminate", "--ike", "out", ok=False)["error"]
    assert "no connection named" in ctl(lab.gw_cfg, "initiate", "--ike", "nope",
                                        ok=False)["error"]
    assert ike_sas(ctl(lab.gw_cfg, "list-sas"), "c")   # untouched


def test_stats(lab: Lab) -> None:
    stats = ctl(lab.gw_cfg, "stats")
    assert len(stats["members"]) == lab.members
    assert sum(m["ike_sas"] for m in stats["members"]) >= 1
    assert sum(m["counters"].get("ike_in", 0) for m in stats["members"]) > 0


def test_reload_add_change_remove_keeps_the_busy_connection(lab: Lab) -> None:
    before = ctl(lab.gw_cfg, "list-sas")
    spis_c = esp(before, "gcm") | esp(before, "ctr")
    assert spis_c
    ctl(lab.gw_cfg, "initiate", "--ike", "out")
    wait_for("IKE SA out", lambda: ike_sas(ctl(lab.r_cfg, "list-sas"), "out"), timeout=20)
    original = lab.gw_cfg.read_text()
    endpoint = control_endpoint(load_config(original, str(lab.gw_cfg)), str(lab.gw_cfg))
    # add "new", change "out" (another ESP proposal)
    changed = original.replace(out_conn(lab.ports), out_conn(lab.ports, esp="aes128ctr-sha256"))
    assert changed != original
    lab.gw_cfg.write_text(changed + out_conn(lab.ports, "new", net=61))
    result = ctl(lab.gw_cfg, "reload")
    assert (result["added"], result["changed"], result["removed"]) == (["new"], ["out"], [])
    wait_for("R: the changed connection's IKE SA gone",
             lambda: not ike_sas(ctl(lab.r_cfg, "list-sas"), "out"), timeout=20)
    assert {c["name"] for c in ctl(lab.gw_cfg, "list-conns")["connections"]} == {
        "c", "out", "new"}
    assert ctl(lab.gw_cfg, "initiate", "--ike", "new")["done"] == 1
    wait_for("IKE SA new", lambda: ike_sas(ctl(lab.r_cfg, "list-sas"), "new"), timeout=20)
    # its child is carried (in the cluster maybe by another member: the
    # dispatcher's role check knows the new connection's selectors)
    wait_for("child new1", lambda: esp(ctl(lab.gw_cfg, "list-sas"), "new1"), timeout=20)
    # a bad config is refused, the running one stays
    # a bad config is refused by the gateway (the CLI would refuse it first)
    lab.gw_cfg.write_text(changed + "\n[connections.bad\n")
    reply = ask(endpoint, {"cmd": "reload"})
    assert reply["ok"] is False and "gw.toml" in reply["error"] and "\n" not in reply["error"]
    assert "gw.toml" in ctl(lab.gw_cfg, "reload", ok=False)["error"]
    lab.gw_cfg.write_text(changed + out_conn(lab.ports, "new", net=61))
    assert len(ctl(lab.gw_cfg, "list-conns")["connections"]) == 3
    # remove "new" (its IKE SA goes) and "out"
    lab.gw_cfg.write_text(original.split("\n[connections.out]")[0])
    result = ctl(lab.gw_cfg, "reload")
    assert sorted(result["removed"]) == ["new", "out"]
    wait_for("R: the removed connection's IKE SA gone",
             lambda: not ike_sas(ctl(lab.r_cfg, "list-sas"), "new"), timeout=20)
    after = ctl(lab.gw_cfg, "list-sas")
    assert esp(after, "gcm") | esp(after, "ctr") == spis_c   # the same SPIs: untouched
    lab.gw_cfg.write_text(original)
    assert ctl(lab.gw_cfg, "reload")["added"] == ["out"]


def test_sighup_reloads(lab: Lab) -> None:
    original = lab.gw_cfg.read_text()
    lab.gw_cfg.write_text(original + out_conn(lab.ports, "hup", net=62))
    try:
        os.kill(lab.gw.pid, signal.SIGHUP)
        wait_for("the SIGHUP reload", lambda: "hup" in {
            c["name"] for c in ctl(lab.gw_cfg, "list-conns")["connections"]}, timeout=10)
        assert lab.gw.alive()
    finally:
        lab.gw_cfg.write_text(original)
        os.kill(lab.gw.pid, signal.SIGHUP)


def test_sigterm_deletes_every_ike_sa_first(lab: Lab) -> None:
    """Last: stops the gateway. R learns at once, not by DPD."""
    ctl(lab.gw_cfg, "initiate", "--ike", "out")
    wait_for("IKE SA out", lambda: ike_sas(ctl(lab.r_cfg, "list-sas"), "out"), timeout=20)
    os.kill(lab.gw.pid, signal.SIGTERM)   # the dispatcher only, as systemd's KillMode=mixed
    start = time.monotonic()
    wait_for("R without IKE SA out", lambda: not ike_sas(ctl(lab.r_cfg, "list-sas"), "out"),
             timeout=5, interval=0.1)
    assert time.monotonic() - start < 5
    lab.gw.proc.wait(15)
    assert "deleted with their peers" in lab.gw.log_text() or \
        "deleting" in lab.gw.log_text()


def test_start_action_start_initiates_on_run(tmp_path: Path) -> None:
    """``run`` with a start_action = "start" child brings it up by itself."""
    ports = _free_port_pair()
    procs = Procs(tmp_path)
    try:
        r_cfg, gw_cfg = tmp_path / "r.toml", tmp_path / "gw.toml"
        r_cfg.write_text(r_config(ports))
        gw_cfg.write_text(configs.dumps(configs.gateway_config(
            configs.cluster_table(address=PEER, ports=ports, inside="udp:127.0.0.1:9",
                                  log_level=None),
            [_out("out", "aes128gcm16", 60)], psk=OUT_PSK, remote_addrs=R,
            remote_port=ports[0], start_action="start")))
        procs.start("r", cli_argv("run", "--config", str(r_cfg))).wait_ready()
        procs.start("gw", cli_argv("run", "--config", str(gw_cfg)))
        wait_for("IKE SA out", lambda: ike_sas(ctl(r_cfg, "list-sas"), "out"), timeout=20)
    finally:
        procs.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
