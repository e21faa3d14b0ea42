"""A member's statistics and the cluster's status report: the typed contracts
behind a member's heartbeat and ``ipsec-cluster status``.

- ``MemberStats``: what a member tells the dispatcher in its heartbeat
  (common/cluster/wire.py, HEARTBEAT): SA counts, ESP traffic, what it
  counted, dropped and refused (by reason), its synch channel's counters and
  replicas, the virtual IPs it leased per pool, and its SAs per configured
  connection. ``push_member_stats``/``pull_member_stats`` are its wire
  encoding: bounded (MAX_KEY_BYTES per name, MAX_MAP_ENTRIES per map,
  MAX_ENTRIES in all), and decoding raises ``MalformedMessage`` for bad bytes
  and nothing else; ``bounded()`` makes any ``MemberStats`` fit.
- ``StatusReport``: the answer of the control API's ``status``, one row per
  member (``MemberStatus``). ``to_json()`` is the JSON object of
  ``ipsec-cluster status --json`` (without its ``"ok"``); ``from_json``
  reads such an object back (``ValueError`` on a wrong shape), for the views.

Names in the maps are short ASCII words in practice (``esp_replay``,
``bug.ike.KeyError``, a connection's name); the codec takes any printable
UTF-8 of 1..MAX_KEY_BYTES bytes, each name once per map.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from common.buffer import Reader, Writer
from common.errors import MalformedMessage

#: longest name in a map (UTF-8 bytes)
MAX_KEY_BYTES = 128
#: most names in one map (a u8 count)
MAX_MAP_ENTRIES = 255
#: most names in all maps of one MemberStats together
MAX_ENTRIES = 512
MAX_U64 = (1 << 64) - 1

# -- a member's stats (member -> dispatcher) ----------------------------------------------


@dataclass(slots=True, frozen=True)
class EspTraffic:
    """ESP packets and inner bytes (the IP packets inside) a member decrypted
    (``in``) and encrypted (``out``)."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0


@dataclass(slots=True, frozen=True)
class Replicas:
    """What a member holds for others (RFC 6027 §3.6): copies of their IKE
    and child SAs, and its own datagrams held until a backup acknowledged
    the state they depend on."""

    ike: int = 0
    child: int = 0
    held: int = 0


@dataclass(slots=True, frozen=True)
class ConnectionCounts:
    """Established IKE SAs per configured connection (``ike``) and child SAs
    per configured child (``child``), by name: the labelled metrics
    (member/sa_counts.py caps the names per member)."""

    ike: Mapping[str, int] = field(default_factory=dict)
    child: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class MemberStats:
    """One member's figures as its heartbeat carries them."""

    ike_sas: int = 0
    half_open_ike_sas: int = 0
    child_sas: int = 0
    esp: EspTraffic = field(default_factory=EspTraffic)
    #: frames from the dispatcher the member found missing (its live channel)
    sync_gaps: int = 0
    replicas: Replicas = field(default_factory=Replicas)
    #: what the member counted, by name (ike_in, ike_established, dpd_ok,
    #: inner_raw, ...; the ESP traffic is ``esp``)
    counters: Mapping[str, int] = field(default_factory=dict)
    #: packets and messages dropped, by reason (the IKE engine's as ike_<reason>)
    drops: Mapping[str, int] = field(default_factory=dict)
    #: input refused and failures nobody foresaw, by reason (member/refusals.py)
    refused: Mapping[str, int] = field(default_factory=dict)
    #: the synch channel's counters (member/replication.py): sync_out, sync_in,
    #: sync_gaps, ack_timeouts, ike_unreplicated, takeovers, bulk_sent, ...
    sync: Mapping[str, int] = field(default_factory=dict)
    #: virtual IP addresses leased, per pool name
    pools: Mapping[str, int] = field(default_factory=dict)
    connections: ConnectionCounts = field(default_factory=ConnectionCounts)

    def _maps(self) -> tuple[Mapping[str, int], ...]:
        """The maps in wire order."""
        return (self.counters, self.drops, self.refused, self.sync, self.pools,
                self.connections.ike, self.connections.child)

    def bounded(self) -> MemberStats:
        """A copy that fits the wire encoding: names cut to MAX_KEY_BYTES (and
        made printable, names that meet then summed), values clamped to u64,
        each map cut to MAX_MAP_ENTRIES and all of them to MAX_ENTRIES, the
        per-connection counts first to go, then pools and counters."""
        budget = MAX_ENTRIES
        kept: dict[str, dict[str, int]] = {}
        # most important first: what was lost, refused, and the sync state
        for name, m in (("drops", self.drops), ("refused", self.refused), ("sync", self.sync),
                        ("counters", self.counters), ("pools", self.pools),
                        ("ike", self.connections.ike), ("child", self.connections.child)):
            kept[name] = _bounded_map(m, min(budget, MAX_MAP_ENTRIES))
            budget -= len(kept[name])
        clamp = _clamp
        return MemberStats(
            clamp(self.ike_sas), clamp(self.half_open_ike_sas), clamp(self.child_sas),
            EspTraffic(*(clamp(getattr(self.esp, f.name)) for f in fields(EspTraffic))),
            clamp(self.sync_gaps),
            Replicas(clamp(self.replicas.ike), clamp(self.replicas.child),
                     clamp(self.replicas.held)),
            kept["counters"], kept["drops"], kept["refused"], kept["sync"], kept["pools"],
            ConnectionCounts(kept["ike"], kept["child"]))


