"""Helpers for the process-level failover tests (tests/test_failover_*.py).

Built on tests/cluster_util.py (configs, ``Procs``, ``status``/``sas``,
``EspProxy``): a root-less 3-member cluster on loopback whose ``udp:`` inside
is our inner echo (``python -m dispatcher.peer echo``) or a test ``Endpoint``, our
peer (``ipsec-cluster peer``) behind an ESP-recording relay, and the moves a
failover test makes: kill a member with SIGKILL, wait for the supervisor's
restart, the autobalance, a takeover.

- ``TimedProxy`` is ``EspProxy`` plus arrival times of every ESP packet (both
  ways) and, on request, the raw bytes of what the peer sent (to replay it);
- ``Rig`` holds one running setup; ``start_rig`` makes it;
- ``peer_json`` reads our peer's one JSON result line from its log.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.control import ControlClient
from bench.harness.procs import python_argv
from tests.cluster_util import (
    ConnSpec,
    Endpoint,
    EspProxy,
    EspRecord,
    Proc,
    Procs,
    alive_members,
    cli_argv,
    gateway_toml,
    grid_connections,
    pid_alive,
    tail,
    wait_assigned,
    wait_for,
)

GW, PEER, PROXY = "127.0.0.1", "127.0.0.2", "127.0.0.3"
N_MEMBERS = 3
SEGMENTS = 256


class TimedProxy(EspProxy):
    """``EspProxy`` that also keeps the arrival time of every ESP record
    (``t_to_cluster``/``t_to_peer``, parallel to ``to_cluster``/``to_peer``)
    and, with ``keep_raw``, the raw datagrams towards the cluster."""

    def __init__(self, *args: Any, keep_raw: bool = False, **kw: Any) -> None:
        self.keep_raw = keep_raw
        self.t_to_cluster: list[float] = []
        self.t_to_peer: list[float] = []
        self.raw_to_cluster: list[bytes] = []
        super().__init__(*args, **kw)

    def _record(self, data: bytes, into: list[EspRecord], ike: Counter[str],  # type: ignore[override]
                key: str) -> None:
        n = len(into)
        EspProxy._record(data, into, ike, key)
        if len(into) == n:
            return
        if into is self.to_cluster:
            self.t_to_cluster.append(time.monotonic())
            if self.keep_raw:
                self.raw_to_cluster.append(data)
        else:
            self.t_to_peer.append(time.monotonic())

    def longest_silence(self, since: float, until: float) -> float:
        """The longest time in [since, until] without an ESP packet to the peer."""
        ts = [t for t in self.t_to_peer if since <= t <= until]
        points = [since, *ts, until]
        return max(b - a for a, b in itertools.pairwise(points))

    def per_spi_silence(self, since: float, until: float, *,
                        min_packets: int = 5) -> dict[int, float]:
        """For each SPI towards the peer seen in [since, until] (with at least
        ``min_packets``): the longest gap between its packets in that window."""
        by: dict[int, list[float]] = {}
        for r, t in zip(self.to_peer, self.t_to_peer, strict=False):
            if since <= t <= until:
                by.setdefault(r.spi, []).append(t)
        return {spi: max(b - a for a, b in itertools.pairwise(ts))
                for spi, ts in by.items() if len(ts) >= min_packets}


@dataclass
class Rig:
    workdir: Path
    base: int
    procs: Procs
    config: Path
    dispatcher: Proc
    proxy: TimedProxy
    conns: list[ConnSpec]
    peer_config: Path
    peer: Proc | None = None
    echo: Proc | None = None
    endpoints: list[Endpoint] = field(default_factory=list)

    @property
    def gw_ports(self) -> tuple[int, int]:
        return self.base, self.base + 1

    @property
    def gw_inside(self) -> tuple[str, int]:
        return GW, self.base + 10

    @property
    def gw_bind(self) -> tuple[str, int]:
        return GW, self.base + 11

    @property
    def peer_inside(self) -> tuple[str, int]:
        return GW, self.base + 110

    @property
    def peer_bind(self) -> tuple[str, int]:
        return GW, self.base + 111

    def status(self) -> dict[str, Any]:
        return ask(self.config, b"status")

    def sas(self) -> dict[str, Any]:
        """Every member's SAs; asked again while a member did not answer in
        time (a busy machine), at most three times."""
        for _ in range(3):
            answer = ask(self.config, b"sas")
            if not any("error" in m for m in answer["members"]):
                break
        return answer

    def diag(self) -> str:
        out = tail(self.dispatcher.log_path, 6000)
        if self.peer is not None:
            out += "\n" + tail(self.peer.log_path)
        return out

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()
        self.procs.close()
        self.proxy.close()

    # -- the peer ----------------------------------------------------------------------

    def start_peer(self, *args: str) -> Proc:
        self.peer = self.procs.start("peer", cli_argv("peer", "--config", str(self.peer_config),
                                                      "--json", *args))
        return self.peer

    def wait_children(self, n_ike: int, n_child: int, timeout: float = 40) -> dict[str, Any]:
        def up() -> dict[str, Any] | None:
            st = self.status()
            ok = (sum(m["child_sas"] for m in st["members"]) == n_ike * n_child
                  and sum(m["ike_sas"] for m in st["members"]) == n_ike)
            return st if ok else None
        return wait_for(f"{n_ike} IKE SAs, {n_ike * n_child} children up", up,
                        timeout=timeout, diag=self.diag)

    # -- members ----------------------------------------------------------------------

    def member(self, member_id: int, st: dict[str, Any] | None = None) -> dict[str, Any]:
        st = st or self.status()
        return next(m for m in st["members"] if m["id"] == member_id)

    def kill(self, member_id: int) -> dict[str, Any]:
        """SIGKILL a member; returns its status entry from just before."""
        # (on a loaded machine a member may just be being restarted after a
        # false death: wait until it is back)
        m = wait_for(f"member {member_id} alive before the kill",
                     lambda: (x if (x := self.member(member_id))["alive"] else None),
                     timeout=15, diag=self.diag)
        os.kill(m["pid"], signal.SIGKILL)
        return m

    def wait_dead_and_back(self, member_id: int, old_pid: int, *,
                           timeout: float = 20) -> dict[str, Any]:
        """The supervisor started the member again (new pid, alive)."""
        wait_for(f"pid {old_pid} gone", lambda: not pid_alive(old_pid), timeout=5,
                 interval=0.05)

        def back() -> dict[str, Any] | None:
            m = self.member(member_id)
            return m if m["alive"] and m["pid"] not in (0, old_pid) else None
        return wait_for(f"member {member_id} restarted", back, timeout=timeout,
                        interval=0.1, diag=self.diag)

    def wait_balanced(self, *, timeout: float = 20, tolerance: int = 15) -> dict[str, Any]:
        """Every member alive with about a third of the segments again (the
        tolerance: after overlapping rejoins the autobalance may stop at e.g.
        96/75/85, see the report of the failover tests)."""
        share = SEGMENTS // N_MEMBERS

        def balanced() -> dict[str, Any] | None:
            st = self.status()
            ms = st["members"]
            ok = (len(alive_members(st)) == N_MEMBERS
                  and all(m["segments"] >= share - tolerance for m in ms))
            return st if ok else None
        return wait_for("segments balanced again", balanced, timeout=timeout, interval=0.2,
                        diag=self.diag)


def start_rig(workdir: Path, base: int, *, n_ike: int, n_child: int,
              cluster_extra: dict[str, Any] | None = None, echo: bool = True,
              endpoints: bool = False, keep_raw: bool = False,
              esps: Sequence[str] = ("aes128gcm16", "aes128ctr-sha256", "aes256gcm16"),
              env: dict[str, str] | None = None) -> Rig:
    """A 3-member cluster (``ipsec-cluster run``) on ``GW`` ports ``base``,
    ``base+1``; its inside is the echo (``echo``) or a test ``Endpoint``
    (``endpoints``: then the peer's inside is one too: ``rig.endpoints`` =
    [cluster side, peer side]); the relay at ``PROXY``; the peer's config
    written (start it with ``rig.start_peer``). ``env`` is added to the
    cluster's environment (the supervisor passes it on to the members)."""
    procs = Procs(workdir)
    proxy: TimedProxy | None = None
    try:
        conns = grid_connections(n_ike, n_child, esps=esps)
        config = workdir / "cluster.toml"
        gw_inside, gw_bind = (GW, base + 10), (GW, base + 11)
        config.write_text(gateway_toml(
            address=GW, ports=(base, base + 1), inside=f"udp:{gw_inside[0]}:{gw_inside[1]}",
            inside_bind=f"{gw_bind[0]}:{gw_bind[1]}", members=N_MEMBERS, conns=conns,
            extra=cluster_extra or {}))
        eps: list[Endpoint] = []
        echo_proc = None
        if echo and not endpoints:
            echo_proc = procs.start("echo", python_argv("dispatcher.peer", "echo",
                                                        f"{gw_inside[0]}:{gw_inside[1]}"))
        disp = procs.start("cluster", cli_argv("run", "--config", str(config)), env=env)
        wait_assigned(disp, N_MEMBERS, timeout=15)
        def all_alive() -> bool:
            st = ask(config, b"status")
            return len(alive_members(st)) == N_MEMBERS and all(m["segments"]
                                                               for m in st["members"])
        wait_for(f"{N_MEMBERS} members alive", all_alive, timeout=15,
                 diag=lambda: tail(disp.log_path))
        proxy_port = base + 50
        proxy = TimedProxy((PROXY, proxy_port), (GW, base), keep_raw=keep_raw)
        peer_inside, peer_bind = (GW, base + 110), (GW, base + 111)
        if endpoints:
            eps = [Endpoint(gw_inside, gw_bind), Endpoint(peer_inside, peer_bind)]
        peer_cfg = workdir / "peer.toml"
        peer_cfg.write_text(gateway_toml(
            address=PEER, ports=(base + 100, base + 101),
            inside=f"udp:{peer_inside[0]}:{peer_inside[1]}",
            inside_bind=f"{peer_bind[0]}:{peer_bind[1]}", conns=conns, remote=(PROXY, proxy_port)))
        return Rig(workdir, base, procs, config, disp, proxy, conns, peer_cfg, echo=echo_proc,
                   endpoints=eps)
    except BaseException:
        procs.close()
        if proxy is not None:
            proxy.close()
        raise


