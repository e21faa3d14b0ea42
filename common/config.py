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

from common.cluster.pools import Pool
from common.errors import IpsecClusterError
from common.ike.certs import (
    LocalCredential,
    TrustAnchors,
    format_dn,
    load_certificates,
    load_credential,
    parse_dn,
)
from common.ike.constants import IdType
from common.ike.proposals import expand_esp_proposal, expand_ike_proposal
from common.ike.transforms import Proposal
from common.ike.ts import TrafficSelector, ts_from_cidr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
#: Reads a file by path (the shell passes ``lambda p: Path(p).read_bytes()``).
ReadFile = Callable[[str], bytes]

MIN_REPLAY_WINDOW = 32  # same bounds as common/esp/replay.py
MAX_REPLAY_WINDOW = 65536
MAX_MEMBERS = 64
IFNAMSIZ = 16  # Linux interface names: at most 15 bytes + NUL
#: sun_path of a Unix socket: 108 bytes with the NUL (unix(7)); ipc:// endpoints are ones
UNIX_PATH_MAX = 107
#: control sockets made in the ``control`` folder (the longest name counts)
CONTROL_SOCKETS = ("control.ipc", "members.ipc")
#: connection and child names travel as strings with a one-byte length (common/cluster/wire.py)
MAX_NAME_BYTES = 255
#: identities: host names are at most 253 bytes (RFC 1035), e-mail addresses 254
MAX_ID_BYTES = 255
#: RFC 7296 §3.13: "Number of TSs" is one octet; §3.3: proposal numbers are one octet
MAX_ITEMS = 255
#: durations are unsigned 32-bit seconds, as swanctl's (about 136 years)
MAX_DURATION_S = (1 << 32) - 1
#: shown values are cut to this many characters so that a message stays one short line
SHOW_MAX_CHARS = 80
ANY = "%any"
DEFAULT_IKE_PROPOSAL = "aes128gcm16-prfsha256-ecp256"
DEFAULT_ESP_PROPOSAL = "aes128gcm16"
_MISSING: Any = object()
_ADDRESS = 'an IPv4 or IPv6 address like "198.18.0.2"'
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DURATION = re.compile(r"^([0-9]{1,10})([smhd]?)$")
_Z85 = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
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
    route_table: int = 220  # tun: our routing table, rule priority (member/routes.py)
    route_mark: int = 0x220  # tun: SO_MARK of our own IKE/ESP sockets (+1: decrypted)


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
class PoolConfig:
    """``[pools.NAME]``: virtual IPs handed out in CP replies (RFC 7296 §3.15)."""

    name: str
    addrs: IPNetwork
    dns: tuple[IPAddress, ...] = ()


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
    #: RFC 7383 (strongSwan's values; "force" acts as "yes" in IKEv2)
    fragmentation: Literal["yes", "accept", "force", "no"] = "yes"
    psk_file: str | None = None  # resolved path; set when psk_file was used
    psk: bytes | None = field(default=None, repr=False)  # None: psk_file not read yet
    pools: tuple[str, ...] = ()  # names of [pools.NAME] tables, tried in order
    #: "rsa/pss" is "pubkey" signing RSA with RSASSA-PSS (swanctl's name)
    local_auth: Literal["psk", "pubkey", "rsa/pss"] = "psk"
    remote_auth: Literal["psk", "pubkey"] = "psk"
    local_cert: str | None = None  # resolved paths (local_auth = "pubkey")
    local_key: str | None = None
    remote_cacerts: tuple[str, ...] = ()  # resolved paths (remote_auth = "pubkey")
    #: loaded when the config is read with ``read_file``
    credential: LocalCredential | None = field(default=None, repr=False)
    anchors: TrustAnchors | None = field(default=None, repr=False)


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
    #: "text" (one readable line) or "json" (one JSON object a line)
    log_format: Literal["text", "json"] = "text"
    #: folder for Wireshark's esp_sa and ikev2_decryption_table ("" = off)
    save_keys: str = ""
    #: where the Prometheus metrics listen (with metrics_port)
    metrics_address: str = "127.0.0.1"
    #: "kernel": members on the dispatcher's host receive and send their own
    #: ESP and IKE (an SO_REUSEPORT group steered by SPI, docs/routing.md);
    #: "relay": every datagram through the dispatcher over ZeroMQ
    data_path: Literal["kernel", "relay"] = "kernel"
    #: a member that hears no dispatcher this long (seconds) stops, to be
    #: started anew by its supervisor (0 = it keeps trying to reattach forever;
    #: docs/failover.md "Reattach")
    orphan_after: float = 60.0
    #: two dispatcher hosts (docs/failover.md "Two dispatcher hosts"): a
    #: member's second dispatcher endpoint ("tcp://HOST:PORT", "" = one
    #: dispatcher) and that dispatcher's public key file
    sync_standby: str = ""
    curve_server_key_standby: str = ""
    #: the role ``run`` starts the dispatcher in: "active", or "standby" (it
    #: takes no member until ``ipsec-cluster role active``, keepalived's notify)
    role: Literal["active", "standby"] = "active"


