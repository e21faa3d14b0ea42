"""Hostile configuration files: every problem is one line, never a traceback.

In-process: each broken file raises exactly one ``ConfigError`` (no chained
exception), one line, naming the file and the key. As a command: what only the
host can tell (a key file missing, a folder that cannot be used, a port in use)
ends ``ipsec-cluster`` with exit status 2 and exactly one stderr line starting
``ipsec-cluster:``. Hypothesis: random TOML documents and random bytes give a
``Config`` or a ``ConfigError``, nothing else.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from hypothesis import given
from hypothesis import strategies as st

from bench.harness.configs import dumps
from bench.harness.procs import ROOT, cli_argv
from common.config import Config, ConfigError, load_config
from dispatcher.supervisor import run_dir
from member.config_file import read_config
from tests.fuzz import fuzz_settings
from tests.test_config import BASE, DELETE, PSK, with_change

CLI_TIMEOUT_S = 30.0
C = "cluster."
B = "connections.branch."
N = "connections.branch.children.net."
CHILD_HEADER = "[connections.branch.children.net]"


def _keys(tmp: Path) -> tuple[bytes, bytes]:
    """A public and a secret CURVE certificate, as files' bytes."""
    public, secret = zmq.auth.create_certificates(str(tmp), "k")
    return Path(public).read_bytes(), Path(secret).read_bytes()


def _edit(base: str, *lines: str, table: str = "[cluster]") -> str:
    return base.replace(table, table + "\n" + "\n".join(lines), 1)


def _no_children() -> str:
    data = copy.deepcopy(BASE)
    del data["connections"]["branch"]["children"]
    return dumps(data)


def _renamed(old: str, new: str) -> str:
    return dumps(BASE).replace(old, new)


@dataclass
class Bad:
    """A broken file: its text (or bytes), the key the message must name, and a
    fragment of what the message says; ``files`` are written next to it."""

    name: str
    text: str | bytes
    path: str
    fragment: str
    files: dict[str, bytes | Callable[[Path], bytes]] = field(default_factory=dict)


def _public(tmp: Path) -> bytes:
    return _keys(tmp)[0]


def _secret(tmp: Path) -> bytes:
    return _keys(tmp)[1]


TCP = ['sync = "tcp://127.0.0.1:7000"', 'curve_secret_key = "k.key_secret"']
BASE_TEXT = dumps(BASE)

