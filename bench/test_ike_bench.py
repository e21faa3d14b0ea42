"""IKE_SA_INIT + IKE_AUTH handshakes per second, in one run (pytest-benchmark).

Run: .venv/bin/pytest bench/test_ike_bench.py -q        (root for part c)

(a) in memory: two IkeEngines back to back (like tests/ike_pair.py), one
    handshake per round with one child SA in IKE_AUTH, fresh engines per round
    (outside the timed part); both sides' CPU, per DH group.
(b) loopback: ``ipsec-cluster peer --ike-sas 200`` against ``ipsec-cluster run``
    (two processes, 127.0.0.2 -> 127.0.0.1, non-standard ports, udp: insides);
    the figure is the peer's own ``handshakes_per_s`` (first initiation to last
    child installed), a fresh gateway per round.
(c) the same peer against strongSwan's charon as the responder, in a network
    namespace pair (tests/lab); skipped with the reason if the lab cannot run.
The last test prints the table with the ratio of (b) to (c).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.harness import configs
from bench.harness.procs import Proc, cli_argv
from common.cluster.spi import SpiAllocator
from common.ike.constants import IdType
from common.ike.context import IkeState
from common.ike.engine import IkeEngine
from common.ike.policy import ChildPolicy, IkePolicy
from common.ike.proposals import parse_esp_proposal, parse_ike_proposal
from common.ike.spis import SegmentSpis
from common.ike.ts import ts_from_cidr

ROOT = Path(__file__).resolve().parent.parent
N_SAS = 200
PROCESS_ROUNDS = 3
MEMORY_ROUNDS = 60
GROUPS = ("ecp256", "curve25519", "modp2048")
PSK = "bench-psk-0123456789abcdef"
#: ("memory", group) -> handshakes/s; ("loopback"|"charon", "ecp256") -> list of runs
RESULTS: dict[tuple[str, str], float] = {}
RUNS: dict[str, list[dict]] = {}  # type: ignore[type-arg]


# -- (a) in memory -----------------------------------------------------------------------


def _policy(local: str, remote: str, group: str, ts: tuple[str, str]) -> IkePolicy:
    child = ChildPolicy("net", [ts_from_cidr(ts[0])], [ts_from_cidr(ts[1])],
                        [parse_esp_proposal("aes128gcm16")])
    return IkePolicy("conn", (IdType.ID_FQDN, local.encode()), (IdType.ID_FQDN, remote.encode()),
                     PSK.encode(), [parse_ike_proposal(f"aes128gcm16-prfsha256-{group}")],
                     children={"net": child})


def _engines(group: str) -> tuple[IkeEngine, IkeEngine]:
    a = IkeEngine([_policy("a.test", "b.test", group, ("10.91.1.0/24", "10.91.2.0/24"))],
                  random=os.urandom, spis=SegmentSpis(SpiAllocator(os.urandom), [1]))
    b = IkeEngine([_policy("b.test", "a.test", group, ("10.91.2.0/24", "10.91.1.0/24"))],
                  random=os.urandom, spis=SegmentSpis(SpiAllocator(os.urandom), [2]))
    return a, b


def handshake(a: IkeEngine, b: IkeEngine) -> int:
    """IKE_SA_INIT + IKE_AUTH (with one child) between a and b; the datagrams."""
    ike_id = a.initiate("conn", ("198.18.0.2", 500), 0.0)
    moved = 0
    for _ in range(8):
        out_a = a.datagrams_to_send()
        for o in out_a:
            b.receive_datagram(o.data, ("198.18.0.1", o.local_port), o.remote[1], 0.0)
        out_b = b.datagrams_to_send()
        for o in out_b:
            a.receive_datagram(o.data, ("198.18.0.2", o.local_port), o.remote[1], 0.0)
        moved += len(out_a) + len(out_b)
        if not out_a and not out_b:
            break
    while a.next_event() is not None or b.next_event() is not None:
        pass
    if a.get(ike_id).state is not IkeState.ESTABLISHED:
        raise AssertionError("handshake did not complete")
    return moved


@pytest.mark.parametrize("group", GROUPS)
def test_memory_handshake(benchmark: Any, group: str) -> None:
    benchmark.group = "ike-handshake-memory"
    pair: list[tuple[IkeEngine, IkeEngine]] = []

    def setup() -> tuple[tuple[object, ...], dict[str, object]]:
        pair[:] = [_engines(group)]
        return (), {}

    def target() -> None:
        handshake(*pair[0])
    benchmark.pedantic(target, setup=setup, rounds=MEMORY_ROUNDS, warmup_rounds=3)
    RESULTS[("memory", group)] = 1.0 / benchmark.stats.stats.median


# -- (a') in memory with certificates ----------------------------------------------------
#: our certificate auth (both sides sign and verify; RFC 7427, chain checks)
CERT_KINDS = ("p256", "rsa3072")


def _cert_engines(kind: str) -> tuple[IkeEngine, IkeEngine]:
    from datetime import UTC, datetime

    from common.ike.certs import TrustAnchors, load_credential
    from tests.pki import make_ca, make_cert

    ca = make_ca()
    a, b = _engines("ecp256")
    for e, me in ((a, "a.test"), (b, "b.test")):
        leaf = make_cert(ca, f"CN={me}", kind, sans=(f"@{me}",))
        pol = e.policies["conn"]
        pol.local_auth = pol.remote_auth = "pubkey"
        pol.credential = load_credential(leaf.cert_pem, leaf.key_pem)
        pol.anchors = TrustAnchors((ca.cert,))
        e.ctx.options.utc_now = lambda: datetime.now(UTC)
    return a, b


@pytest.mark.parametrize("kind", CERT_KINDS)
def test_memory_handshake_certificates(benchmark: Any, kind: str) -> None:
    benchmark.group = "ike-handshake-memory"
    pair: list[tuple[IkeEngine, IkeEngine]] = []
    template = _cert_engines(kind)  # keys made once (RSA-3072 generation is slow)

    def setup() -> tuple[tuple[object, ...], dict[str, object]]:
        a, b = _engines("ecp256")
        for new, old in ((a, template[0]), (b, template[1])):
            new.policies["conn"] = old.policies["conn"]
            new.ctx.options.utc_now = old.ctx.options.utc_now
        pair[:] = [(a, b)]
        return (), {}

    def target() -> None:
        handshake(*pair[0])
    benchmark.pedantic(target, setup=setup, rounds=MEMORY_ROUNDS, warmup_rounds=3)
    RESULTS[("memory-cert", kind)] = 1.0 / benchmark.stats.stats.median


# -- configs for (b) and (c) ----------------------------------------------------------------


#: connection ``c`` as the responder (b.test) sees it
CONN = configs.Conn("c", "b.test", "a.test",
                    (configs.Child("net", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),))


def config(*, address: str, ports: tuple[int, int], inside: str, remote: str | None,
           auth: Mapping[str, Any] | None = None) -> str:
    """The responder's config (``remote`` None), or the initiator's (the
    connection mirrored, initiated to ``remote``); ``auth``: the
    connection's authentication keys (default: the PSK)."""
    conn = replace(CONN, options=auth or {"psk": PSK})
    return configs.gateway_toml(address=address, ports=ports, inside=inside, conns=[conn],
                                psk=None, remote=(remote, ports[0]) if remote else None,
                                log_level="warning", extra={"cookie_threshold": 1000})