@dataclass(slots=True, frozen=True)
class Config:
    cluster: ClusterConfig
    connections: dict[str, ConnectionConfig]
    source: str  # the file name the text came from
    pools: dict[str, PoolConfig] = field(default_factory=dict)


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
        # strongSwan's "C=CH, O=Example, CN=gw.example" (RFC 4514-like)
        return IdType.ID_DER_ASN1_DN, parse_dn(text)
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


def _show(value: object, *, cut: bool = True) -> str:
    """A value as it would look in TOML (strings in double quotes), on one short
    line: control characters escaped, long values cut (file paths only with
    ``cut=False``: a cut path names no file)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value[:SHOW_MAX_CHARS] if cut else value
        text = "".join(_escape(ch) for ch in shown)
        return f'"{text}"' + ("... (cut)" if len(shown) < len(value) else "")
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int) and value.bit_length() > 64:
        # str() of a huge integer is slow and may raise (sys.set_int_max_str_digits)
        return f"an integer of {value.bit_length()} bits"
    return str(value)[:SHOW_MAX_CHARS]


def _escape(ch: str) -> str:
    if ch in '\\"':
        return "\\" + ch
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _show(name)


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

    def filepath(self, key: str, *, secret: bool = False) -> str:
        """A file or folder name, "" when not set; a NUL byte cannot be in a path."""
        value = self.string(key, "", secret=secret, expected="a path (a string)")
        if "\0" in value:
            raise self.error(key, "a path without NUL characters",
                             "a path with one" if secret else _show(value))
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
        expected = f'seconds (an integer in 0..{MAX_DURATION_S}, or a string like "4h")'
        value = self.raw(key, default, expected)
        if isinstance(value, str) and (m := _DURATION.fullmatch(value)):
            value = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
            if value > MAX_DURATION_S:
                raise self.error(key, expected, f"{_show(m.group(0))} ({value} s)")
            return value
        if (isinstance(value, bool) or not isinstance(value, int)
                or not 0 <= value <= MAX_DURATION_S):
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
        if len(value) > MAX_ITEMS:
            raise self.error(key, f"{expected} of at most {MAX_ITEMS} items",
                             f"{len(value)} items")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _item_error(self, key, i, "a string", _show(item))
            if item in value[:i]:
                raise _item_error(self, key, i, "each item once",
                                  f"{_show(item)} again (also item {value.index(item)})")
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
        # strongSwan's table 220 (priority 220); 253..255 are the kernel's own
        table = t.integer("route_table", 220, 2, 32765, " (not 253..255)")
        if table in (253, 254, 255):
            raise t.error("route_table", "a table other than 253..255 (default, main, local)",
                          str(table))
        mark = t.integer("route_mark", 0x220, 1, 0xFFFFFFFE)
        return InsideConfig("tun", name=rest, route_table=table, route_mark=mark)
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
    expected = 'an identity like "gw.example", "@gw.example", "user@example", ' \
               '"198.18.0.2", "C=CH, O=Example, CN=gw" or "keyid:..."' + (
                   ' or "%any"' if allow_any else "")
    try:
        id_type, data = parse_identity(text)
    except ValueError as exc:
        raise t.error(key, f"{expected} ({exc})", _show(text)) from None
    if len(data) > MAX_ID_BYTES:
        raise t.error(key, f"{expected} of at most {MAX_ID_BYTES} bytes",
                      f"{_show(text)} ({len(data)} bytes)")
    return Identity(text, id_type, data)


def _sync(t: _Table, key: str = "sync") -> str:
    sync = t.filepath(key)
    if sync.startswith("ipc://") and key == "sync":
        _socket_path(t, key, sync.removeprefix("ipc://"))
    elif sync.startswith("tcp://"):
        _, port = _host_port(t, key, sync.removeprefix("tcp://"), "tcp://198.18.0.2:7000")
        if port == 0:
            raise t.error(key, "a port in 1..65535", _show(sync))
    elif sync:
        raise t.error(key, '"", "ipc://PATH" or "tcp://HOST:PORT"' if key == "sync"
                      else '"" or "tcp://HOST:PORT"', _show(sync))
    return sync


def _socket_path(t: _Table, key: str, path: str) -> None:
    """A Unix socket's path must fit ``sun_path`` (unix(7)), or binding it fails."""
    size = len(path.encode())
    if path in ("", "/") or size > UNIX_PATH_MAX:
        raise t.error(key, f"a socket path of 1..{UNIX_PATH_MAX} bytes (a Unix socket's "
                           "limit)", f"{_show(path)} ({size} bytes)")


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
    sync = _sync(t)
    tcp = sync.startswith("tcp://")
    most = min(MAX_MEMBERS, 1 << segment_bits)
    # Members on other hosts: the dispatcher may start none itself.
    members = t.integer("members", 1, 0 if tcp else 1, most, " (at most 2**segment_bits"
                        + ('; 0 only with a "tcp://" sync' if not tcp else "") + ")")
    expect_members = t.integer("expect_members", members or _MISSING, max(members, 1), most,
                               " (at least members; required when members = 0)")
    secret = t.filepath("curve_secret_key", secret=True)
    if tcp and not secret:
        raise t.error("curve_secret_key", "the path of our CURVE secret key file (sync is "
                      "tcp://, which needs CURVE; make keys with `ipsec-cluster keygen`)",
                      "nothing")
    server_key = t.filepath("curve_server_key")
    sync_standby = _sync(t, "sync_standby")
    server_key_standby = t.filepath("curve_server_key_standby")
    if sync_standby and not server_key_standby:
        raise t.error("curve_server_key_standby", "the path of the standby dispatcher's "
                      "public key file (sync_standby is set)", "nothing")
    authorized = t.filepath("curve_authorized")
    control = t.filepath("control")
    _socket_path(t, "control", f"{control}/{max(CONTROL_SOCKETS, key=len)}")
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
        control=control,
        metrics_port=t.integer("metrics_port", 0, 0, 65535, " (0 = off)"),
        # loopback unless the operator opens it (a scraper on another host)
        metrics_address=str(_address(t, "metrics_address",
                                     t.string("metrics_address", "127.0.0.1"))),
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
        log_format=t.choice("log_format", "text", ("text", "json")),
        save_keys=t.filepath("save_keys"),
        data_path=t.choice("data_path", "kernel", ("kernel", "relay")),
        orphan_after=t.number("orphan_after", 60.0, 0.0, 86400.0),
        sync_standby=sync_standby,
        curve_server_key_standby=server_key_standby,
        role=t.choice("role", "active", ("active", "standby")),
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
         read_file: ReadFile | None, needed: bool = True) -> tuple[bytes | None, str | None]:
    has_psk, has_file = "psk" in t.data, "psk_file" in t.data
    if not needed and not has_psk and not has_file:
        return None, None
    if has_psk == has_file:
        t.known += ["psk", "psk_file"]
        raise t.error("psk_file" if has_psk else "psk", "exactly one of psk or psk_file",
                      "both" if has_psk else "neither")
    if has_psk:
        text, where = t.string("psk", secret=True), "psk"
    else:
        name = t.filepath("psk_file")
        if not name:
            raise t.error("psk_file", "the path of a file holding the key", '""')
        path = str(config_dir / name)
        if read_file is None:
            return None, path
        try:
            text = read_file(path).decode().rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise t.error("psk_file", "a readable UTF-8 file", f"{_show(path, cut=False)} (byte "
                          f"at offset {exc.start} is not UTF-8)") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise t.error("psk_file", "a readable UTF-8 file",
                          f"{_show(path, cut=False)} ({reason})") from None
        where = "psk_file"
    try:
        return decode_psk(text), None if has_psk else path
    except ValueError as exc:
        got = "an empty key" if not text else "a key that does not decode (not shown)"
        raise t.error(where, f"a non-empty key: text, 0x + hex or 0s + base64 ({exc})",
                      got) from None


