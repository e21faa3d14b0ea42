"""common/config.py: the example files, every kind of error, identities, secrets."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from bench.harness.configs import dumps
from common.config import (
    ConfigError,
    decode_psk,
    load_config,
    parse_identity,
)
from common.ike.constants import IdType, TsType

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DELETE = object()
PSK = "s3cret-psk-value"

BASE: dict[str, Any] = {
    "cluster": {"address": "198.18.0.2", "inside": "tun:ipsc0"},
    "connections": {
        "branch": {
            "remote_addrs": ["198.18.0.1"],
            "local_id": "gw.test",
            "remote_id": "branch.test",
            "psk": PSK,
            "children": {
                "net": {"local_ts": ["10.91.2.0/24"], "remote_ts": ["10.91.1.0/24"]},
            },
        },
    },
}


def with_change(path: str, value: Any) -> str:
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return dumps(data)


def test_base_config_is_valid() -> None:
    cfg = load_config(dumps(BASE), "gw.toml")
    assert cfg.source == "gw.toml"
    assert cfg.cluster.address == ipaddress.ip_address("198.18.0.2")
    assert cfg.cluster.replay_after_failover == "rekey"
    conn = cfg.connections["branch"]
    assert conn.local_addrs == (ipaddress.ip_address("198.18.0.2"),)
    assert conn.psk == PSK.encode()
    assert conn.remote_id.id_type == IdType.ID_FQDN
    assert [p.text for p in conn.proposals] == ["aes128gcm16-prfsha256-ecp256"]
    child = conn.children["net"]
    assert [p.text for p in child.esp_proposals] == ["aes128gcm16"]
    assert child.remote_nets == (ipaddress.ip_network("10.91.1.0/24"),)


@pytest.mark.parametrize("name", ["gateway.toml", "peer.toml"])
def test_examples_parse(name: str) -> None:
    cfg = load_config((EXAMPLES / name).read_text(), name)
    assert len(cfg.connections) == 1
    conn = next(iter(cfg.connections.values()))
    assert conn.psk is not None
    for p in (*conn.proposals, *next(iter(conn.children.values())).esp_proposals):
        assert p.text


def test_examples_mirror_each_other() -> None:
    gw = load_config((EXAMPLES / "gateway.toml").read_text(), "gateway.toml")
    peer = load_config((EXAMPLES / "peer.toml").read_text(), "peer.toml")
    g, p = gw.connections["branch"], peer.connections["gw"]
    assert p.remote_addrs == (gw.cluster.address,)
    assert (g.local_id.text, g.remote_id.text) == (p.remote_id.text, p.local_id.text)
    assert g.psk == p.psk
    gc, pc = g.children["net"], p.children["net"]
    assert (gc.local_nets, gc.remote_nets) == (pc.remote_nets, pc.local_nets)
    assert pc.start_action == "start" and gc.start_action == "none"


def test_message_format_from_the_docs() -> None:
    text = with_change("connections.branch.children.net.local_ts", ["10.91.2.0/33"])
    with pytest.raises(ConfigError) as err:
        load_config(text, "gateway.toml")
    assert str(err.value) == (
        'gateway.toml: connections.branch.children.net.local_ts[0]: '
        'expected a CIDR like "10.91.2.0/24", got "10.91.2.0/33"')
    assert err.value.path == "connections.branch.children.net.local_ts[0]"
    assert isinstance(err.value, ValueError)


C = "cluster."
B = "connections.branch."
N = "connections.branch.children.net."

BAD = [
    # (key changed, new value, key path in the message, expectation fragment)
    (C + "address", DELETE, C + "address", "required"),
    (C + "address", "198.18.0.300", C + "address", "IPv4 or IPv6 address"),
    (C + "address", 5, C + "address", 'expected an IPv4 or IPv6 address like "198.18.0.2", got 5'),
    (C + "adress", "198.18.0.2", C + "adress", 'did you mean "address"'),
    (C + "ike_port", 0, C + "ike_port", "1..65535"),
    (C + "ike_port", 70000, C + "ike_port", "1..65535"),
    (C + "ike_port", "500", C + "ike_port", 'got "500"'),
    (C + "ike_port", True, C + "ike_port", "got true"),
    (C + "natt_port", 500, C + "natt_port", "other than ike_port"),
    (C + "inside", "eth:x", C + "inside", '"tun:NAME" or "udp:HOST:PORT"'),
    (C + "inside", "tun:", C + "inside", "device name"),
    (C + "inside", "tun:muchtoolongname1", C + "inside", "device name"),
    (C + "inside", "udp:localhost:9000", C + "inside", "HOST:PORT"),
    (C + "inside", "udp:127.0.0.1:99999", C + "inside", "HOST:PORT"),
    (C + "inside", "udp:127.0.0.1:0", C + "inside", "1..65535"),
    (C + "inside_bind", "127.0.0.1:9", C + "inside_bind", "only a udp: inside"),
    (C + "inside_address", "10.91.2.1/33", C + "inside_address", '"10.91.2.1/24"'),
    (C + "members", 0, C + "members", "1..64"),
    (C + "members", 65, C + "members", "1..64"),
    (C + "members", 3.5, C + "members", "an integer"),
    (C + "mode", "active", C + "mode", '"load-sharing", "hot-standby"'),
    (C + "replay_window", 16, C + "replay_window", "32..65536"),
    (C + "replay_window", 100000, C + "replay_window", "32..65536"),
    (C + "segment_bits", 0, C + "segment_bits", "1..16"),
    (C + "segment_bits", 17, C + "segment_bits", "1..16"),
    (C + "heartbeat_interval", 0, C + "heartbeat_interval", "seconds"),
    (C + "heartbeat_interval", "fast", C + "heartbeat_interval", "seconds"),
    (C + "dead_after", 0, C + "dead_after", "1..1000"),
    (C + "replay_after_failover", "loose", C + "replay_after_failover", '"strict"'),
    (C + "log_level", "verbose", C + "log_level", '"debug"'),
    (C + "sync", "zmq://x", C + "sync", '"tcp://HOST:PORT"'),
    (C + "sync", "tcp://hostname", C + "sync", "HOST:PORT"),
    (C + "members", 0, C + "members", "1.."),
    (C + "metrics_port", -1, C + "metrics_port", "0..65535"),
    ("cluster", DELETE, "cluster", "a table"),
    ("cluster", "x", "cluster", "a table"),
    ("connections", DELETE, "connections", "required"),
    ("connections", {}, "connections", "at least one"),
    ("conections", {"x": {}}, "conections", 'did you mean "connections"'),
    ("connections.branch", 5, "connections.branch", "a table"),
    (B + "remote_addrs", "198.18.0.1", B + "remote_addrs", "array of strings"),
    (B + "remote_addrs", ["peer.example"], B + "remote_addrs[0]", "IPv4 or IPv6 address"),
    (B + "remote_addrs", ["198.18.0.1", 7], B + "remote_addrs[1]", "a string"),
    (B + "local_addrs", [], B + "local_addrs", "non-empty array"),
    (B + "remote_port", 0, B + "remote_port", "1..65535"),
    (B + "proposals", [], B + "proposals", "non-empty array"),
    (B + "proposals", [1], B + "proposals[0]", "a string"),
    (B + "local_id", "", B + "local_id", "an identity"),
    (B + "local_id", "%any", B + "local_id", "an identity"),
    (B + "remote_id", "C=CH, XY=strongSwan", B + "remote_id", "is not an attribute like CN=name"),
    (B + "psk_file", "branch.psk", B + "psk_file", "exactly one of psk or psk_file, got both"),
    (B + "psk", DELETE, B + "psk", "exactly one of psk or psk_file, got neither"),
    (B + "psk", "", B + "psk", "got an empty key"),
    (B + "psk", "0xzz", B + "psk", "hex"),
    (B + "psk", "0s!!!", B + "psk", "base64"),
    (B + "psk", 12345, B + "psk", "a string"),
    (B + "dpd_delay", -1, B + "dpd_delay", "seconds"),
    (B + "dpd_delay", "10x", B + "dpd_delay", "seconds"),
    (B + "rekey_time", 1.5, B + "rekey_time", "seconds"),
    (B + "mobike", True, B + "mobike", "MOBIKE is not supported"),
    (B + "mobike", "no", B + "mobike", "true or false"),
    (B + "rekeytime", 10, B + "rekeytime", 'did you mean "rekey_time"'),
    (B + "children", [], B + "children", "a table"),
    (B + "children.net", "x", B + "children.net", "a table"),
    (N + "local_ts", ["10.91.2.1/24"], N + "local_ts[0]", "did you mean 10.91.2.0/24"),
    (N + "local_ts", ["10.91.2.0/24", "fe80::/129"], N + "local_ts[1]", "a CIDR"),
    (N + "local_ts", ["dynamic"], N + "local_ts[0]", "a CIDR"),
    (N + "remote_ts", DELETE, N + "remote_ts", "required"),
    (N + "remote_ts", [], N + "remote_ts", "non-empty array"),
    (N + "esp_proposals", "aes128gcm16", N + "esp_proposals", "array of strings"),
    (N + "start_action", "trap", N + "start_action", '"none", "start"'),
    (N + "dpd_action", "hold", N + "dpd_action", '"clear", "restart"'),
    (N + "life_packets", 10, N + "rekey_packets", "fewer than life_packets"),
    (N + "life_packets", -1, N + "life_packets", "an integer"),
    (N + "localts", ["10.0.0.0/8"], N + "localts", 'did you mean "local_ts"'),
    (B + "remote_addrs", ["%any"], B + "remote_addrs", "a peer address to initiate to"),
]


@pytest.mark.parametrize(("key", "value", "path", "fragment"), BAD,
                         ids=[f"{k}={v!r}"[:60] for k, v, _, _ in BAD])
def test_bad_config(key: str, value: Any, path: str, fragment: str) -> None:
    text = with_change(key, value)
    if path == B + "remote_addrs" and fragment.startswith("a peer"):
        text = text.replace("[connections.branch.children.net]",
                            '[connections.branch.children.net]\nstart_action = "start"')
    if key == N + "life_packets" and value == 10:
        text = text.replace("life_packets = 10", "life_packets = 10\nrekey_packets = 10")
    with pytest.raises(ConfigError) as err:
        load_config(text, "gw.toml")
    msg = str(err.value)
    assert msg.startswith(f"gw.toml: {path}: expected "), msg
    assert fragment in msg, msg
    assert "\n" not in msg
    assert PSK not in msg and "0xzz" not in msg and "12345" not in msg


def test_toml_syntax_error_names_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^gw\.toml: expected valid TOML, got a syntax error"):
        load_config("[cluster\naddress = 1", "gw.toml")


def test_bad_proposals_are_rejected() -> None:
    for key, good in ((B + "proposals", "aes128gcm16-prfsha256-ecp256"),
                      (N + "esp_proposals", "aes128gcm16")):
        with pytest.raises(ConfigError) as err:
            load_config(with_change(key, [good, "bogus-cipher"]), "gw.toml")
        assert str(err.value).startswith(f"gw.toml: {key}[1]: expected ")
        assert 'got "bogus-cipher"' in str(err.value)


def test_proposals_are_parsed() -> None:
    conn = load_config(dumps(BASE), "gw.toml").connections["branch"]
    assert conn.proposals[0].proposal is not None
    assert conn.children["net"].esp_proposals[0].proposal is not None


def test_psk_never_in_repr() -> None:
    cfg = load_config(with_change(B + "psk", PSK), "gw.toml")
    assert PSK not in repr(cfg)
    assert PSK not in repr(cfg.connections["branch"])
    assert PSK not in str(cfg.connections["branch"])


def test_curve_secret_not_in_repr() -> None:
    text = with_change(C + "curve_secret_key", "secret-key-path")
    text = text.replace("[cluster]", '[cluster]\ncurve_server_key = "pub"')
    cfg = load_config(text, "gw.toml")
    assert cfg.cluster.curve_secret_key == "secret-key-path"
    assert "secret-key-path" not in repr(cfg)


def test_psk_file_read_through_callback_relative_to_config() -> None:
    text = with_change(B + "psk", DELETE).replace(
        "[connections.branch]", '[connections.branch]\npsk_file = "keys/branch.psk"')
    seen: list[str] = []

    def read(path: str) -> bytes:
        seen.append(path)
        return b"0x0102030405060708\n"

    conn = load_config(text, "/etc/ipsec-cluster/gw.toml", read).connections["branch"]
    assert seen == ["/etc/ipsec-cluster/keys/branch.psk"]
    assert conn.psk == bytes(range(1, 9))
    assert conn.psk_file == "/etc/ipsec-cluster/keys/branch.psk"
    # without a reader the shell gets the path and reads it itself
    conn = load_config(text, "gw.toml").connections["branch"]
    assert conn.psk is None and conn.psk_file == "keys/branch.psk"


def test_psk_file_unreadable() -> None:
    text = with_change(B + "psk", DELETE).replace(
        "[connections.branch]", '[connections.branch]\npsk_file = "/abs/missing.psk"')

    def read(path: str) -> bytes:
        raise FileNotFoundError(2, "No such file or directory", path)

    with pytest.raises(ConfigError) as err:
        load_config(text, "gw.toml", read)
    assert str(err.value) == ('gw.toml: connections.branch.psk_file: expected a readable UTF-8 '
                              'file, got "/abs/missing.psk" (No such file or directory)')


def test_psk_file_empty() -> None:
    text = with_change(B + "psk", DELETE).replace(
        "[connections.branch]", '[connections.branch]\npsk_file = "k"')
    with pytest.raises(ConfigError, match=r"psk_file: expected a non-empty key.*got an empty key"):
        load_config(text, "gw.toml", lambda p: b"\n")


@pytest.mark.parametrize(("text", "expected"), [
    ("plain", b"plain"),
    ("0x00ff", b"\x00\xff"),
    ("0sAAE=", b"\x00\x01"),
])
def test_decode_psk(text: str, expected: bytes) -> None:
    assert decode_psk(text) == expected


@pytest.mark.parametrize(("text", "id_type", "data"), [
    ("198.18.0.2", IdType.ID_IPV4_ADDR, bytes([198, 18, 0, 2])),
    ("2001:db8::1", IdType.ID_IPV6_ADDR, ipaddress.ip_address("2001:db8::1").packed),
    ("gw.test", IdType.ID_FQDN, b"gw.test"),
    ("@gw.test", IdType.ID_FQDN, b"gw.test"),
    ("admin@gw.test", IdType.ID_RFC822_ADDR, b"admin@gw.test"),
    ("keyid:abc", IdType.ID_KEY_ID, b"abc"),
    ("keyid:#0a0b", IdType.ID_KEY_ID, b"\x0a\x0b"),
    ("@#0a0b", IdType.ID_KEY_ID, b"\x0a\x0b"),
    ("fqdn:198.18.0.2", IdType.ID_FQDN, b"198.18.0.2"),
    ("email:gw.test", IdType.ID_RFC822_ADDR, b"gw.test"),
    ("ipv4:10.0.0.1", IdType.ID_IPV4_ADDR, bytes([10, 0, 0, 1])),
    ("ipv6:::1", IdType.ID_IPV6_ADDR, ipaddress.ip_address("::1").packed),
    ("host", IdType.ID_FQDN, b"host"),
])
def test_parse_identity(text: str, id_type: IdType, data: bytes) -> None:
    assert parse_identity(text) == (id_type, data)


@pytest.mark.parametrize("text", ["", " gw", "%any", "@", "keyid:#zz", "ipv4:::1",
                                  "ipv6:10.0.0.1", "fqdn:", "CN=gw, Q=test"])
def test_parse_identity_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_identity(text)


def test_remote_id_any_and_remote_addrs_any() -> None:
    text = with_change(B + "remote_id", "%any")
    text = text.replace('remote_addrs = ["198.18.0.1"]', 'remote_addrs = ["%any"]')
    conn = load_config(text, "gw.toml").connections["branch"]
    assert conn.remote_id.is_any and conn.remote_id.id_type is None
    assert conn.remote_addrs == ()


def test_udp_inside_and_ipv6() -> None:
    data = copy.deepcopy(BASE)
    data["cluster"].update(address="2001:db8::2", inside="udp:[::1]:9000",
                           inside_bind="[::1]:9001", inside_address="fd00::1/64")
    child = data["connections"]["branch"]["children"]["net"]
    child.update(local_ts=["fd00:1::/64", "0.0.0.0/0"], remote_ts=["::/0"])
    data["connections"]["branch"]["remote_addrs"] = ["2001:db8::1"]
    cfg = load_config(dumps(data), "gw.toml")
    inside = cfg.cluster.inside
    assert inside.kind == "udp"
    assert (inside.host, inside.port) == (ipaddress.ip_address("::1"), 9000)
    assert (inside.bind_host, inside.bind_port) == (ipaddress.ip_address("::1"), 9001)
    net = cfg.connections["branch"].children["net"]
    assert [ts.ts_type for ts in net.local_ts] == [TsType.TS_IPV6_ADDR_RANGE,
                                                   TsType.TS_IPV4_ADDR_RANGE]
    assert net.remote_ts[0].end_addr == ipaddress.ip_address("ffff:ffff:ffff:ffff:ffff:ffff:"
                                                             "ffff:ffff")
    assert cfg.connections["branch"].local_addrs == (ipaddress.ip_address("2001:db8::2"),)


def test_udp_inside_default_bind() -> None:
    cfg = load_config(with_change(C + "inside", "udp:127.0.0.1:9000"), "gw.toml")
    assert cfg.cluster.inside.bind_host == ipaddress.ip_address("127.0.0.1")
    assert cfg.cluster.inside.bind_port == 0


def test_durations_accept_swanctl_units() -> None:
    text = with_change(B + "rekey_time", "4h").replace(
        "[connections.branch.children.net]",
        '[connections.branch.children.net]\nrekey_time = "30m"')
    conn = load_config(text, "gw.toml").connections["branch"]
    assert conn.rekey_time == 4 * 3600
    assert conn.children["net"].rekey_time == 1800


def test_config_is_frozen() -> None:
    cfg = load_config(dumps(BASE), "gw.toml")
    with pytest.raises(AttributeError):
        cfg.cluster.ike_port = 1  # type: ignore[misc]
