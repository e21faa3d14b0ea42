"""The host's own routes and ports are safe from the gateway's configuration and
from local processes (member/routes.py, docs/routing.md "Host routes").

Attacks held here:
- a full-tunnel child (0.0.0.0/0, ::/0) must not replace the host's default
  route, and after SIGTERM the routing tables and rules equal those before;
- a child that covers the peer's address must not swallow our IKE/ESP (the
  gateway's sockets are marked and bypass the cluster's table);
- a crash (SIGKILL) leaves at most our own rules, and the next start removes them;
- a table someone else uses is refused, not flushed;
- a second cluster on the same ports, or another user's socket, cannot bind
  beside ours (no SO_REUSEADDR): one StartupError line, no traceback.
"""

from __future__ import annotations

import difflib
import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop_gw import ROOT, OurProcess, gateway_toml
from tests.lab.netns import Lab

FULL_TUNNEL = [("full4", "10.91.2.0/24", "0.0.0.0/0", "aes128gcm16"),
               ("full6", "fd00:91:2::/64", "::/0", "aes128gcm16"),
               ("host", "198.18.0.2/32", "198.18.0.1/32", "aes128gcm16")]
STOP_TIMEOUT_S = 15.0


def snapshot(lab: Lab, ns: str) -> dict[str, str]:
    out = {}
    for name, argv in (("rules4", ["ip", "-4", "rule"]), ("rules6", ["ip", "-6", "rule"]),
                       ("routes4", ["ip", "-4", "route", "show", "table", "all"]),
                       ("routes6", ["ip", "-6", "route", "show", "table", "all"])):
        out[name] = lab.run(ns, argv).stdout
    return out


