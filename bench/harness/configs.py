"""The one TOML writer, and the configs the demo, the tests and the
benchmarks write.

``dumps`` turns values into TOML text: strings quoted and escaped, arrays,
inline tables inside arrays, nested tables as ``[a.b]`` sections; ``None``
leaves a key out. The builders describe connections once, from the
cluster's (the responder's) side, and render them for:

- the cluster or a single gateway answering on loopback or in a lab
  (``gateway_config``), any number of members (``cluster_table(members=N)``);
- our peer, the initiator: the same connections mirrored (identities and
  selectors swapped), every child started (``peer_config``);
- a gateway facing strongSwan in the lab namespaces (``strongswan_gateway``:
  the defaults of tests/lab, TUN inside, one connection ``a-b``).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

IKE_PROPOSAL = "aes128gcm16-prfsha256-ecp256"
ESP_PROPOSAL = "aes128gcm16"
#: the demo's and the loopback tests' three ESP transforms, alternating per child
GRID_ESPS = ("aes128gcm16", "aes128ctr-sha256", "aes256gcm16")

# -- the writer -------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def quote(text: str) -> str:
    """``text`` as a TOML basic string (control characters escaped)."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def key(name: str) -> str:
    """A key, bare when TOML allows it, else quoted."""
    if not isinstance(name, str):
        raise TypeError(f"TOML keys are strings, not {type(name).__name__}")
    return name if _BARE_KEY.fullmatch(name) else quote(name)