def ask(config: Path, request: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """``status``/``sas`` straight from the control socket (what ``ipsec-cluster
    status --json`` prints), without starting a Python process per poll: this
    is a 2-CPU machine and the members' heartbeats must not starve."""
    with ControlClient(config=config, timeout=timeout) as client:
        return client.raw(request)


def peer_json(peer: Proc, timeout: float = 60) -> dict[str, Any]:
    """Wait for our peer to exit and return its JSON result line."""
    try:
        peer.proc.wait(timeout)
    except Exception as exc:  # reported with the log
        raise AssertionError(f"peer still running after {timeout} s:\n{peer.log_text()[-3000:]}") \
            from exc
    lines = [ln for ln in peer.log_text().splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line from the peer (rc {peer.proc.returncode}):\n" \
                  f"{peer.log_text()[-3000:]}"
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


def ike_spis(sas_answer: dict[str, Any]) -> set[tuple[str, str]]:
    """(spi_i, spi_r) of every ESTABLISHED IKE SA in the cluster."""
    return {(s["spi_i"], s["spi_r"]) for m in sas_answer["members"] for s in m["ike_sas"]
            if s["state"] == "ESTABLISHED"}


def carriers(sas_answer: dict[str, Any]) -> dict[int, int]:
    """inbound SPI (int) -> member carrying it."""
    return {int(c["spi_in"], 16): m["member"] for m in sas_answer["members"]
            for c in m.get("child_sas", [])}


def ike_owners(sas_answer: dict[str, Any]) -> dict[str, int]:
    """connection name (remote id) -> member owning its IKE SA."""
    return {s["remote_id"]: m["member"] for m in sas_answer["members"] for s in m["ike_sas"]
            if s["state"] == "ESTABLISHED"}


def sender_id_of(iv: bytes) -> int:
    """RFC 6027 §3.7.1 / common/esp/iv.py: the first 16 bits of the 8-byte IV."""
    return int.from_bytes(iv[:2], "big")


def repeats(records: Sequence[EspRecord]) -> tuple[list[Any], list[Any]]:
    """Repeated (SPI, IV) and (SPI, seq) pairs."""
    ivs = Counter((r.spi, r.iv) for r in records)
    seqs = Counter((r.spi, r.seq) for r in records)
    return ([(f"{s:08x}", iv.hex(), n) for (s, iv), n in ivs.items() if n > 1],
            [(f"{s:08x}", q, n) for (s, q), n in seqs.items() if n > 1])


def wait_quiet(seconds: float) -> None:
    time.sleep(seconds)