BAD: list[Bad] = [
    # -- the attacker's findings ----------------------------------------------------
    Bad("not-utf8", b"\xff\xfe" + BASE_TEXT.encode(), "", "byte 0xff at offset 0 (line 1)"),
    Bad("not-utf8-later", BASE_TEXT.encode().replace(b"gw.test", b"gw.t\xe9st"), "",
        "at offset"),
    Bad("no-children", _no_children(), B + "children",
        "add a [connections.branch.children.NAME] table"),
    Bad("children-empty", with_change(B + "children", {}), B + "children",
        "at least one child"),
    Bad("curve-secret-missing", _edit(BASE_TEXT, *TCP), C + "curve_secret_key",
        "No such file or directory"),
    Bad("curve-secret-is-public", _edit(BASE_TEXT, *TCP), C + "curve_secret_key",
        "no secret-key line", {"k.key_secret": _public}),
    Bad("curve-secret-garbage", _edit(BASE_TEXT, *TCP), C + "curve_secret_key",
        "no public-key line", {"k.key_secret": b"\x00\x01not a certificate"}),
    Bad("curve-secret-short-key", _edit(BASE_TEXT, *TCP), C + "curve_secret_key",
        "not 40 Z85", {"k.key_secret": b'public-key = "abc"\nsecret-key = "def"\n'}),
    Bad("curve-secret-is-folder", _edit(BASE_TEXT, *TCP), C + "curve_secret_key",
        "Is a directory", {"k.key_secret/x": b""}),
    Bad("curve-server-missing", _edit(BASE_TEXT, 'curve_server_key = "dispatcher.key"'),
        C + "curve_server_key", "No such file or directory"),
    Bad("tcp-without-curve", _edit(BASE_TEXT, 'sync = "tcp://127.0.0.1:7000"'),
        C + "curve_secret_key", "needs CURVE"),
    # -- wrong types ----------------------------------------------------------------
    Bad("address-int", with_change(C + "address", 5), C + "address", "got 5"),
    Bad("ike-port-string", with_change(C + "ike_port", "500"), C + "ike_port", 'got "500"'),
    Bad("members-float", with_change(C + "members", 2.5), C + "members", "an integer"),
    Bad("heartbeat-string", with_change(C + "heartbeat_interval", "fast"),
        C + "heartbeat_interval", "seconds"),
    Bad("control-int", with_change(C + "control", 7), C + "control", "a path"),
    Bad("sync-array", with_change(C + "sync", ["ipc:///x"]), C + "sync", "a path"),
    Bad("mobike-string", with_change(B + "mobike", "no"), B + "mobike", "true or false"),
    Bad("local-ts-string", with_change(N + "local_ts", "10.91.2.0/24"), N + "local_ts",
        "array of strings"),
    Bad("psk-int", with_change(B + "psk", 12345), B + "psk", "a string"),
    Bad("cluster-array", with_change("cluster", [1]), "cluster", "a table"),
    # -- out of range ---------------------------------------------------------------
    Bad("members-0", with_change(C + "members", 0), C + "members",
        '0 only with a "tcp://" sync'),
    Bad("members-65", with_change(C + "members", 65), C + "members", "1..64"),
    Bad("members-over-segments", _edit(BASE_TEXT, "segment_bits = 1", "members = 3"),
        C + "members", "1..2"),
    Bad("segment-bits-0", with_change(C + "segment_bits", 0), C + "segment_bits", "1..16"),
    Bad("segment-bits-17", with_change(C + "segment_bits", 17), C + "segment_bits", "1..16"),
    Bad("heartbeat-0", with_change(C + "heartbeat_interval", 0), C + "heartbeat_interval",
        "0.001..60"),
    Bad("heartbeat-nan", _edit(BASE_TEXT, "heartbeat_interval = nan"),
        C + "heartbeat_interval", "got nan"),
    Bad("heartbeat-inf", _edit(BASE_TEXT, "heartbeat_interval = inf"),
        C + "heartbeat_interval", "got inf"),
    Bad("dead-after-0", with_change(C + "dead_after", 0), C + "dead_after", "1..1000"),
    Bad("dead-after-1001", with_change(C + "dead_after", 1001), C + "dead_after", "1..1000"),
    Bad("seq-sync-packets-0", with_change(C + "seq_sync_packets", 0), C + "seq_sync_packets",
        "1..4294967296"),
    Bad("seq-sync-interval-61", with_change(C + "seq_sync_interval", 61),
        C + "seq_sync_interval", "0.001..60"),
    Bad("ike-port-0", with_change(C + "ike_port", 0), C + "ike_port", "1..65535"),
    Bad("natt-port-65536", with_change(C + "natt_port", 65536), C + "natt_port", "1..65535"),
    Bad("remote-port-0", with_change(B + "remote_port", 0), B + "remote_port", "1..65535"),
    Bad("metrics-port-65536", with_change(C + "metrics_port", 65536), C + "metrics_port",
        "0..65535"),
    Bad("cookie-threshold-negative", with_change(C + "cookie_threshold", -1),
        C + "cookie_threshold", "0..1000000"),
    Bad("replay-window-31", with_change(C + "replay_window", 31), C + "replay_window",
        "32..65536"),
    Bad("expect-below-members", _edit(BASE_TEXT, "members = 3", "expect_members = 2"),
        C + "expect_members", "3..64 (at least members"),
    Bad("members-0-tcp-without-expect", _edit(BASE_TEXT, *TCP, "members = 0"),
        C + "expect_members", "required when members = 0", {"k.key_secret": _secret}),
    Bad("sync-port-0", _edit(BASE_TEXT, 'sync = "tcp://127.0.0.1:0"'), C + "sync",
        "1..65535"),
    Bad("rekey-time-huge", with_change(B + "rekey_time", 1 << 40), B + "rekey_time",
        "0..4294967295"),
    Bad("rekey-time-huge-units", with_change(B + "rekey_time", "99999999d"), B + "rekey_time",
        "0..4294967295"),
    Bad("rekey-time-many-digits", with_change(B + "rekey_time", "9" * 5000 + "s"),
        B + "rekey_time", "(cut)"),
    Bad("life-packets-negative", with_change(N + "life_packets", -1), N + "life_packets",
        "an integer"),
    Bad("huge-integer-literal", _edit(BASE_TEXT, "ike_port = " + "9" * 5000), "",
        "a value it cannot hold"),
    Bad("huge-hex-literal", _edit(BASE_TEXT, "ike_port = 0x" + "f" * 5000), C + "ike_port",
        "an integer of 20000 bits"),
    # -- unknown keys ---------------------------------------------------------------
    Bad("unknown-cluster-key", _edit(BASE_TEXT, 'adress = "198.18.0.2"'), C + "adress",
        'did you mean "address"'),
    Bad("unknown-table", BASE_TEXT + "\n[clusters]\nx = 1\n", "clusters", "an unknown key"),
    Bad("unknown-child-key", _edit(BASE_TEXT, 'remote_tss = ["10.0.0.0/8"]',
                                   table=CHILD_HEADER), N + "remote_tss", "remote_ts"),
    # -- bad CIDRs, addresses, proposals --------------------------------------------
    Bad("cidr-host-bits", with_change(N + "local_ts", ["10.91.2.1/24"]), N + "local_ts[0]",
        "did you mean 10.91.2.0/24"),
    Bad("cidr-prefix-33", with_change(N + "remote_ts", ["10.91.1.0/33"]), N + "remote_ts[0]",
        "a CIDR"),
    Bad("remote-addr-name", with_change(B + "remote_addrs", ["peer.example"]),
        B + "remote_addrs[0]", "IPv4 or IPv6 address"),
    Bad("cluster-address-bad", with_change(C + "address", "198.18.0.300"), C + "address",
        "IPv4 or IPv6"),
    Bad("inside-address-bad", with_change(C + "inside_address", "10.0.0.1/40"),
        C + "inside_address", "10.91.2.1/24"),
    Bad("ike-proposal-bad", with_change(B + "proposals", ["aes128-sha256-bogus"]),
        B + "proposals[0]", "an IKE proposal"),
    Bad("esp-proposal-bad", with_change(N + "esp_proposals", ["rot13"]),
        N + "esp_proposals[0]", "an ESP proposal"),
    Bad("identity-too-long", with_change(B + "local_id", "h" * 300), B + "local_id",
        "at most 255 bytes"),
    Bad("identity-dn", with_change(B + "remote_id", "C=CH, QQ=x"), B + "remote_id",
        "is not an attribute like CN=name"),
    # -- bad file paths -------------------------------------------------------------
    Bad("psk-file-missing", _renamed(f'psk = "{PSK}"', 'psk_file = "missing.psk"'),
        B + "psk_file", "No such file or directory"),
    Bad("psk-file-empty-name", _renamed(f'psk = "{PSK}"', 'psk_file = ""'), B + "psk_file",
        "the path of a file"),
    Bad("psk-file-nul", _renamed(f'psk = "{PSK}"', 'psk_file = "a\\u0000b"'),
        B + "psk_file", "NUL"),
    Bad("psk-file-not-utf8", _renamed(f'psk = "{PSK}"', 'psk_file = "k.psk"'),
        B + "psk_file", "byte at offset 0 is not UTF-8", {"k.psk": b"\xff\xff"}),
    Bad("control-too-long", with_change(C + "control", "/tmp/" + "d" * 100), C + "control",
        "a socket path of 1..107 bytes"),
    Bad("control-nul", with_change(C + "control", "/tmp/a\0b"), C + "control", "NUL"),
    Bad("sync-ipc-too-long", with_change(C + "sync", "ipc:///tmp/" + "s" * 120), C + "sync",
        "107 bytes"),
    Bad("sync-ipc-empty", with_change(C + "sync", "ipc://"), C + "sync", "a socket path"),
    Bad("sync-scheme", with_change(C + "sync", "udp://127.0.0.1:1"), C + "sync",
        '"ipc://PATH" or "tcp://HOST:PORT"'),
    # -- duplicates and names -------------------------------------------------------
    Bad("duplicate-table", BASE_TEXT + "\n[connections.branch]\nmobike = false\n", "",
        "twice"),
    Bad("duplicate-key", _edit(BASE_TEXT, "members = 2", "members = 2"), "", "overwrite"),
    Bad("duplicate-remote-addr", with_change(B + "remote_addrs", ["198.18.0.1", "198.18.0.1"]),
        B + "remote_addrs[1]", "each item once"),
    Bad("duplicate-ts", with_change(N + "local_ts", ["10.91.2.0/24", "10.91.2.0/24"]),
        N + "local_ts[1]", "each item once"),
    Bad("duplicate-proposal", with_change(B + "proposals", ["aes128gcm16-prfsha256-ecp256"] * 2),
        B + "proposals[1]", "each item once"),
    Bad("too-many-ts", with_change(N + "remote_ts", [f"10.{i // 256}.{i % 256}.0/24"
                                                     for i in range(300)]),
        N + "remote_ts", "at most 255 items"),
    Bad("connection-name-too-long", _renamed("connections.branch", "connections." + "c" * 300),
        "connections." + "c" * 300, "1..255 bytes"),
    Bad("child-name-newline", _renamed("children.net]", 'children."a\\nb"]'),
        B + 'children."a\\u000Ab"', "without control characters"),
    Bad("connection-name-empty", _renamed("connections.branch", 'connections.""'),
        'connections.""', "a name of 1..255 bytes"),
    # -- the rest of the file -------------------------------------------------------
    Bad("empty-file", "", "cluster", "required"),
    Bad("syntax-error", "[cluster\naddress = 1", "", "valid TOML"),
    Bad("deep-nesting", _edit(BASE_TEXT, "x = " + "[" * 5000 + "]" * 5000), "",
        "nested at most"),
    Bad("no-connections", with_change("connections", {}), "connections", "at least one"),
]