def peer_config(address: str, remote: str, ports: tuple[int, int],
                auth: Mapping[str, Any] | None = None) -> str:
    return config(address=address, ports=ports, inside="udp:127.0.0.1:9", remote=remote,
                  auth=auth)


def peer_argv(cfg: Path, *extra: str) -> list[str]:
    return cli_argv("peer", "--config", str(cfg), "--ike-sas", str(N_SAS), "--exit-when-up",
                    "--json", "--timeout", "60", *extra)


def parse_result(stdout: str, stderr: str) -> dict:  # type: ignore[type-arg]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, f"peer printed no result:\n{stdout}\n{stderr[-3000:]}"
    res: dict = json.loads(lines[-1])  # type: ignore[type-arg]
    assert res["ok"], f"peer failed: {res}\n{stderr[-3000:]}"
    return res


# -- (b) loopback: our peer against our gateway ------------------------------------------------


def _free_ports() -> tuple[int, int]:
    for base in range(15500, 16500, 2):
        try:
            for addr in ("127.0.0.1", "127.0.0.2"):
                for port in (base, base + 1):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.bind((addr, port))
            return base, base + 1
        except OSError:
            continue
    raise RuntimeError("no free UDP port pair")


def _wait_bound(addr: str, port: int, proc: Proc) -> None:
    """Until ``proc`` has bound ``addr:port`` (UDP)."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        assert proc.alive(), "gateway exited"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return
        time.sleep(0.05)
    raise AssertionError("gateway did not bind its port")


def _loopback_round(tmp: Path) -> dict:  # type: ignore[type-arg]
    ports = _free_ports()
    gw_cfg, peer_cfg = tmp / "gw.toml", tmp / "peer.toml"
    gw_cfg.write_text(config(address="127.0.0.1", ports=ports, inside="udp:127.0.0.1:9",
                             remote=None))
    peer_cfg.write_text(peer_config("127.0.0.2", "127.0.0.1", ports))
    gw = Proc(cli_argv("run", "--config", str(gw_cfg)), tmp / "gw.log")
    try:
        _wait_bound("127.0.0.1", ports[0], gw)
        proc = subprocess.run(peer_argv(peer_cfg), capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        return parse_result(proc.stdout, proc.stderr)
    finally:
        gw.stop()


def test_loopback_our_peer_vs_our_gateway(benchmark: Any,
                                          tmp_path: Path) -> None:
    benchmark.group = "ike-handshake-processes"
    runs: list[dict] = []  # type: ignore[type-arg]
    benchmark.pedantic(lambda: runs.append(_loopback_round(tmp_path)), rounds=PROCESS_ROUNDS,
                       iterations=1)
    RUNS["loopback"] = runs
    RESULTS[("loopback", "ecp256")] = statistics.median(r["handshakes_per_s"] for r in runs)


# -- (c) our peer against charon in namespaces ------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[object]:
    from tests.lab.netns import Lab, lab_unavailable_reason

    reason = lab_unavailable_reason(need_charon=True)
    if reason is not None:
        pytest.skip(reason)
    lb = Lab(workdir=tmp_path)
    try:
        yield lb
    finally:
        lb.close()


#: charon's per-IP half-open defaults (block_threshold 5, cookie_threshold_ip 3
#: in 5.9) throttle one initiator with 64 handshakes in flight: raised here
CHARON_OPTIONS = {"block_threshold": "1000", "cookie_threshold": "1000",
                  "cookie_threshold_ip": "1000", "init_limit_half_open": "0"}


def _certificates(tmp: Path, kind: str) -> tuple[dict[str, Any], Path]:
    """CA and certificates for a.test (ours) and b.test (charon's) in ``tmp``;
    returns our connection's authentication keys and the folder."""
    from tests.pki import make_ca, make_cert

    ca = make_ca("C=CH, O=Bench, CN=Bench CA", kind)
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    for name in ("a", "b"):
        make_cert(ca, f"C=CH, O=Bench, CN={name}.test", kind,
                  sans=(f"@{name}.test",)).write(tmp, name)
    auth = {"local_auth": "pubkey", "remote_auth": "pubkey", "local_cert": tmp / "a.crt",
            "local_key": tmp / "a.key", "remote_cacerts": [tmp / "ca.crt"]}
    return auth, tmp


def _charon_round(lab: object, tmp: Path, n: int, *extra: str,  # type: ignore[type-arg]
                  kind: str = "") -> dict:
    """One run of the peer against charon; ``kind``: certificates of that key
    type on both sides instead of the PSK."""
    from tests.lab.charon import DEFAULT_PLUGINS, Child, Conn, render_swanctl_conf
    from tests.lab.netns import Lab

    assert isinstance(lab, Lab)
    ns_a, ns_b, _veth = lab.pair()
    # without an address inside its local selector charon (libipsec) answers
    # every CHILD_SA with TS_UNACCEPTABLE
    lab.add_lo_addr(ns_b, "10.91.2.1")
    charon = lab.charon(ns_b, f"charon-{kind}{n}", charon_options=CHARON_OPTIONS,
                        plugins=DEFAULT_PLUGINS + " pkcs8")
    conn = Conn("c", "198.18.0.1", "198.18.0.2",
                [Child("net", "10.91.1.0/24", "10.91.2.0/24")],
                local_id="a.test", remote_id="b.test", psk=PSK).mirrored()
    auth = None
    if kind:
        auth, folder = _certificates(tmp, kind)
        conn.local_auth = conn.remote_auth = "pubkey"
        conn.local_cert, conn.remote_cacerts = "b.crt", "ca.crt"
        charon.add_file("x509", folder / "b.crt")
        charon.add_file("private", folder / "b.key")
        charon.add_file("x509ca", folder / "ca.crt")
    charon.load(render_swanctl_conf(conn))
    cfg = tmp / f"peer-{kind}{n}.toml"
    cfg.write_text(peer_config("198.18.0.1", "198.18.0.2", (500, 4500), auth))
    proc = lab.popen(ns_a, peer_argv(cfg, *extra), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    out, err = proc.communicate(timeout=120)
    res = parse_result(out, err)
    time.sleep(0.5)   # let charon act on INITIAL_CONTACT before counting
    res["charon_ike_sas"] = sum(1 for s in charon.list_sas() if s["state"] == "ESTABLISHED")
    charon.stop()
    return res


def test_charon_our_peer_vs_strongswan(benchmark: Any, lab: object,
                                       tmp_path: Path) -> None:
    benchmark.group = "ike-handshake-processes"
    runs: list[dict] = []  # type: ignore[type-arg]
    benchmark.pedantic(lambda: runs.append(_charon_round(lab, tmp_path, len(runs))),
                       rounds=PROCESS_ROUNDS, iterations=1)
    RUNS["charon"] = runs
    RESULTS[("charon", "ecp256")] = statistics.median(r["handshakes_per_s"] for r in runs)
    # with INITIAL_CONTACT on the first IKE SA only, charon keeps all of them
    assert [r["charon_ike_sas"] for r in runs] == [N_SAS] * len(runs)


@pytest.mark.parametrize("kind", CERT_KINDS)
def test_charon_our_peer_vs_strongswan_certificates(benchmark: Any, lab: object,
                                                    tmp_path: Path, kind: str) -> None:
    benchmark.group = "ike-handshake-processes"
    runs: list[dict] = []  # type: ignore[type-arg]
    benchmark.pedantic(lambda: runs.append(_charon_round(lab, tmp_path, len(runs), kind=kind)),
                       rounds=PROCESS_ROUNDS, iterations=1)
    RUNS[f"charon-{kind}"] = runs
    assert [r["charon_ike_sas"] for r in runs] == [N_SAS] * len(runs)


# -- the table ------------------------------------------------------------------------------


def table() -> str:
    lines = ["| setup | DH group | handshakes/s | ms per handshake |", "|---|---|---|---|"]
    for group in GROUPS:
        rate = RESULTS.get(("memory", group))
        if rate:
            lines.append(f"| in memory, both sides, 1 child | {group} | {rate:.0f} | "
                         f"{1000 / rate:.2f} |")
    for kind in CERT_KINDS:
        rate = RESULTS.get(("memory-cert", kind))
        if rate:
            lines.append(f"| in memory, both sides, 1 child, {kind} certificates | ecp256 | "
                         f"{rate:.0f} | {1000 / rate:.2f} |")
    names = {"loopback": f"our peer -> our gateway, loopback, N={N_SAS}",
             "charon": f"our peer -> charon 5.9.8, netns, N={N_SAS}",
             **{f"charon-{k}": f"our peer -> charon 5.9.8, netns, N={N_SAS}, {k} certificates"
                for k in CERT_KINDS}}
    for key, name in names.items():
        runs = RUNS.get(key)
        if runs:
            rates = sorted(r["handshakes_per_s"] for r in runs)
            lines.append(f"| {name} | ecp256 | {statistics.median(rates):.0f} "
                         f"(runs {', '.join(f'{x:.0f}' for x in rates)}) | "
                         f"{1000 / statistics.median(rates):.2f} |")
    ours, theirs = RESULTS.get(("loopback", "ecp256")), RESULTS.get(("charon", "ecp256"))
    if ours and theirs:
        lines.append(f"\nratio our gateway / charon as responder: {ours / theirs:.2f}x")
    return "\n".join(lines)


def test_zz_print_table(capsys: pytest.CaptureFixture[str]) -> None:
    if not RESULTS:
        pytest.skip("run the whole bench module to get the table")
    with capsys.disabled():
        print("\n\nIKE_SA_INIT + IKE_AUTH handshakes (median)\n" + table())