def curve_certificate_problem(data: bytes, secret: bool) -> str:
    """What is wrong with a ZeroMQ CURVE certificate file (as written by
    ``ipsec-cluster keygen``), or "" when it holds a usable public key (and,
    with ``secret``, a secret key): Z85 keys of 40 characters (ZMTP CURVE, RFC 32
    of the ZeroMQ RFCs). Never shows the key."""
    keys: dict[bytes, bytes] = {}
    for line in data.splitlines():
        line = line.strip()
        for name in (b"public-key", b"secret-key"):
            if line.startswith(name) and name not in keys:
                _, eq, value = line.partition(b"=")
                keys[name] = value.strip(b" \t'\"") if eq else b""
    for name in (b"public-key", b"secret-key") if secret else (b"public-key",):
        if name not in keys:
            hint = "; is it the public NAME.key?" if name == b"secret-key" else ""
            return f"no {name.decode()} line{hint}"
        if not _Z85.fullmatch(keys[name]):
            return f"its {name.decode()} is not 40 Z85 characters"
    return ""


def _curve_files(filename: str, cluster: ClusterConfig, config_dir: PurePosixPath,
                 read_file: ReadFile) -> None:
    """The CURVE key files exist and hold keys: checked at load, not when a
    member first connects."""
    for key, name, secret in (("curve_secret_key", cluster.curve_secret_key, True),
                              ("curve_server_key", cluster.curve_server_key, False),
                              ("curve_server_key_standby", cluster.curve_server_key_standby,
                               False)):
        if not name:
            continue
        path = str(config_dir / name)
        expected = ("a CURVE secret key file (NAME.key_secret from `ipsec-cluster keygen`)"
                    if secret else
                    "a CURVE public key file (NAME.key from `ipsec-cluster keygen`)")
        try:
            problem = curve_certificate_problem(read_file(path), secret)
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        if problem:
            raise ConfigError(filename, f"cluster.{key}", expected,
                              f"{_show(path, cut=False)} ({problem})")


