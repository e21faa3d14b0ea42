"""The gateway's configuration file: TOML text in, checked dataclasses out.

Rules of this file:
- Pure parsing: the shell reads the file and passes its text and name; a
  ``psk_file`` is read through the ``read_file`` callback the shell passes (no
  file I/O here).
- Key names follow swanctl.conf wherever swanctl has one (docs/config.md).
- Every mistake is one ``ConfigError`` whose message names the file, the key
  path and what was expected: ``gateway.toml: connections.branch.children.net.
  local_ts[0]: expected a CIDR like "10.91.2.0/24", got "10.91.2.0/33"``.
  Unknown keys are errors, so a typo never passes silently.
- A pre-shared key never appears in a repr or in an error message.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from common.errors import IpsecClusterError
from common.ike.constants import IdType
from common.ike.proposals import expand_esp_proposal, expand_ike_proposal
from common.ike.transforms import Proposal
from common.ike.ts import TrafficSelector, ts_from_cidr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
#: Reads a file by path (the shell passes ``lambda p: Path(p).read_bytes()``).
ReadFile = Callable[[str], bytes]

MIN_REPLAY_WINDOW = 32  # same bounds as common/replay.py
MAX_REPLAY_WINDOW = 65536
MAX_MEMBERS = 64
IFNAMSIZ = 16  # Linux interface names: at most 15 bytes + NUL
ANY = "%any"
DEFAULT_IKE_PROPOSAL = "aes128gcm16-prfsha256-ecp256"
DEFAULT_ESP_PROPOSAL = "aes128gcm16"
_MISSING: Any = object()
_ADDRESS = 'an IPv4 or IPv6 address like "198.18.0.2"'
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(IpsecClusterError, ValueError):
    """A configuration file that cannot be used; ``str()`` is the whole message."""

    def __init__(self, filename: str, path: str, expected: str, got: str) -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{filename}: {where}expected {expected}, got {got}")
        self.filename = filename
        self.path = path
        self.expected = expected
        self.got = got


# -- the parsed configuration ----------------------------------------------------------


@dataclass(slots=True, frozen=True)
class InsideConfig:
    """Where cleartext packets enter and leave: a TUN device or a UDP socket."""

    kind: Literal["tun", "udp"]
    name: str = ""  # tun: the device name (may contain %d)
    host: IPAddress | None = None  # udp: where inner packets are sent
    port: int = 0
    bind_host: IPAddress | None = None  # udp: our inside socket
    bind_port: int = 0


@dataclass(slots=True, frozen=True)
class Identity:
    """An IKE identity (RFC 7296 §3.5); ``id_type`` is None for ``%any``."""

    text: str
    id_type: IdType | None
    data: bytes

    @property
    def is_any(self) -> bool:
        return self.id_type is None


@dataclass(slots=True, frozen=True)
class ProposalConfig:
    """A proposal as written (``text``) and as parsed."""

    text: str
    proposal: Proposal


@dataclass(slots=True, frozen=True)
class ChildConfig:
    name: str
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    local_nets: tuple[IPNetwork, ...]  # the same selectors as networks (routes)
    remote_nets: tuple[IPNetwork, ...]
    esp_proposals: tuple[ProposalConfig, ...]
    rekey_time: int
    life_packets: int
    rekey_packets: int
    start_action: Literal["none", "start"]
    dpd_action: Literal["clear", "restart"]


@dataclass(slots=True, frozen=True)
class ConnectionConfig:
    name: str
    remote_addrs: tuple[IPAddress, ...]  # empty = %any
    local_addrs: tuple[IPAddress, ...]
    remote_port: int
    proposals: tuple[ProposalConfig, ...]
    local_id: Identity
    remote_id: Identity
    dpd_delay: int
    rekey_time: int
    reauth_time: int
    mobike: bool
    children: dict[str, ChildConfig]
    psk_file: str | None = None  # resolved path; set when psk_file was used
    psk: bytes | None = field(default=None, repr=False)  # None: psk_file not read yet


@dataclass(slots=True, frozen=True)
class ClusterConfig:
    address: IPAddress
    ike_port: int
    natt_port: int
    inside: InsideConfig
    inside_address: IPInterface | None
    members: int
    expect_members: int
    mode: Literal["load-sharing", "hot-standby"]
    sync: str
    curve_secret_key: str = field(repr=False)
    curve_server_key: str
    curve_authorized: str
    control: str
    metrics_port: int
    cookie_threshold: int
    replay_window: int
    segment_bits: int
    heartbeat_interval: float
    dead_after: int
    seq_sync_packets: int
    seq_sync_interval: float
    replay_after_failover: Literal["strict", "learn", "rekey"]
    log_level: Literal["debug", "info", "warning", "error"]


@dataclass(slots=True, frozen=True)
class Config:
    cluster: ClusterConfig
    connections: dict[str, ConnectionConfig]
    source: str  # the file name the text came from


# -- identities ------------------------------------------------------------------------


def parse_identity(text: str) -> tuple[IdType, bytes]:
    """An identity string to (ID type, ID data), inferred like strongSwan's
    ``identification_create_from_string``: an IP address is ID_IPV4_ADDR or
    ID_IPV6_ADDR; ``@host`` is ID_FQDN ``host``; ``@#hex`` and ``keyid:...``
    (``keyid:#hex`` for hex) are ID_KEY_ID; ``user@host`` is ID_RFC822_ADDR;
    anything else ID_FQDN. Prefixes ``fqdn:``, ``email:``, ``ipv4:``, ``ipv6:``
    force a type. Raises ValueError (also for ``%any`` and distinguished names).
    """
    if not text or text != text.strip():
        raise ValueError("an identity must be non-empty without surrounding spaces")
    if text == ANY:
        raise ValueError("%any matches any identity but is not one")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("ipv4", "ipv6"):
        return _ip_identity(rest, 4 if prefix == "ipv4" else 6)
    if sep and prefix in ("fqdn", "email", "rfc822", "keyid"):
        if not rest:
            raise ValueError(f"{prefix}: needs a value")
        if prefix == "keyid":
            return IdType.ID_KEY_ID, _keyid(rest)
        kind = IdType.ID_FQDN if prefix == "fqdn" else IdType.ID_RFC822_ADDR
        return kind, rest.encode()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return _ip_identity(text, addr.version)
    if text.startswith("@#"):
        return IdType.ID_KEY_ID, _keyid(text[1:])
    if text.startswith("@"):
        if len(text) == 1:
            raise ValueError("@ needs a host name after it")
        return IdType.ID_FQDN, text[1:].encode()
    if "@" in text:
        return IdType.ID_RFC822_ADDR, text.encode()
    if "=" in text:
        raise ValueError("distinguished names (ID_DER_ASN1_DN) are not supported")
    return IdType.ID_FQDN, text.encode()


def _ip_identity(text: str, version: int) -> tuple[IdType, bytes]:
    addr = ipaddress.ip_address(text)
    if addr.version != version:
        raise ValueError(f"{text} is not an IPv{version} address")
    return (IdType.ID_IPV4_ADDR if version == 4 else IdType.ID_IPV6_ADDR), addr.packed


def _keyid(text: str) -> bytes:
    if text.startswith("#"):
        try:
            return bytes.fromhex(text[1:])
        except ValueError:
            raise ValueError("keyid:#... needs hex digits") from None
    return text.encode()


def decode_psk(text: str) -> bytes:
    """swanctl secret syntax: ``0x`` + hex, ``0s`` + base64, else the UTF-8 text.
    Raises ValueError without echoing the secret."""
    if text.startswith(("0x", "0X")):
        try:
            data = bytes.fromhex(text[2:])
        except ValueError:
            raise ValueError("0x must be followed by hex digits") from None
    elif text.startswith("0s"):
        try:
            data = base64.b64decode(text[2:], validate=True)
        except binascii.Error:
            raise ValueError("0s must be followed by base64") from None
    else:
        data = text.encode()
    if not data:
        raise ValueError("the key is empty")
    return data


# -- the schema walker -----------------------------------------------------------------


def _show(value: object) -> str:
    """A value as it would look in TOML (strings in double quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _show(name)


class _Table:
    """One TOML table being read: typed getters, then ``done()`` rejects the rest."""

    def __init__(self, filename: str, path: str, data: dict[str, Any]) -> None:
        self.filename = filename
        self.path = path
        self.data = data
        self.known: list[str] = []

    def at(self, key: str) -> str:
        return f"{self.path}.{_key(key)}" if self.path else _key(key)

    def error(self, key: str, expected: str, got: str) -> ConfigError:
        return ConfigError(self.filename, self.at(key) if key else self.path, expected, got)

    def raw(self, key: str, default: Any, expected: str) -> Any:
        self.known.append(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            typo = difflib.get_close_matches(key, [k for k in self.data if k not in self.known])
            hint = f'; is "{typo[0]}" a typo?' if typo else ""
            raise self.error(key, expected, f"nothing (this key is required{hint})")
        return default

    def string(self, key: str, default: Any = _MISSING, *, secret: bool = False,
               expected: str = "a string") -> str:
        value = self.raw(key, default, expected)
        if not isinstance(value, str):
            raise self.error(key, expected, "a value of another type" if secret else _show(value))
        return value

    def integer(self, key: str, default: Any, lo: int, hi: int, what: str = "") -> int:
        expected = f"an integer in {lo}..{hi}{what}"
        value = self.raw(key, default, expected)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(key, expected, _show(value))
        return value

    def number(self, key: str, default: Any, lo: float, hi: float) -> float:
        expected = f"a number of seconds in {lo}..{hi}"
        value = self.raw(key, default, expected)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise self.error(key, expected, _show(value))
        return float(value)

    def duration(self, key: str, default: int) -> int:
        """Whole seconds: an integer, or a string with unit s/m/h/d like swanctl."""
        expected = 'seconds (an integer >= 0, or a string like "4h")'
        value = self.raw(key, default, expected)
        if isinstance(value, str) and (m := _DURATION.match(value)):
            return int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(key, expected, _show(value))
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default, "true or false")
        if not isinstance(value, bool):
            raise self.error(key, "true or false", _show(value))
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> Any:
        expected = "one of " + ", ".join(_show(c) for c in choices)
        value = self.raw(key, default, expected)
        if value not in choices:
            raise self.error(key, expected, _show(value))
        return value

    def strings(self, key: str, default: Any = _MISSING, *, nonempty: bool = True) -> list[str]:
        expected = "a non-empty array of strings" if nonempty else "an array of strings"
        value = self.raw(key, default, expected)
        if not isinstance(value, list) or (nonempty and not value):
            raise self.error(key, expected, _show(value))
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _item_error(self, key, i, "a string", _show(item))
        return value

    def table(self, key: str, default: Any = _MISSING) -> _Table:
        value = self.raw(key, default, "a table")
        if not isinstance(value, dict):
            raise self.error(key, "a table", _show(value))
        return _Table(self.filename, self.at(key), value)

    def done(self) -> None:
        for key in self.data:
            if key not in self.known:
                close = difflib.get_close_matches(key, self.known, n=1)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                raise self.error(
                    key, "one of the known keys (" + ", ".join(self.known) + ")",
                    f"an unknown key{hint}")


def _item_error(t: _Table, key: str, index: int, expected: str, got: str) -> ConfigError:
    return ConfigError(t.filename, f"{t.at(key)}[{index}]", expected, got)


# -- value parsers ---------------------------------------------------------------------


def _address(t: _Table, key: str, value: str, index: int | None = None) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        expected = _ADDRESS
        if index is None:
            raise t.error(key, expected, _show(value)) from None
        raise _item_error(t, key, index, expected, _show(value)) from None


def _host_port(t: _Table, key: str, text: str, example: str) -> tuple[IPAddress, int]:
    expected = f'HOST:PORT like "{example}" (an IP address; IPv6 in brackets)'
    m = re.match(r"^(?:\[([^\]]+)\]|([^:\[\]]+)):(\d{1,5})$", text)
    if not m:
        raise t.error(key, expected, _show(text))
    try:
        host = ipaddress.ip_address(m.group(1) or m.group(2))
    except ValueError:
        raise t.error(key, expected, _show(text)) from None
    port = int(m.group(3))
    if port > 65535:
        raise t.error(key, expected, _show(text))
    return host, port


def _inside(t: _Table) -> InsideConfig:
    text = t.string("inside", "tun:ipsc0")
    bind = t.string("inside_bind", "")
    kind, _, rest = text.partition(":")
    if kind == "tun":
        name_ok = 0 < len(rest.encode()) < IFNAMSIZ and not re.search(r"[\s/:]", rest)
        if not name_ok:
            raise t.error("inside", f'"tun:NAME" with a device name of 1..{IFNAMSIZ - 1} '
                                    'characters without spaces, "/" or ":"', _show(text))
        if bind:
            raise t.error("inside_bind", '"" (only a udp: inside binds a socket)', _show(bind))
        return InsideConfig("tun", name=rest)
    if kind == "udp":
        host, port = _host_port(t, "inside", rest, "udp:127.0.0.1:9000")
        if port == 0:
            raise t.error("inside", "a port in 1..65535", _show(text))
        if bind:
            bind_host, bind_port = _host_port(t, "inside_bind", bind, "127.0.0.1:9001")
        else:
            bind_host = ipaddress.ip_address("127.0.0.1" if host.version == 4 else "::1")
            bind_port = 0
        if bind_host.version != host.version:
            raise t.error("inside_bind", f"an IPv{host.version} address like the inside "
                                         "address", _show(bind))
        return InsideConfig("udp", host=host, port=port, bind_host=bind_host, bind_port=bind_port)
    raise t.error("inside", '"tun:NAME" or "udp:HOST:PORT"', _show(text))


def _cidrs(t: _Table, key: str) -> tuple[tuple[TrafficSelector, ...], tuple[IPNetwork, ...]]:
    selectors: list[TrafficSelector] = []
    nets: list[IPNetwork] = []
    for i, text in enumerate(t.strings(key)):
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError:
            hint = ""
            try:
                hint = f" (host bits set; did you mean {ipaddress.ip_network(text, strict=False)}?)"
            except ValueError:
                pass
            raise _item_error(t, key, i, 'a CIDR like "10.91.2.0/24"' + hint, _show(text)) from None
        nets.append(net)
        selectors.append(ts_from_cidr(net))
    return tuple(selectors), tuple(nets)


def _proposals(t: _Table, key: str, default: str, esp: bool) -> tuple[ProposalConfig, ...]:
    out: list[ProposalConfig] = []
    for i, text in enumerate(t.strings(key, [default])):
        try:
            # Numbered from 1 (RFC 7296 §3.3.1); strongSwan's "default" is several.
            parse = expand_esp_proposal if esp else expand_ike_proposal
            proposals = parse(text, len(out) + 1)
        except ValueError as exc:
            what = "an ESP proposal like \"aes128gcm16\"" if esp else \
                f'an IKE proposal like "{DEFAULT_IKE_PROPOSAL}"'
            raise _item_error(t, key, i, f"{what} ({exc})", _show(text)) from None
        out += [ProposalConfig(text, proposal) for proposal in proposals]
    return tuple(out)


def _identity(t: _Table, key: str, default: Any, allow_any: bool) -> Identity:
    text = t.string(key, default)
    if allow_any and text == ANY:
        return Identity(text, None, b"")
    try:
        id_type, data = parse_identity(text)
    except ValueError as exc:
        expected = 'an identity like "gw.example", "@gw.example", "user@example", ' \
                   '"198.18.0.2" or "keyid:..."' + (' or "%any"' if allow_any else "")
        raise t.error(key, f"{expected} ({exc})", _show(text)) from None
    return Identity(text, id_type, data)


# -- sections --------------------------------------------------------------------------


def _cluster(t: _Table) -> ClusterConfig:
    address = _address(t, "address", t.string("address", expected=_ADDRESS))
    ike_port = t.integer("ike_port", 500, 1, 65535)
    natt_port = t.integer("natt_port", 4500, 1, 65535)
    if natt_port == ike_port:
        raise t.error("natt_port", f"a port other than ike_port ({ike_port})", str(natt_port))
    inside = _inside(t)
    inside_address: IPInterface | None = None
    if text := t.string("inside_address", ""):
        try:
            inside_address = ipaddress.ip_interface(text)
        except ValueError:
            raise t.error("inside_address", 'an address like "10.91.2.1" or "10.91.2.1/24"',
                          _show(text)) from None
    segment_bits = t.integer("segment_bits", 8, 1, 16)
    sync = t.string("sync", "")
    if sync and not sync.startswith("ipc://"):
        if not sync.startswith("tcp://"):
            raise t.error("sync", '"", "ipc://PATH" or "tcp://HOST:PORT"', _show(sync))
        _host_port(t, "sync", sync.removeprefix("tcp://"), "tcp://198.18.0.2:7000")
    # Members on other hosts: the dispatcher may start none itself.
    members = t.integer("members", 1, 0 if sync.startswith("tcp://") else 1,
                        min(MAX_MEMBERS, 1 << segment_bits), " (at most 2**segment_bits)")
    expect_members = t.integer("expect_members", members, 1, MAX_MEMBERS)
    secret = t.string("curve_secret_key", "", secret=True)
    server_key = t.string("curve_server_key", "")
    authorized = t.string("curve_authorized", "")
    cluster = ClusterConfig(
        address=address,
        ike_port=ike_port,
        natt_port=natt_port,
        inside=inside,
        inside_address=inside_address,
        members=members,
        expect_members=expect_members,
        mode=t.choice("mode", "load-sharing", ("load-sharing", "hot-standby")),
        sync=sync,
        curve_secret_key=secret,
        curve_server_key=server_key,
        curve_authorized=authorized,
        control=t.string("control", ""),
        metrics_port=t.integer("metrics_port", 0, 0, 65535, " (0 = off)"),
        cookie_threshold=t.integer("cookie_threshold", 100, 0, 1_000_000),
        replay_window=t.integer("replay_window", 1024, MIN_REPLAY_WINDOW, MAX_REPLAY_WINDOW),
        segment_bits=segment_bits,
        heartbeat_interval=t.number("heartbeat_interval", 0.05, 0.001, 60.0),
        dead_after=t.integer("dead_after", 3, 1, 1000),
        seq_sync_packets=t.integer("seq_sync_packets", 1000, 1, 1 << 32),
        seq_sync_interval=t.number("seq_sync_interval", 0.1, 0.001, 60.0),
        replay_after_failover=t.choice("replay_after_failover", "rekey",
                                       ("strict", "learn", "rekey")),
        log_level=t.choice("log_level", "info", ("debug", "info", "warning", "error")),
    )
    t.done()
    return cluster


def _child(t: _Table, name: str) -> ChildConfig:
    local_ts, local_nets = _cidrs(t, "local_ts")
    remote_ts, remote_nets = _cidrs(t, "remote_ts")
    esp = _proposals(t, "esp_proposals", DEFAULT_ESP_PROPOSAL, esp=True)
    rekey_time = t.duration("rekey_time", 3600)
    life_packets = t.integer("life_packets", 0, 0, (1 << 64) - 1, " (0 = no limit)")
    rekey_packets = t.integer("rekey_packets", 0, 0, (1 << 64) - 1, " (0 = off)")
    if life_packets and rekey_packets >= life_packets:
        raise t.error("rekey_packets", f"fewer than life_packets ({life_packets})",
                      str(rekey_packets))
    child = ChildConfig(
        name=name,
        local_ts=local_ts,
        remote_ts=remote_ts,
        local_nets=local_nets,
        remote_nets=remote_nets,
        esp_proposals=esp,
        rekey_time=rekey_time,
        life_packets=life_packets,
        rekey_packets=rekey_packets,
        start_action=t.choice("start_action", "none", ("none", "start")),
        dpd_action=t.choice("dpd_action", "clear", ("clear", "restart")),
    )
    t.done()
    return child


def _addresses(t: _Table, key: str, default: list[str], allow_any: bool) -> list[IPAddress]:
    texts = t.strings(key, default, nonempty=not allow_any)
    if allow_any and texts == [ANY]:
        return []
    return [_address(t, key, text, i) for i, text in enumerate(texts)]


def _psk(t: _Table, config_dir: PurePosixPath,
         read_file: ReadFile | None) -> tuple[bytes | None, str | None]:
    has_psk, has_file = "psk" in t.data, "psk_file" in t.data
    if has_psk == has_file:
        t.known += ["psk", "psk_file"]
        raise t.error("psk_file" if has_psk else "psk", "exactly one of psk or psk_file",
                      "both" if has_psk else "neither")
    if has_psk:
        text, where = t.string("psk", secret=True), "psk"
    else:
        name = t.string("psk_file")
        if not name:
            raise t.error("psk_file", "the path of a file holding the key", '""')
        path = str(config_dir / name)
        if read_file is None:
            return None, path
        try:
            text = read_file(path).decode().rstrip("\r\n")
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise t.error("psk_file", "a readable UTF-8 file",
                          f"{_show(path)} ({reason})") from None
        where = "psk_file"
    try:
        return decode_psk(text), None if has_psk else path
    except ValueError as exc:
        got = "an empty key" if not text else "a key that does not decode (not shown)"
        raise t.error(where, f"a non-empty key: text, 0x + hex or 0s + base64 ({exc})",
                      got) from None


def _connection(t: _Table, name: str, cluster: ClusterConfig, config_dir: PurePosixPath,
                read_file: ReadFile | None) -> ConnectionConfig:
    remote_addrs = _addresses(t, "remote_addrs", [ANY], allow_any=True)
    local_addrs = _addresses(t, "local_addrs", [str(cluster.address)], allow_any=False)
    psk, psk_file = _psk(t, config_dir, read_file)
    children_t = t.table("children", {})
    children = {cname: _child(_sub(children_t, cname), cname) for cname in children_t.data}
    children_t.known += list(children_t.data)
    starts = [c.name for c in children.values() if c.start_action == "start"]
    if starts and not remote_addrs:
        raise t.error("remote_addrs", f'a peer address to initiate to (child "{starts[0]}" '
                                      'has start_action = "start")', '["%any"]')
    mobike = t.boolean("mobike", False)
    if mobike:
        raise t.error("mobike", "false (MOBIKE is not supported)", "true")
    conn = ConnectionConfig(
        name=name,
        remote_addrs=tuple(remote_addrs),
        local_addrs=tuple(local_addrs),
        remote_port=t.integer("remote_port", 500, 1, 65535),
        proposals=_proposals(t, "proposals", DEFAULT_IKE_PROPOSAL, esp=False),
        local_id=_identity(t, "local_id", str(cluster.address), allow_any=False),
        remote_id=_identity(t, "remote_id", ANY, allow_any=True),
        dpd_delay=t.duration("dpd_delay", 10),
        rekey_time=t.duration("rekey_time", 14400),
        reauth_time=t.duration("reauth_time", 0),
        mobike=mobike,
        children=children,
        psk_file=psk_file,
        psk=psk,
    )
    t.done()
    return conn


def _sub(parent: _Table, key: str) -> _Table:
    value = parent.data[key]
    if not isinstance(value, dict):
        raise parent.error(key, "a table", _show(value))
    return _Table(parent.filename, parent.at(key), value)


def load_config(text: str, filename: str, read_file: ReadFile | None = None) -> Config:
    """Parse and check a configuration file's ``text``; ``filename`` names it in
    messages and anchors relative ``psk_file`` paths. With ``read_file``, each
    ``psk_file`` is read now into ``ConnectionConfig.psk``; without, ``psk`` stays
    None and ``psk_file`` holds the path for the caller. Raises ``ConfigError``.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(filename, "", "valid TOML", f"a syntax error: {exc}") from None
    root = _Table(filename, "", data)
    cluster = _cluster(root.table("cluster"))
    conns_t = root.table("connections")
    if not conns_t.data:
        raise root.error("connections", "at least one [connections.NAME] table", "none")
    config_dir = PurePosixPath(filename).parent
    connections = {
        name: _connection(_sub(conns_t, name), name, cluster, config_dir, read_file)
        for name in conns_t.data
    }
    root.done()
    return Config(cluster=cluster, connections=connections, source=filename)