def host_pair(lab: Lab) -> tuple[str, str]:
    """Two namespaces; ``b`` (the gateway's) has v4 and v6 default routes via ``a``."""
    ns_a, ns_b, veth = lab.pair()
    for ns, dev, addr in ((ns_a, veth.dev_a, "fd00:18::1/64"), (ns_b, veth.dev_b, "fd00:18::2/64")):
        lab.run(ns, ["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
    lab.run(ns_b, ["ip", "route", "add", "default", "via", "198.18.0.1"])
    lab.run(ns_b, ["ip", "-6", "route", "add", "default", "via", "fd00:18::1"])
    settle(lab, ns_a, ns_b)
    return ns_a, ns_b


def settle(lab: Lab, *namespaces: str) -> None:
    """Wait until the link-local addresses finished DAD (their local routes
    appear then): the snapshots compare our changes, not what was under way."""
    end = time.monotonic() + 10
    while any(lab.run(ns, ["ip", "-6", "addr", "show", "tentative"]).stdout.strip()
              for ns in namespaces) and time.monotonic() < end:
        time.sleep(0.1)


def same(after: dict[str, str], before: dict[str, str]) -> None:
    for key in before:
        diff = "\n".join(difflib.unified_diff(before[key].splitlines(),
                                               after[key].splitlines(), "before", "after",
                                               lineterm=""))
        assert after[key] == before[key], f"{key} changed:\n{diff}"


def _config(mode: str, **kw: object) -> str:
    extra = "members = 2\n" if mode == "cluster" else ""
    return gateway_toml(children=FULL_TUNNEL, extra=extra + str(kw.pop("extra", "")),
                        **kw)  # type: ignore[arg-type]


def _start(lab: Lab, ns: str, text: str, tmp_path: Path, name: str = "gw") -> OurProcess:
    gw = OurProcess(lab, ns, text, tmp_path, name=name)
    gw.wait_ready(timeout=20)
    return gw


def _stop(gw: OurProcess, sig: int = signal.SIGTERM) -> None:
    gw.proc.send_signal(sig)
    try:
        gw.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway did not stop on signal {sig}:\n{gw.log_text()[-3000:]}")


def _route_get(lab: Lab, ns: str, dst: str, *extra: str) -> str:
    family = "-6" if ":" in dst else "-4"
    return lab.run(ns, ["ip", family, "route", "get", dst, *extra]).stdout


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_full_tunnel_leaves_main_table_alone_and_sigterm_restores_all(
        lab: Lab, tmp_path: Path, mode: str) -> None:
    _ns_a, ns = host_pair(lab)
    before = snapshot(lab, ns)
    gw = _start(lab, ns, _config(mode), tmp_path)
    during = snapshot(lab, ns)
    main4 = lab.run(ns, ["ip", "-4", "route", "show", "table", "main"]).stdout
    main6 = lab.run(ns, ["ip", "-6", "route", "show", "table", "main"]).stdout
    assert "default via 198.18.0.1 dev veth0" in main4, main4
    assert "default via fd00:18::1 dev veth0" in main6, main6
    assert "ipsc0" not in main4  # nothing of ours in the main table
    ours4 = lab.run(ns, ["ip", "-4", "route", "show", "table", "220"]).stdout
    ours6 = lab.run(ns, ["ip", "-6", "route", "show", "table", "220"]).stdout
    assert "default dev ipsc0" in ours4 and "198.18.0.1 dev ipsc0" in ours4, ours4
    assert "default dev ipsc0" in ours6, ours6
    assert "not from all fwmark 0x220 lookup 220" in during["rules4"], during["rules4"]
    assert "not from all fwmark 0x220 lookup 220" in during["rules6"], during["rules6"]
    # cleartext (unmarked) goes into the tunnel, even to the peer's own address ...
    assert "dev ipsc0" in _route_get(lab, ns, "192.0.2.1")
    assert "dev ipsc0" in _route_get(lab, ns, "198.18.0.1")
    assert "dev ipsc0" in _route_get(lab, ns, "2001:db8::1")
    # ... our own IKE/ESP (mark 0x220) do not: the main table routes them
    assert "dev veth0" in _route_get(lab, ns, "198.18.0.1", "mark", "0x220")
    assert "via 198.18.0.1 dev veth0" in _route_get(lab, ns, "192.0.2.1", "mark", "0x220")
    assert "dev veth0" in _route_get(lab, ns, "fd00:18::1", "mark", "0x220")
    # decrypted packets (raw sockets' mark 0x221): the LAN's specific routes
    # first, never back into the tunnel by a full-tunnel default route ...
    assert "dev veth0" in _route_get(lab, ns, "198.18.0.7", "mark", "0x221")
    # ... while what only the tunnel routes stays in it (hub and spoke)
    assert "dev ipsc0" in _route_get(lab, ns, "192.0.2.1", "mark", "0x221")
    # decrypted packets written into the TUN device: the same two cases
    lab.run(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    assert "dev veth0" in _route_get(lab, ns, "198.18.0.7", "from", "192.0.2.1", "iif", "ipsc0")
    assert "dev ipsc0" in _route_get(lab, ns, "192.0.2.9", "from", "192.0.2.1", "iif", "ipsc0")
    assert gw.alive()
    _stop(gw)
    assert gw.proc.returncode == 0, gw.log_text()[-3000:]
    same(snapshot(lab, ns), before)


@pytest.mark.netns
def test_crash_leaves_only_our_rules_and_next_start_removes_them(lab: Lab,
                                                                 tmp_path: Path) -> None:
    _ns_a, ns = host_pair(lab)
    before = snapshot(lab, ns)
    gw = _start(lab, ns, _config("single"), tmp_path)
    _stop(gw, signal.SIGKILL)
    after_crash = snapshot(lab, ns)
    # the TUN device went with the process and every route through it
    assert after_crash["routes4"] == before["routes4"]
    assert after_crash["routes6"] == before["routes6"]
    for fam in ("rules4", "rules6"):
        left = set(after_crash[fam].splitlines()) - set(before[fam].splitlines())
        assert left, "SIGKILL cannot remove rules; the test must see them"
        assert all(line.split(":")[0] in ("219", "220") for line in left), left
        assert set(before[fam].splitlines()) <= set(after_crash[fam].splitlines())
    gw2 = _start(lab, ns, _config("single"), tmp_path, name="gw2")
    assert "removing a rule left by an earlier run" in gw2.log_text()
    rules = lab.run(ns, ["ip", "-4", "rule"]).stdout
    assert rules.count("lookup 220") == 1 and rules.count("suppress_prefixlength") == 2, rules
    _stop(gw2)
    same(snapshot(lab, ns), before)


@pytest.mark.netns
def test_a_table_in_use_is_refused_not_flushed(lab: Lab, tmp_path: Path) -> None:
    _ns_a, ns = host_pair(lab)
    lab.run(ns, ["ip", "route", "add", "203.0.113.0/24", "via", "198.18.0.1", "table", "220"])
    before = snapshot(lab, ns)
    gw = OurProcess(lab, ns, _config("single"), tmp_path)
    gw.proc.wait(STOP_TIMEOUT_S)
    log = gw.log_text()
    assert gw.proc.returncode == 2, log
    assert "Traceback" not in log
    assert "routing table 220 is in use" in log and "cluster.route_table" in log, log
    same(snapshot(lab, ns), before)
    # another table number works beside it; strict reverse-path filtering
    # would drop the peer's packets (its address is in our table): a warning
    lab.run(ns, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"])
    gw2 = _start(lab, ns, _config("single", extra="route_table = 1220\n"), tmp_path, "gw2")
    assert "default dev ipsc0" in lab.run(ns, ["ip", "route", "show", "table", "1220"]).stdout
    assert "rp_filter = 1 (strict)" in gw2.log_text()
    _stop(gw2)
    same(snapshot(lab, ns), before)


# -- the ports ------------------------------------------------------------------------


def _loopback_ns(lab: Lab) -> str:
    return lab.netns()  # lo up, nothing else


def _udp_gateway(mode: str) -> str:
    extra = "members = 2\n" if mode == "cluster" else ""
    return gateway_toml(address="127.0.0.1", inside="udp:127.0.0.1:9000", extra=extra,
                        children=[("net", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16")])


def _peer_config() -> str:
    return gateway_toml(address="127.0.0.2", remote="127.0.0.1", inside="udp:127.0.0.2:9100",
                        local_id="gw-a.test", remote_id="gw-b.test",
                        children=[("net", "10.91.1.0/24", "10.91.2.0/24", "aes128gcm16")])


def _second_run(lab: Lab, ns: str, config: Path) -> subprocess.CompletedProcess[str]:
    """The same configuration from another file: another run directory, so the
    second instance gets as far as binding the ports (with the same file, the
    run directory's check refuses it first: "a cluster already runs")."""
    other = config.with_name("second-" + config.name)
    other.write_text(config.read_text())   # same folder: relative paths still hold
    return lab.run(ns, [sys.executable, "-m", "dispatcher.cli", "run", "--config", str(other)],
                   check=False, cwd=str(ROOT), timeout=30)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_second_instance_on_the_same_ports_is_refused_and_first_keeps_traffic(
        lab: Lab, tmp_path: Path, mode: str) -> None:
    ns = _loopback_ns(lab)
    first = _start(lab, ns, _udp_gateway(mode), tmp_path)
    second = _second_run(lab, ns, first.config)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert lines[0].startswith("ipsec-cluster: cannot bind UDP 127.0.0.1:500: "
                               "the port is already in use by pid "), lines[0]
    assert f"pid {first.proc.pid} (" in lines[0], (lines[0], first.proc.pid)
    assert first.alive()
    # the first still answers IKE: our initiator brings an IKE SA up with it
    peer_conf = tmp_path / "peer.toml"
    peer_conf.write_text(_peer_config())
    peer = lab.run(ns, [sys.executable, "-m", "dispatcher.cli", "peer", "--config",
                        str(peer_conf), "--ike-sas", "1", "--exit-when-up", "--timeout", "15"],
                   check=False, cwd=str(ROOT), timeout=40)
    assert peer.returncode == 0, f"{peer.stdout}\n{peer.stderr}\n{first.log_text()[-3000:]}"
    _stop(first)


@pytest.mark.netns
def test_address_not_on_this_host_is_one_line(lab: Lab, tmp_path: Path) -> None:
    ns = _loopback_ns(lab)
    config = tmp_path / "gw.toml"
    config.write_text(gateway_toml(address="198.51.100.9", inside="udp:127.0.0.1:9000"))
    res = _second_run(lab, ns, config)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == ("ipsec-cluster: cannot bind UDP 198.51.100.9:500: the "
                                  "address is not on this host (add it to an interface or "
                                  "fix cluster.address)"), res.stderr


_BIND_SCRIPT = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)  # another user (nobody)
for opt in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, opt, 1)
    for addr in ("127.0.0.1", "0.0.0.0"):
        try:
            s.bind((addr, 4500))
        except OSError as exc:
            print(opt, addr, exc.errno)
        else:
            print(opt, addr, "BOUND")
    s.close()
"""


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_another_users_socket_cannot_bind_beside_ours(lab: Lab, tmp_path: Path,
                                                      mode: str) -> None:
    ns = _loopback_ns(lab)
    gw = _start(lab, ns, _udp_gateway(mode), tmp_path)
    res = lab.run(ns, [sys.executable, "-c", _BIND_SCRIPT], check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert "BOUND" not in res.stdout, res.stdout
    assert sum(line.endswith(f" {errno.EADDRINUSE}") for line in lines) == 4, res.stdout
    assert gw.alive()
    _stop(gw)


def test_bind_error_lines() -> None:
    from member.routes import bind_error
    exc = OSError(errno.EADDRNOTAVAIL, "x")
    assert "[2001:db8::9]:4500: the address is not on this host" in bind_error(
        "2001:db8::9", 4500, exc)
    assert bind_error("10.0.0.1", 500, OSError(errno.EACCES, "x")).endswith(
        "permission denied (ports below 1024 need root)")
    assert "\n" not in bind_error("10.0.0.1", 500, OSError(errno.EADDRINUSE, "x"))


RULES_SHOWN = """0:\tfrom all lookup local
219:\tfrom all iif ipsc3 [detached] lookup main suppress_prefixlength 0
219:\tfrom all iif eth1 lookup main suppress_prefixlength 0
219:\tfrom all fwmark 0x221 lookup main suppress_prefixlength 0
220:\tnot from all fwmark 0x220 lookup 220
220:\tfrom all lookup 220
221:\tnot from all fwmark 0x220 lookup 220
32766:\tfrom all lookup main
"""


def test_only_our_leftover_rules_are_taken_for_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a crash: our exact rules (an iif one only on a device that is gone
    or on our new one) are removed; strongSwan's ``lookup 220`` and rules at
    other priorities or on live devices are not ours."""
    from member import routes

    monkeypatch.setattr(routes, "ip", lambda *args, check=True: RULES_SHOWN)
    stale = routes.PolicyRoutes("ipsc0")._stale_rules("-4")
    assert stale == [
        ("iif", "ipsc3", "lookup", "main", "suppress_prefixlength", "0", "pref", "219"),
        ("fwmark", "0x221", "lookup", "main", "suppress_prefixlength", "0", "pref", "219"),
        ("not", "fwmark", "0x220", "lookup", "220", "pref", "220"),
    ]
    assert [r[:2] for r in routes.PolicyRoutes("eth1")._stale_rules("-4")
            if r[0] == "iif"] == [("iif", "ipsc3"), ("iif", "eth1")]
    assert routes.PolicyRoutes("ipsc0", table=100, mark=7)._stale_rules("-4") == []


def test_proc_net_udp_addresses() -> None:
    from member.routes import _proc_address

    assert _proc_address("0100007F") == bytes([127, 0, 0, 1])
    assert _proc_address("00000000000000000000000000000000") == bytes(16)
    assert _proc_address("0000000000000000FFFF00000100007F") == bytes([127, 0, 0, 1])
    assert _proc_address("B80D0120000000000000000001000000") == bytes.fromhex(
        "20010db8000000000000000000000001")