#: a pool smaller than this per segment is refused: some segments would have
#: no address at all to lease (docs/config.md "[pools.NAME]")
MIN_POOL_ADDRS_PER_SEGMENT = 1


def _pool(t: _Table, name: str, segment_bits: int) -> PoolConfig:
    text = t.string("addrs", expected='a CIDR like "10.3.0.0/16"')
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise t.error("addrs", 'a CIDR like "10.3.0.0/16"', _show(text)) from None
    size = Pool(name, net).size
    segments = 1 << segment_bits
    if size < segments * MIN_POOL_ADDRS_PER_SEGMENT:
        # Leases come from per-segment partitions (address index mod segments).
        raise t.error("addrs", f"a prefix of at least {segments} usable addresses (one per "
                               f"segment; cluster.segment_bits = {segment_bits})",
                      f"{_show(text)} ({size} addresses)")
    dns = tuple(_address(t, "dns", a, i)
                for i, a in enumerate(t.strings("dns", [], nonempty=False)))
    t.done()
    return PoolConfig(name, net, dns)


def _connection(t: _Table, name: str, cluster: ClusterConfig, config_dir: PurePosixPath,
                read_file: ReadFile | None, pools: dict[str, PoolConfig]) -> ConnectionConfig:
    remote_addrs = _addresses(t, "remote_addrs", [ANY], allow_any=True)
    local_addrs = _addresses(t, "local_addrs", [str(cluster.address)], allow_any=False)
    auth = _auth(t, config_dir, read_file)
    psk, psk_file = _psk(t, config_dir, read_file, needed="psk" in (auth.local, auth.remote))
    children_t = t.table("children", {})
    if not children_t.data:
        # A connection without children would negotiate IKE SAs that carry nothing.
        raise t.error("children", f"at least one child: add a [{t.at('children')}.NAME] table "
                                  "with local_ts and remote_ts", "none")
    children = {cname: _child(_sub(children_t, cname), cname) for cname in children_t.data}
    children_t.known += list(children_t.data)
    starts = [c.name for c in children.values() if c.start_action == "start"]
    if starts and not remote_addrs:
        raise t.error("remote_addrs", f'a peer address to initiate to (child "{starts[0]}" '
                                      'has start_action = "start")', '["%any"]')
    pool_names = t.strings("pools", [], nonempty=False)
    for i, pname in enumerate(pool_names):
        if pname not in pools:
            raise _item_error(t, "pools", i, "the name of a [pools.NAME] table (one of "
                              + (", ".join(_show(p) for p in pools) or "none defined") + ")",
                              _show(pname))
    mobike = t.boolean("mobike", False)
    if mobike:
        raise t.error("mobike", "false (MOBIKE is not supported)", "true")
    conn = ConnectionConfig(
        name=name,
        remote_addrs=tuple(remote_addrs),
        local_addrs=tuple(local_addrs),
        remote_port=t.integer("remote_port", 500, 1, 65535),
        proposals=_proposals(t, "proposals", DEFAULT_IKE_PROPOSAL, esp=False),
        local_id=(auth.default_id if auth.default_id is not None and "local_id" not in t.data
                  else _identity(t, "local_id", str(cluster.address), allow_any=False)),
        remote_id=_identity(t, "remote_id", ANY, allow_any=True),
        dpd_delay=t.duration("dpd_delay", 10),
        rekey_time=t.duration("rekey_time", 14400),
        reauth_time=t.duration("reauth_time", 0),
        mobike=mobike,
        children=children,
        fragmentation=t.choice("fragmentation", "yes", ("yes", "accept", "force", "no")),
        psk_file=psk_file,
        psk=psk,
        pools=tuple(pool_names),
        local_auth=auth.local,
        remote_auth=auth.remote,
        local_cert=auth.cert,
        local_key=auth.key,
        remote_cacerts=auth.cacerts,
        credential=auth.credential,
        anchors=auth.anchors,
    )
    t.done()
    return conn