def _load(bad: Bad, tmp_path: Path) -> Config:
    for name, content in bad.files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content(tmp_path / "keys") if callable(content) else content)
    return load_config(bad.text, str(tmp_path / "gw.toml"),
                       lambda p: Path(p).read_bytes())


def test_the_table_is_big_enough() -> None:
    assert len(BAD) >= 40
    assert len({b.name for b in BAD}) == len(BAD)


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_broken_config_is_one_config_error_naming_the_key(bad: Bad, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    with pytest.raises(ConfigError) as err:
        _load(bad, tmp_path)
    exc = err.value
    msg = str(exc)
    assert type(exc) is ConfigError
    # exactly one error: nothing chained that a traceback would show
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    assert exc.path == bad.path, msg
    assert msg.startswith(f"{tmp_path / 'gw.toml'}: {bad.path + ': ' if bad.path else ''}"
                          "expected "), msg
    assert bad.fragment in msg, msg
    assert "\n" not in msg, msg
    assert len(msg) < 600 + len(str(tmp_path)) + len(bad.path), msg
    assert PSK not in msg


def test_a_byte_order_mark_is_ignored() -> None:
    cfg = load_config(b"\xef\xbb\xbf" + BASE_TEXT.encode(), "gw.toml")
    assert "branch" in cfg.connections


def test_members_0_with_tcp_and_expect_members_is_accepted(tmp_path: Path) -> None:
    _keys(tmp_path)
    text = _edit(BASE_TEXT, *TCP, "members = 0", "expect_members = 3")
    cfg = load_config(text, str(tmp_path / "gw.toml"), lambda p: Path(p).read_bytes())
    assert (cfg.cluster.members, cfg.cluster.expect_members) == (0, 3)


def test_a_real_keygen_pair_is_accepted(tmp_path: Path) -> None:
    _keys(tmp_path)
    text = _edit(BASE_TEXT, *TCP, 'curve_server_key = "k.key"')
    cfg = load_config(text, str(tmp_path / "gw.toml"), lambda p: Path(p).read_bytes())
    assert cfg.cluster.curve_server_key == "k.key"


def test_key_files_are_relative_to_a_config_in_a_subfolder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    _keys(sub)
    (sub / "b.psk").write_text("0x0102\n")
    (sub / "gw.toml").write_text(_edit(_renamed(f'psk = "{PSK}"', 'psk_file = "b.psk"'), *TCP))
    monkeypatch.chdir(tmp_path)
    cfg = read_config("sub/gw.toml")
    assert cfg.connections["branch"].psk == b"\x01\x02"


# -- as a command: exit 2, one line ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cluster_toml(tmp: Path, extra: Mapping[str, Any] | None = None, *,
                  control: bool = True) -> Path:
    """A cluster that would start (udp inside, 2 members) but for the
    ``extra`` ``[cluster]`` keys; its control folder in ``tmp`` unless
    ``control`` is False."""
    data = copy.deepcopy(BASE)
    data["cluster"].update(address="127.0.0.1", inside=f"udp:127.0.0.1:{_free_port()}",
                           ike_port=_free_port(), natt_port=_free_port(), members=2)
    if control:
        data["cluster"]["control"] = f"{tmp}/run"
    data["cluster"].update(extra or {})
    data["connections"]["branch"]["remote_addrs"] = ["127.0.0.1"]
    path = tmp / "gw.toml"
    path.write_text(dumps(data))
    return path