def _clamp(v: int) -> int:
    return min(max(int(v), 0), MAX_U64)


def _bounded_key(key: str) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in key) or "?"
    raw = text.encode()
    if len(raw) <= MAX_KEY_BYTES:
        return text
    return raw[:MAX_KEY_BYTES].decode(errors="ignore") or "?"


def _bounded_map(m: Mapping[str, int], room: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in m.items():
        k = _bounded_key(key)
        if k not in out and len(out) >= room:
            continue
        out[k] = _clamp(out.get(k, 0) + _clamp(value))
    return out


#: the fixed part: SA counts, ESP traffic, sync gaps, replicas (u64 each)
_FIXED = struct.Struct("!11Q")


def push_member_stats(w: Writer, s: MemberStats) -> None:
    """The fixed part (11 u64: ike_sas, half_open_ike_sas, child_sas, the
    four ESP figures, sync_gaps, the three replica counts), then seven maps
    (counters, drops, refused, sync, pools, connections' ike and child), each
    a u8 count of (u8 name length, name, u64 value). ``ValueError`` for what
    does not fit (``bounded()`` first)."""
    e, r = s.esp, s.replicas
    try:
        w.push_bytes(_FIXED.pack(s.ike_sas, s.half_open_ike_sas, s.child_sas, e.packets_in,
                                 e.bytes_in, e.packets_out, e.bytes_out, s.sync_gaps,
                                 r.ike, r.child, r.held))
    except struct.error as exc:
        raise ValueError(f"member stats do not fit u64 fields: {exc}") from None
    maps = s._maps()
    total = sum(len(m) for m in maps)
    if total > MAX_ENTRIES:
        raise ValueError(f"{total} named member stats (at most {MAX_ENTRIES})")
    for m in maps:
        _push_map(w, m)


def _push_map(w: Writer, m: Mapping[str, int]) -> None:
    if len(m) > MAX_MAP_ENTRIES:
        raise ValueError(f"{len(m)} names in one map (at most {MAX_MAP_ENTRIES})")
    w.push_uint8(len(m))
    for key, value in m.items():
        raw = key.encode()
        if not 1 <= len(raw) <= MAX_KEY_BYTES or not key.isprintable():
            raise ValueError(f"stats name {key[:40]!r} is not 1..{MAX_KEY_BYTES} printable bytes")
        if not 0 <= value <= MAX_U64:
            raise ValueError(f"stats value {value} of {key[:40]!r} is not a u64")
        w.push_uint8(len(raw))
        w.push_bytes(raw)
        w.push_uint64(value)


def pull_member_stats(r: Reader) -> MemberStats:
    """``push_member_stats`` read back; ``MalformedMessage`` on bad bytes."""
    (ike, half_open, child, p_in, b_in, p_out, b_out, gaps, rep_ike, rep_child,
     held) = _FIXED.unpack(r.pull_bytes(_FIXED.size))
    budget = [MAX_ENTRIES]
    counters, drops, refused, sync, pools, conn_ike, conn_child = (
        _pull_map(r, budget) for _ in range(7))
    return MemberStats(ike, half_open, child, EspTraffic(p_in, b_in, p_out, b_out), gaps,
                       Replicas(rep_ike, rep_child, held), counters, drops, refused, sync,
                       pools, ConnectionCounts(conn_ike, conn_child))


def _pull_map(r: Reader, budget: list[int]) -> dict[str, int]:
    n = r.pull_uint8()
    if n > budget[0]:
        raise MalformedMessage(f"member stats: more than {MAX_ENTRIES} names")
    budget[0] -= n
    if n * 10 > r.remaining:   # (u8 length, one byte at least, u64 value)
        raise MalformedMessage(f"member stats: {n} names cannot fit")
    out: dict[str, int] = {}
    for _ in range(n):
        size = r.pull_uint8()
        if not 1 <= size <= MAX_KEY_BYTES:
            raise MalformedMessage(f"member stats: a name of {size} bytes")
        raw = r.pull_bytes(size)
        try:
            key = raw.decode()
        except UnicodeDecodeError as e:
            raise MalformedMessage(f"member stats: a name is not UTF-8: {e}") from None
        if not key.isprintable():
            raise MalformedMessage(f"member stats: name {key[:40]!r} is not printable")
        if key in out:
            raise MalformedMessage(f"member stats: name {key[:40]!r} twice")
        out[key] = r.pull_uint64()
    return out


# -- the status report (ipsec-cluster status) -----------------------------------------------


@dataclass(slots=True, frozen=True)
class ClusterStatus:
    address: str = ""
    #: load-sharing, hot-standby or single-process
    mode: str = ""
    #: of the segment table (0 in a single process)
    epoch: int = 0
    uptime_s: float = 0.0
    #: where members connect (a single process: its control socket)
    endpoint: str = ""


@dataclass(slots=True, frozen=True)
class DispatcherStatus:
    pid: int = 0
    #: what it relayed and did, by event (udp_in, inner_out, members_died, ...)
    counters: Mapping[str, int] = field(default_factory=dict)
    drops: Mapping[str, int] = field(default_factory=dict)
    inside_routes: int = 0
    refused: Mapping[str, int] = field(default_factory=dict)
    #: ESP packets that went through this process (both directions): 0 on
    #: the kernel data path while traffic flows (docs/routing.md)
    esp_relayed: int = 0
    #: "kernel" (members receive and send their own ESP) or "relay"
    data_path: str = "relay"
    #: why the kernel data path is off ("" when it is on)
    data_path_off: str = ""
    #: the supervisor that holds the cluster's sockets and devices and
    #: restarts this dispatcher (0: none, the dispatcher runs alone)
    supervisor_pid: int = 0
    #: a restarted dispatcher waiting for the running members to come back
    #: (the kernel's steering and routes stay as they were meanwhile)
    adopting: bool = False
    #: two dispatcher hosts (docs/failover.md "Two dispatcher hosts"):
    #: "active" (it holds the cluster's address and the members) or
    #: "standby"; the host it runs on; its term (0: not active yet)
    role: str = "active"
    host: str = ""
    term: int = 0


@dataclass(slots=True, frozen=True)
class ReplicationStatus:
    """Whether a member's SAs are safe from its death (RFC 6027 §3.6)."""

    ike_replicas: int = 0
    child_replicas: int = 0
    unreplicated_changes: int = 0
    ack_timeouts: int = 0
    held: int = 0
    sync_out: int = 0
    sync_in: int = 0
    takeovers: int = 0
    #: some segment of the member has no live backup
    degraded: bool = False

    @classmethod
    def of(cls, stats: MemberStats, *, degraded: bool) -> ReplicationStatus:
        s = stats.sync
        return cls(stats.replicas.ike, stats.replicas.child, s.get("ike_unreplicated", 0),
                   s.get("ack_timeouts", 0), stats.replicas.held, s.get("sync_out", 0),
                   s.get("sync_in", 0), s.get("takeovers", 0), degraded)


@dataclass(slots=True, frozen=True)
class MemberStatus:
    """One member's row of the report (a dead member: its last heartbeat's figures)."""

    id: int
    pid: int = 0
    host: str = ""
    alive: bool = True
    sender_id: int = 0
    last_heartbeat_ms: int = 0
    segments: int = 0
    backup_segments: int = 0
    ike_sas: int = 0
    half_open_ike_sas: int = 0
    child_sas: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    drops: Mapping[str, int] = field(default_factory=dict)
    refused: Mapping[str, int] = field(default_factory=dict)
    #: frames lost: the dispatcher -> member and member -> dispatcher streams
    sync_gaps: int = 0
    #: None: no replication (a single process), ``{}`` in the JSON
    replication: ReplicationStatus | None = None
    #: every synch channel counter of the member (MemberStats.sync)
    sync: Mapping[str, int] = field(default_factory=dict)
    #: SAs per configured connection (the metrics' labels; not in the JSON)
    connections: ConnectionCounts = field(default_factory=ConnectionCounts)

    @classmethod
    def of(cls, member_id: int, stats: MemberStats, *, pid: int, host: str, alive: bool,
           sender_id: int, last_heartbeat_ms: int, segments: int, backup_segments: int,
           gaps: int, degraded: bool) -> MemberStatus:
        """A cluster member's row: what the dispatcher knows (``gaps``: frames
        from the member it found missing) and the member's last stats."""
        e = stats.esp
        return cls(member_id, pid, host, alive, sender_id, last_heartbeat_ms, segments,
                   backup_segments, stats.ike_sas, stats.half_open_ike_sas, stats.child_sas,
                   e.packets_in, e.bytes_in, e.packets_out, e.bytes_out, dict(stats.drops),
                   dict(stats.refused), gaps + stats.sync_gaps,
                   ReplicationStatus.of(stats, degraded=degraded), dict(stats.sync),
                   stats.connections)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "connections":
                continue
            v = getattr(self, f.name)
            if f.name == "replication":
                v = _json_of(v) if v is not None else {}
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out


@dataclass(slots=True, frozen=True)
class PoolStatus:
    """One ``[pools.NAME]`` and how many of its addresses the live members leased."""

    name: str
    addrs: str
    dns: tuple[str, ...] = ()
    size: int = 0
    per_segment: int = 0
    leased: int = 0
    by_member: Mapping[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "addrs": self.addrs, "dns": list(self.dns),
                "size": self.size, "per_segment": self.per_segment, "leased": self.leased,
                "by_member": dict(self.by_member)}


@dataclass(slots=True, frozen=True)
class StatusReport:
    """``ipsec-cluster status``: the cluster, its dispatcher (a single
    process: itself), every member known (alive or dead) and the pools
    (None: none in the report, the single process)."""

    cluster: ClusterStatus
    dispatcher: DispatcherStatus
    members: tuple[MemberStatus, ...]
    pools: tuple[PoolStatus, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``status --json`` (the control API's answer
        without its ``"ok"``)."""
        out: dict[str, Any] = {"cluster": _json_of(self.cluster),
                               "dispatcher": _json_of(self.dispatcher),
                               "members": [m.to_json() for m in self.members]}
        if self.pools is not None:
            out["pools"] = [p.to_json() for p in self.pools]
        return out

    @classmethod
    def from_json(cls, obj: Any) -> StatusReport:
        """A report from ``to_json()``'s shape (keys it does not know are
        ignored, missing ones take their defaults); ``ValueError`` when a
        field has the wrong type."""
        d = _obj(obj, "status")
        cluster = _obj(d.get("cluster", {}), "cluster")
        disp = _obj(d.get("dispatcher", {}), "dispatcher")
        members = _list(d.get("members", []), "members")
        pools = d.get("pools")
        return cls(
            ClusterStatus(_str(cluster, "address"), _str(cluster, "mode"),
                          _int(cluster, "epoch"), _float(cluster, "uptime_s"),
                          _str(cluster, "endpoint")),
            DispatcherStatus(_int(disp, "pid"), _counts(disp, "counters"), _counts(disp, "drops"),
                             _int(disp, "inside_routes"), _counts(disp, "refused"),
                             _int(disp, "esp_relayed"), _str(disp, "data_path") or "relay",
                             _str(disp, "data_path_off"), _int(disp, "supervisor_pid"),
                             _bool(disp, "adopting", False), _str(disp, "role") or "active",
                             _str(disp, "host"), _int(disp, "term")),
            tuple(_member_of_json(_obj(m, "member")) for m in members),
            None if pools is None else tuple(_pool_of_json(_obj(p, "pool"))
                                             for p in _list(pools, "pools")))


def _json_of(obj: ClusterStatus | DispatcherStatus | ReplicationStatus) -> dict[str, Any]:
    return {f.name: (dict(v) if isinstance(v := getattr(obj, f.name), Mapping) else v)
            for f in fields(obj)}


def _member_of_json(m: dict[str, Any]) -> MemberStatus:
    r = m.get("replication", {})
    rep = _obj(r, "replication")
    replication = None if not rep else ReplicationStatus(
        _int(rep, "ike_replicas"), _int(rep, "child_replicas"),
        _int(rep, "unreplicated_changes"), _int(rep, "ack_timeouts"), _int(rep, "held"),
        _int(rep, "sync_out"), _int(rep, "sync_in"), _int(rep, "takeovers"),
        _bool(rep, "degraded", False))
    return MemberStatus(
        _int(m, "id"), _int(m, "pid"), _str(m, "host"), _bool(m, "alive", True),
        _int(m, "sender_id"), _int(m, "last_heartbeat_ms"), _int(m, "segments"),
        _int(m, "backup_segments"), _int(m, "ike_sas"), _int(m, "half_open_ike_sas"),
        _int(m, "child_sas"), _int(m, "packets_in"), _int(m, "bytes_in"),
        _int(m, "packets_out"), _int(m, "bytes_out"), _counts(m, "drops"),
        _counts(m, "refused"), _int(m, "sync_gaps"), replication, _counts(m, "sync"))


def _pool_of_json(p: dict[str, Any]) -> PoolStatus:
    by = _obj(p.get("by_member", {}), "by_member")
    by_member: dict[int, int] = {}
    for k, v in by.items():
        if not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())) \
                or not _is_int(v):
            raise ValueError(f"status: pool by_member: {k!r}: {v!r} is not member id: count")
        by_member[int(k)] = v
    dns = _list(p.get("dns", []), "dns")
    if not all(isinstance(a, str) for a in dns):
        raise ValueError("status: pool dns: not a list of strings")
    return PoolStatus(_str(p, "name"), _str(p, "addrs"), tuple(dns), _int(p, "size"),
                      _int(p, "per_segment"), _int(p, "leased"), by_member)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"status: {what} is not an object")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"status: {what} is not a list")
    return v


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key, 0)
    if not _is_int(v):
        raise ValueError(f"status: {key} is not an integer: {v!r}")
    return int(v)


def _float(d: dict[str, Any], key: str) -> float:
    v = d.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"status: {key} is not a number: {v!r}")
    return float(v)


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise ValueError(f"status: {key} is not a string: {v!r}")
    return v


def _bool(d: dict[str, Any], key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"status: {key} is not true or false: {v!r}")
    return v


def _counts(d: dict[str, Any], key: str) -> dict[str, int]:
    v = _obj(d.get(key, {}), key)
    if not all(isinstance(k, str) and _is_int(n) for k, n in v.items()):
        raise ValueError(f"status: {key} is not an object of counts")
    return dict(v)