@dataclass(slots=True)
class _Auth:
    local: Literal["psk", "pubkey", "rsa/pss"]
    remote: Literal["psk", "pubkey"]
    cert: str | None = None
    key: str | None = None
    cacerts: tuple[str, ...] = ()
    credential: LocalCredential | None = None
    anchors: TrustAnchors | None = None
    #: strongSwan's default local identity with a certificate: its subject DN
    default_id: Identity | None = None


def _read_pem(t: _Table, key: str, path: str, read_file: ReadFile, what: str,
              index: int | None = None) -> bytes:
    try:
        return read_file(path)
    except OSError as exc:
        got = f"{_show(path, cut=False)} ({exc.strerror or type(exc).__name__})"
        if index is not None:
            raise _item_error(t, key, index, what, got) from None
        raise t.error(key, what, got) from None


def _auth(t: _Table, config_dir: PurePosixPath, read_file: ReadFile | None) -> _Auth:
    """local_auth/remote_auth and their files (swanctl's local.auth,
    local.certs, remote.auth, remote.cacerts); with ``read_file`` the
    certificates and key are loaded and checked now."""
    auth = _Auth(t.choice("local_auth", "psk", ("psk", "pubkey", "rsa/pss")),
                 t.choice("remote_auth", "psk", ("psk", "pubkey")))
    files = {k: t.filepath(k) for k in ("local_cert", "local_key")}
    cacerts = t.strings("remote_cacerts", [], nonempty=False)
    if auth.local != "psk":
        for k, v in files.items():
            if not v:
                raise t.error(k, f'a PEM file (local_auth = "{auth.local}")', "nothing")
        auth.cert = str(config_dir / files["local_cert"])
        auth.key = str(config_dir / files["local_key"])
    if auth.remote == "pubkey":
        if not cacerts:
            raise t.error("remote_cacerts", 'at least one CA file (remote_auth = "pubkey")',
                          "none")
        auth.cacerts = tuple(str(config_dir / c) for c in cacerts)
    if read_file is None:
        return auth
    if auth.cert is not None and auth.key is not None:
        cert_pem = _read_pem(t, "local_cert", auth.cert, read_file, "a PEM certificate file")
        try:
            load_certificates(cert_pem)
        except ValueError as exc:
            raise t.error("local_cert", "a PEM certificate file",
                          f"{_show(auth.cert, cut=False)} ({str(exc).splitlines()[0]})") from None
        key_pem = _read_pem(t, "local_key", auth.key, read_file, "a PEM private key file")
        try:
            auth.credential = load_credential(cert_pem, key_pem, auth.local == "rsa/pss")
        except ValueError as exc:
            raise t.error("local_key", "the PEM private key of local_cert",
                          f"{_show(auth.key, cut=False)} ({exc})") from None
        subject = auth.credential.cert.subject.public_bytes()
        auth.default_id = Identity(format_dn(subject), IdType.ID_DER_ASN1_DN, subject)
    anchors = []
    for i, path in enumerate(auth.cacerts):
        pem = _read_pem(t, "remote_cacerts", path, read_file, "a PEM CA certificate file", i)
        try:
            anchors += load_certificates(pem)
        except ValueError as exc:
            raise _item_error(t, "remote_cacerts", i, "a PEM CA certificate file",
                              f"{_show(path, cut=False)} ({str(exc).splitlines()[0]})") from None
    if auth.cacerts:
        auth.anchors = TrustAnchors(tuple(anchors))
    return auth