def _cli(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cli_argv(*args), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=env, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _assert_one_line(code: int, out: str, err: str, *fragments: str) -> None:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipsec-cluster: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def _run(config: Path, *fragments: str) -> None:
    _assert_one_line(*_cli("run", "--config", str(config)), *fragments)


def test_run_not_utf8(tmp_path: Path) -> None:
    config = _cluster_toml(tmp_path)
    config.write_bytes(config.read_bytes().replace(b"gw.test", b"gw.t\xe9st"))
    _run(config, str(config), "byte 0xe9 at offset")


def test_run_connection_without_children(tmp_path: Path) -> None:
    config = _cluster_toml(tmp_path)
    text = config.read_text()
    config.write_text(text[:text.index(CHILD_HEADER)])
    _run(config, "connections.branch.children", "add a [connections.branch.children.NAME]")


def test_run_curve_key_file_missing(tmp_path: Path) -> None:
    config = _cluster_toml(tmp_path, {"sync": f"tcp://127.0.0.1:{_free_port()}",
                                      "curve_secret_key": "keys/dispatcher.key_secret"})
    _run(config, "cluster.curve_secret_key", "keys/dispatcher.key_secret",
         "No such file or directory")


def test_run_curve_authorized_missing(tmp_path: Path) -> None:
    _keys(tmp_path)
    config = _cluster_toml(tmp_path, {"sync": f"tcp://127.0.0.1:{_free_port()}",
                                      "curve_secret_key": "k.key_secret",
                                      "curve_authorized": "nope"})
    _run(config, "cluster.curve_authorized", "a folder of member public keys")


def test_run_ipc_path_in_a_missing_folder(tmp_path: Path) -> None:
    config = _cluster_toml(tmp_path, {"sync": f"ipc://{tmp_path}/missing/members.ipc"})
    _run(config, "cluster.sync", f"the folder {tmp_path}/missing does not exist")


def test_run_control_folder_not_creatable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = _cluster_toml(tmp_path, {"control": f"{tmp_path}/file/run"}, control=False)
    _run(config, "cluster.control", f"cannot create the folder {tmp_path}/file/run")


def test_run_control_folder_not_writable(tmp_path: Path) -> None:
    # /sys refuses new files even to root (the mode bits would not stop root).
    try:
        os.close(os.open("/sys/.ipsec-cluster-probe", os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys
        os.unlink("/sys/.ipsec-cluster-probe")
        pytest.skip("/sys is writable here")
    config = _cluster_toml(tmp_path, {"control": "/sys"}, control=False)
    _run(config, "cluster.control", "cannot write in the folder /sys")


def test_run_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _cluster_toml(tmp_path, {"metrics_port": port}, control=False)
        _run(config, f"cluster.metrics_port: port {port} on 127.0.0.1 is in use",
             f"by pid {os.getpid()}")
    # the run folder made for it is gone again
    assert not run_dir(load_config(config.read_bytes(), str(config)), str(config)).exists()


def test_run_sync_port_in_use(tmp_path: Path) -> None:
    _keys(tmp_path)
    (tmp_path / "authorized").mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _cluster_toml(tmp_path, {"sync": f"tcp://127.0.0.1:{port}",
                                          "curve_secret_key": "k.key_secret",
                                          "curve_authorized": "authorized"})
        _run(config, "cluster.sync", f"cannot bind tcp://127.0.0.1:{port}",
             "Address already in use")


def test_run_config_missing_or_a_folder(tmp_path: Path) -> None:
    _run(tmp_path / "none.toml", "cannot read config", "No such file or directory")
    _run(tmp_path, "cannot read config", "Is a directory")


def test_member_bad_id_and_bad_endpoint(tmp_path: Path) -> None:
    config = _cluster_toml(tmp_path)
    _assert_one_line(*_cli("member", "--config", str(config), "--id", "99", "--connect",
                           f"ipc://{tmp_path}/m.ipc"), "--id", "1..64")
    _assert_one_line(*_cli("member", "--config", str(config), "--id", "1", "--connect",
                           "nowhere"), "--connect nowhere", "not an endpoint")


def test_keygen_into_an_unusable_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    _assert_one_line(*_cli("keygen", "--dir", f"{tmp_path}/file/keys", "--name", "k"),
                     "cannot write keys into", "Not a directory")


def test_status_without_a_cluster(tmp_path: Path) -> None:
    config = _cluster_toml(tmp_path)
    _assert_one_line(*_cli("status", "--config", str(config), "--timeout", "0.2"),
                     "no cluster answers")


# -- Hypothesis: nothing but ConfigError -------------------------------------------------


KEYS = [
    *(C + k for k in ("address", "ike_port", "natt_port", "inside", "inside_bind",
                      "inside_address", "members", "expect_members", "mode", "sync",
                      "curve_secret_key", "curve_server_key", "curve_authorized", "control",
                      "metrics_port", "cookie_threshold", "replay_window", "segment_bits",
                      "heartbeat_interval", "dead_after", "seq_sync_packets",
                      "seq_sync_interval", "replay_after_failover", "log_level", "x")),
    *(B + k for k in ("remote_addrs", "local_addrs", "remote_port", "proposals", "local_id",
                      "remote_id", "psk", "psk_file", "dpd_delay", "rekey_time",
                      "reauth_time", "mobike", "children")),
    *(N + k for k in ("local_ts", "remote_ts", "esp_proposals", "rekey_time", "life_packets",
                      "rekey_packets", "start_action", "dpd_action")),
    "cluster", "connections", "connections.branch", N[:-1], "connections.other",
]
SCALARS = st.one_of(
    st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["10.0.0.0/8", "::/0", "127.0.0.1", "tcp://127.0.0.1:1", "ipc:///tmp/x",
                     "udp:127.0.0.1:9", "tun:x", "%any", "4h", "0x00", "0s", "k.key_secret",
                     "aes128gcm16", "", "start"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def _read_file(content: bytes | None) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        if content is None:
            raise FileNotFoundError(2, "No such file or directory", path)
        return content
    return read


def _only_config_error(text: str | bytes, read: Callable[[str], bytes]) -> None:
    try:
        load_config(text, "gw.toml", read)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@pytest.mark.fuzz
@fuzz_settings(200)
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), VALUES | st.just(DELETE)),
                        min_size=1, max_size=4),
       file_content=st.none() | st.binary(max_size=64))
def test_random_toml_documents_raise_only_config_error(
        changes: list[tuple[str, Any]], file_content: bytes | None) -> None:
    data = copy.deepcopy(BASE)
    for key, value in changes:
        *parents, last = key.split(".")
        node = data
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    _only_config_error(dumps(data), _read_file(file_content))


@pytest.mark.fuzz
@fuzz_settings(200)
@given(data=st.binary(max_size=512) | st.text(max_size=256).map(str.encode))
def test_random_bytes_raise_only_config_error(data: bytes) -> None:
    _only_config_error(data, _read_file(None))


@pytest.mark.fuzz
@fuzz_settings(200)
@given(cut=st.integers(0, len(BASE_TEXT)), junk=st.binary(max_size=16))
def test_damaged_files_raise_only_config_error(cut: int, junk: bytes) -> None:
    raw = BASE_TEXT.encode()
    _only_config_error(raw[:cut] + junk + raw[cut:], _read_file(b"0x00"))