def value(v: Any) -> str:
    """One TOML value: bool, int, float, string (or a path), array, inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, os.PathLike):
        return quote(os.fspath(v))
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()
                               if x is not None) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML value for {type(v).__name__}")


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as a TOML document: the scalars and arrays of each table
    first, then its sub-tables as ``[a.b]`` sections (a table holding only
    sub-tables gets no header of its own). ``None`` values are left out."""
    lines: list[str] = []
    _table(data, (), lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(data: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    plain = [(k, v) for k, v in data.items() if v is not None and not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    if path and (plain or not tables):
        if lines:
            lines.append("")
        lines.append("[" + ".".join(key(p) for p in path) + "]")
    lines.extend(f"{key(k)} = {value(v)}" for k, v in plain)
    for k, v in tables:
        _table(v, (*path, k), lines)


# -- connections ---------------------------------------------------------------------------

Selectors = str | Sequence[str]


def _listed(x: Selectors | None) -> list[str] | None:
    """One or more as a list; None stays None (the key is left out: the default)."""
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


@dataclass(frozen=True, slots=True)
class Child:
    """A child as the cluster sees it: ``local_ts`` is the cluster's side;
    ``esp`` None: the default proposals. ``options`` are more keys of its
    table (``rekey_time``, ...)."""

    name: str
    local_ts: Selectors
    remote_ts: Selectors
    esp: Selectors | None = ESP_PROPOSAL
    options: Mapping[str, Any] = field(default_factory=dict)

    def host_pair(self) -> tuple[str, str]:
        """(a host on the cluster's side, a host on the peer's side)."""
        local, remote = _listed(self.local_ts) or [""], _listed(self.remote_ts) or [""]
        return first_host(local[0]), first_host(remote[0])

    def mirrored(self) -> Child:
        return replace(self, local_ts=self.remote_ts, remote_ts=self.local_ts)

    def table(self, start_action: str | None) -> dict[str, Any]:
        return {"local_ts": _listed(self.local_ts), "remote_ts": _listed(self.remote_ts),
                "esp_proposals": _listed(self.esp), "start_action": start_action,
                **self.options}


@dataclass(frozen=True, slots=True)
class Conn:
    """A connection as the cluster sees it (``local_id`` = the cluster's
    identity); ``proposals`` None: the default ones. ``options`` are more
    keys of its table (``dpd_delay``, ...)."""

    name: str
    local_id: str
    remote_id: str
    children: tuple[Child, ...]
    proposals: Selectors | None = IKE_PROPOSAL
    options: Mapping[str, Any] = field(default_factory=dict)

    def mirrored(self) -> Conn:
        """The same connection from the peer's side."""
        return replace(self, local_id=self.remote_id, remote_id=self.local_id,
                       children=tuple(c.mirrored() for c in self.children))

    def table(self, *, psk: str | None, remote_addrs: Selectors, remote_port: int | None,
              start_action: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "remote_addrs": _listed(remote_addrs), "proposals": _listed(self.proposals),
            "local_id": self.local_id, "remote_id": self.remote_id, "psk": psk,
            "remote_port": remote_port, **self.options}
        out["children"] = {c.name: c.table(start_action) for c in self.children}
        return out


def first_host(cidr: str) -> str:
    """The first host of a network (its only address for a /32)."""
    net = ipaddress.ip_network(cidr)
    return str(net.network_address + 1 if net.num_addresses > 2 else net.network_address)


def grid_connections(n_ike: int, n_child: int, *, esps: Sequence[str] = GRID_ESPS,
                     domain: str = "test") -> list[Conn]:
    """``n_ike`` connections k0.. (identities gw.DOMAIN and peerK.DOMAIN) with
    ``n_child`` children c0.. each, every child with its own selectors: cluster
    side 10.200.K.C*16/28, peer side 10.100.K.C*16/28; ESP transforms
    alternate over ``esps``."""
    conns = []
    for k in range(n_ike):
        children = tuple(
            Child(f"c{c}", f"10.200.{k}.{c * 16}/28", f"10.100.{k}.{c * 16}/28",
                  esps[(k + c) % len(esps)])
            for c in range(n_child))
        conns.append(Conn(f"k{k}", f"gw.{domain}", f"peer{k}.{domain}", children))
    return conns


# -- configs ---------------------------------------------------------------------------------


def cluster_table(*, address: str, inside: str, ports: tuple[int, int] | None = None,
                  inside_bind: str | None = None, members: int | None = None,
                  log_level: str | None = "info", **extra: Any) -> dict[str, Any]:
    """The ``[cluster]`` table: address, ports (IKE, NAT-T), inside, and
    ``extra`` keys as they are (``None`` ones left out)."""
    return {"address": address,
            "ike_port": ports[0] if ports else None, "natt_port": ports[1] if ports else None,
            "inside": inside, "log_level": log_level, "inside_bind": inside_bind or None,
            "members": members, **extra}


def connections(conns: Iterable[Conn], *, psk: str | None, remote_addrs: Selectors = "%any",
                remote_port: int | None = None,
                start_action: str | None = "none") -> dict[str, Any]:
    """The ``[connections]`` table of ``conns`` as this gateway sees them
    (alone: a fragment to add to a config's text)."""
    return {c.name: c.table(psk=psk, remote_addrs=remote_addrs, remote_port=remote_port,
                            start_action=start_action) for c in conns}


def gateway_config(cluster: Mapping[str, Any], conns: Iterable[Conn], *, psk: str | None,
                   remote_addrs: Selectors = "%any", remote_port: int | None = None,
                   start_action: str | None = "none",
                   pools: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """A gateway's whole config, ``conns`` as this gateway sees them;
    ``pools``: the ``[pools.NAME]`` tables (virtual IPs)."""
    out: dict[str, Any] = {"cluster": dict(cluster)}
    if pools:
        out["pools"] = dict(pools)
    out["connections"] = connections(conns, psk=psk, remote_addrs=remote_addrs,
                                     remote_port=remote_port, start_action=start_action)
    return out


def peer_config(cluster: Mapping[str, Any], conns: Iterable[Conn], *, psk: str | None,
                remote: tuple[str, int | None]) -> dict[str, Any]:
    """Our peer's config: the cluster's ``conns`` mirrored, each initiated to
    ``remote`` (address, IKE port) with every child started."""
    return gateway_config(cluster, [c.mirrored() for c in conns], psk=psk,
                          remote_addrs=remote[0], remote_port=remote[1], start_action="start")


def gateway_toml(*, address: str, inside: str, conns: Iterable[Conn], psk: str | None,
                 ports: tuple[int, int] | None = None, inside_bind: str | None = None,
                 members: int | None = None, remote: tuple[str, int | None] | None = None,
                 log_level: str | None = "info", extra: Mapping[str, Any] | None = None) -> str:
    """The cluster's config (``remote`` None: it answers anyone), or our
    peer's (``remote`` = the address and port it initiates to; selectors and
    identities mirrored, every child started)."""
    cluster = cluster_table(address=address, inside=inside, ports=ports,
                            inside_bind=inside_bind, members=members, log_level=log_level,
                            **(extra or {}))
    if remote is None:
        return dumps(gateway_config(cluster, conns, psk=psk))
    return dumps(peer_config(cluster, conns, psk=psk, remote=remote))


def single_child_config(*, psk: str, address: str = "127.0.0.1",
                        inside: str = "udp:127.0.0.1:9", local_ts: str = "10.91.2.0/24",
                        remote_ts: str = "10.91.1.0/24") -> str:
    """A gateway with one connection ``a-b`` (gw-b.test, answering gw-a.test)
    and one child ``net`` with the default proposals: the in-process
    ``Member`` of the selector tests and benchmarks."""
    conn = Conn("a-b", "gw-b.test", "gw-a.test", (Child("net", local_ts, remote_ts, None),),
                proposals=None)
    return dumps(gateway_config(cluster_table(address=address, inside=inside, log_level=None),
                                [conn], psk=psk, start_action=None))


#: the lab's gateway (tests/lab): namespace b, 198.18.0.2, TUN inside
LAB_GATEWAY = "198.18.0.2"
LAB_CHILDREN = (Child("net-gcm", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),
                Child("net-ctr", "10.91.12.0/24", "10.91.11.0/24", "aes128ctr-sha256"))


def strongswan_gateway(*, psk: str, address: str = LAB_GATEWAY, remote: str = "%any",
                       inside: str = "tun:ipsc0", inside_address: str = "10.91.2.1",
                       proposals: str = IKE_PROPOSAL, local_id: str = "gw-b.test",
                       remote_id: str = "gw-a.test", children: Sequence[Child] = LAB_CHILDREN,
                       dpd_delay: int = 10, rekey_time: int = 14400, child_rekey: int = 3600,
                       start_action: str = "none", remote_port: int = 500,
                       log_level: str = "debug",
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Our gateway facing strongSwan in the lab: connection ``a-b`` with
    ``children`` (as this gateway sees them), ``extra`` keys in ``[cluster]``."""
    cluster = {"address": address, "inside": inside, "inside_address": inside_address,
               "log_level": log_level, **(extra or {})}
    conn = Conn("a-b", local_id, remote_id,
                tuple(replace(c, options={"rekey_time": child_rekey, **c.options})
                      for c in children),
                proposals=proposals, options={"dpd_delay": dpd_delay, "rekey_time": rekey_time})
    return gateway_config(cluster, [conn], psk=psk, remote_addrs=remote,
                          remote_port=remote_port, start_action=start_action)