def _sub(parent: _Table, key: str) -> _Table:
    """A named table (a connection or a child); its name goes into logs and onto
    the wire with a one-byte length."""
    value = parent.data[key]
    if not isinstance(value, dict):
        raise parent.error(key, "a table", _show(value))
    size = len(key.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_NAME_BYTES or not key.isprintable():
        raise ConfigError(parent.filename, parent.at(key), f"a name of 1..{MAX_NAME_BYTES} "
                          "bytes without control characters", f"{_show(key)} ({size} bytes)")
    return _Table(parent.filename, parent.at(key), value)


def decode_text(data: bytes, filename: str) -> str:
    """A configuration file's bytes as text: TOML files are UTF-8 (TOML 1.0
    §Spec); a leading byte order mark is dropped. Raises ``ConfigError`` naming
    the first bad byte and its offset."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(filename, "", "UTF-8 text (TOML files are UTF-8)",
                          f"byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) "
                          "that is not UTF-8") from None
    return text.removeprefix("\ufeff")


def _parse_toml(text: str, filename: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(filename, "", "valid TOML", f"a syntax error: {exc}") from None
    except ValueError as exc:
        # tomllib's int() of a literal beyond sys.get_int_max_str_digits()
        reason = str(exc).split(":")[0]
        raise ConfigError(filename, "", "valid TOML", f"a value it cannot hold ({reason})"
                          ) from None
    except RecursionError:
        raise ConfigError(filename, "", "TOML nested at most a few hundred levels deep",
                          "deeper nesting") from None


def load_config(text: str | bytes, filename: str, read_file: ReadFile | None = None) -> Config:
    """Parse and check a configuration file's ``text`` (or its bytes, which must
    be UTF-8); ``filename`` names it in messages and anchors relative paths. With
    ``read_file``, each ``psk_file`` is read now into ``ConnectionConfig.psk`` and
    the CURVE key files are checked; without, ``psk`` stays None and ``psk_file``
    holds the path for the caller. Raises ``ConfigError`` and nothing else.
    """
    if isinstance(text, bytes):
        text = decode_text(text, filename)
    root = _Table(filename, "", _parse_toml(text, filename))
    cluster = _cluster(root.table("cluster"))
    config_dir = PurePosixPath(filename).parent
    if read_file is not None:
        _curve_files(filename, cluster, config_dir, read_file)
    pools_t = root.table("pools", {})
    pools = {name: _pool(_sub(pools_t, name), name, cluster.segment_bits)
             for name in pools_t.data}
    pools_t.known += list(pools_t.data)
    conns_t = root.table("connections")
    if not conns_t.data:
        raise root.error("connections", "at least one [connections.NAME] table", "none")
    connections = {
        name: _connection(_sub(conns_t, name), name, cluster, config_dir, read_file, pools)
        for name in conns_t.data
    }
    root.done()
    return Config(cluster=cluster, connections=connections, source=filename, pools=pools)
