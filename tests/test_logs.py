"""Logs (member/logs.py) and key export (member/keylog.py), in process.

Our peer's member and a gateway member are wired back to back in memory (as
tests/test_peer.py does for INITIAL_CONTACT); every log record of the
process goes through the JSON formatter into a buffer that the tests parse.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from common.config import load_config
from common.ike.events import ChildSaInstalled
from member import logs as logs_mod
from member.keylog import ESP_TABLE, IKE_TABLE, append_line, esp_lines
from member.worker import Member
from tests.test_peer import CONN, GW_ADDR, PEER_ADDR, gateway_config, peer_config

PORTS = (500, 4500)


@pytest.fixture
def records() -> Iterator[io.StringIO]:
    """Every record of the process, as JSON lines, at DEBUG."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(logs_mod._RoleFilter("gateway"))
    handler.setFormatter(logs_mod.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def pair(gw_text: str | None = None, peer_text: str | None = None,
         member_id: int = 1) -> tuple[Member, Member]:
    gw = Member(load_config(gw_text or gateway_config(PORTS, 9), "gw.toml"), member_id=member_id)
    peer = Member(load_config(peer_text or peer_config(PORTS), "peer.toml"), member_id=1)
    return gw, peer


def carry(gw: Member, peer: Member, now: float = 0.0) -> None:
    """Move datagrams both ways until quiet."""
    for _ in range(20):
        moved = False
        for out in peer.ike_out():
            moved = True
            gw.handle_ike(out.data, (PEER_ADDR, out.local_port), out.remote[1], now)
        for out in gw.ike_out():
            moved = True
            peer.handle_ike(out.data, (GW_ADDR, out.local_port), out.remote[1], now)
        if not moved:
            return


def sa_events(recs: list[dict[str, Any]], role_member: int | None = None) -> list[dict[str, Any]]:
    return [r for r in recs if "event" in r
            and (role_member is None or r["member"] == role_member)]


def test_json_lines_one_per_sa_event_with_fields(records: io.StringIO) -> None:
    gw, peer = pair(member_id=7)   # the gateway side is member 7, the peer member 1
    ids = peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    recs = lines(records)
    for r in recs:
        assert {"time", "level", "role", "logger", "message"} <= r.keys()
        assert r["time"].endswith("Z") and r["role"] == "gateway"
    ours = sa_events(recs, 7)
    assert sorted(r["event"] for r in ours) == ["child_sa_installed", "child_sa_installed",
                                                "ike_sa_established"]
    sa = next(iter(gw.engine.by_id.values()))
    for r in ours:
        assert r["connection"] == "c" and r["peer"] == PEER_ADDR and r["member"] == 7
        assert (r["ike_spi_i"], r["ike_spi_r"]) == (sa.spi_i.hex(), sa.spi_r.hex())
        assert r["level"] == "info"
    assert {r["child"] for r in ours if r["event"] == "child_sa_installed"} == {"gcm", "ctr"}
    # No duplicate: no other line (core or shell) tells the same establishment.
    told = [r for r in recs if "established" in r["message"] and "7)" in r["message"]]
    assert len(told) == 1
    installed = [r for r in recs if " installed" in r["message"]]
    assert len(installed) == 4 and {r["logger"] for r in installed} == {"ipsec_cluster.sa"}

    # Deleting: one line for the IKE SA, one per child, on each side.
    peer.engine.delete_ike(ids[0], 1.0)
    carry(gw, peer, 1.0)
    gone = [r["event"] for r in sa_events(lines(records), 7)][3:]
    assert sorted(gone) == ["child_sa_deleted", "child_sa_deleted", "ike_sa_deleted"]
    deleted = [r for r in sa_events(lines(records), 7) if r["event"] == "ike_sa_deleted"]
    # The engine dropped the SA before the shell saw the event: SPIs are still named.
    assert deleted[0]["ike_spi_i"] == sa.spi_i.hex() and deleted[0]["reason"]


def test_failed_ike_sa_is_one_warning(records: io.StringIO) -> None:
    gw, peer = pair(peer_text=peer_config(PORTS, psk="a-wrong-psk-0123456789abcdef"))
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    recs = lines(records)
    failed = [r for r in recs if "failed" in r["message"] and r["level"] == "warning"]
    # The gateway's and the peer's own, each once (the core logs none of its own).
    assert sorted(r["event"] for r in failed) == ["ike_sa_failed", "ike_sa_failed"]


def test_debug_shows_exchanges_with_payload_types(records: io.StringIO) -> None:
    gw, peer = pair()
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    text = "\n".join(r["message"] for r in lines(records) if r["level"] == "debug")
    assert "received IKE_SA_INIT request 0 [ SA KE No N(NATD_S_IP) N(NATD_D_IP)" in text
    assert "sending IKE_SA_INIT response 0 [ SA KE No" in text
    assert ("received IKE_AUTH request 1 [ IDi N(INIT_CONTACT) IDr AUTH SA TSi TSr "
            "N(MSG_ID_SYN_SUP) ]") in text
    assert "sending IKE_AUTH response 1 [ IDr AUTH SA TSi TSr" in text


def test_at_info_the_payload_list_is_never_built(monkeypatch: pytest.MonkeyPatch,
                                                 records: io.StringIO) -> None:
    import common.ike.engine
    import common.ike.sa

    def boom(msg: object) -> str:
        raise AssertionError("describe() called at INFO")

    monkeypatch.setattr(common.ike.sa, "describe", boom)
    monkeypatch.setattr(common.ike.engine, "describe", boom)
    logging.getLogger().setLevel(logging.INFO)
    gw, peer = pair()
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    assert gw.counters["ike_established"] == 1


def _with_proposals(ike: str | None = None, esp: str | None = None) -> str:
    """The gateway's config with other IKE or ESP proposals than the peer's."""
    conn = CONN
    if ike is not None:
        conn = replace(conn, proposals=ike)
    if esp is not None:
        conn = replace(conn, children=tuple(replace(c, esp=esp) for c in conn.children))
    return gateway_config(PORTS, 9, conn=conn)


def test_ike_proposal_mismatch_names_both_sides(records: io.StringIO) -> None:
    gw_text = _with_proposals(ike="aes256-sha512-modp4096")
    gw, peer = pair(gw_text=gw_text)
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    msgs = [r["message"] for r in lines(records) if "NO_PROPOSAL_CHOSEN" in r["message"]
            and r["logger"] == "ipsec_cluster.ike"]
    assert msgs == [f"IKE_SA_INIT from {PEER_ADDR}: no common proposal (NO_PROPOSAL_CHOSEN): "
                    "received proposals: aes128gcm16-prfsha256-ecp256; "
                    "configured proposals: aes256-sha512-prfsha512-modp4096"]


def test_esp_proposal_mismatch_names_both_sides(records: io.StringIO) -> None:
    gw_text = _with_proposals(esp="aes256-sha384")
    gw, peer = pair(gw_text=gw_text)
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    msgs = [r["message"] for r in lines(records) if "child SA refused: no common proposal" in
            r["message"]]
    assert msgs and "received proposals: aes128gcm16-noesn; configured proposals: " \
        "aes256-sha384-noesn" in msgs[0]


# -- the formats and roles -------------------------------------------------------------


def test_text_and_json_lines_name_the_role() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for fmt in ("text", "json"):
            buf = io.StringIO()
            logs_mod.setup_logging("info", fmt, "member 3", buf)
            logging.getLogger("ipsec_cluster.x").info("hello %d", 5)
            logging.getLogger("ipsec_cluster.x").debug("not shown")
            out = buf.getvalue().splitlines()
            assert len(out) == 1
            if fmt == "json":
                obj = json.loads(out[0])
                assert (obj["role"], obj["level"], obj["logger"], obj["message"]) == (
                    "member 3", "info", "ipsec_cluster.x", "hello 5")
            else:
                assert "[member 3] ipsec_cluster.x INFO hello 5" in out[0]
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_config_keys() -> None:
    cfg = load_config(gateway_config(PORTS, 9), "gw.toml")
    assert (cfg.cluster.log_format, cfg.cluster.save_keys) == ("text", "")
    text = gateway_config(PORTS, 9, extra={"log_format": "json", "save_keys": "/tmp/k"})
    cfg = load_config(text, "gw.toml")
    assert (cfg.cluster.log_format, cfg.cluster.save_keys) == ("json", "/tmp/k")
    from common.config import ConfigError
    with pytest.raises(ConfigError, match="log_format"):
        load_config(gateway_config(PORTS, 9, extra={"log_format": "xml", "save_keys": "/tmp/k"}),
                    "gw.toml")


# -- key export ------------------------------------------------------------------------


def test_save_keys_writes_both_tables_0600(tmp_path: Path, records: io.StringIO) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    gw_text = gateway_config(PORTS, 9, extra={"save_keys": str(keys)})
    gw, peer = pair(gw_text=gw_text)
    assert any("save_keys" in r["message"] and r["level"] == "warning"
               for r in lines(records))
    peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    sa = next(iter(gw.engine.by_id.values()))
    assert sa.keys is not None
    ike = (keys / IKE_TABLE).read_text().splitlines()
    assert ike == [f"{sa.spi_i.hex()},{sa.spi_r.hex()},{sa.keys.sk_ei.hex()},"
                   f"{sa.keys.sk_er.hex()},\"AES-GCM-128 with 16 octet ICV [RFC5282]\",,,"
                   "\"NONE [RFC4306]\""]
    esp = (keys / ESP_TABLE).read_text().splitlines()
    assert len(esp) == 4   # two children, two directions
    gcm_in = next(r for r in gw.by_spi.values() if r.name == "gcm")
    spi_in = gcm_in.inbound.spi
    line = next(x for x in esp if f'"0x{spi_in:08x}"' in x)
    assert line == (f'"IPv4","{PEER_ADDR}","{GW_ADDR}","0x{spi_in:08x}",'
                    '"AES-GCM with 16 octet ICV [RFC4106]",'
                    f'"0x{gcm_in.keymat_in.hex()}","NULL",'
                    '"0x"')
    ctr = next(x for x in esp if "AES-CTR" in x and x.startswith(f'"IPv4","{GW_ADDR}"'))
    assert '"HMAC-SHA-256-128 [RFC4868]"' in ctr
    for name in (IKE_TABLE, ESP_TABLE):
        assert stat.S_IMODE(os.stat(keys / name).st_mode) == 0o600


def test_save_keys_folder_must_exist(tmp_path: Path) -> None:
    from common.errors import StartupError
    from member.keylog import keylog_for

    with pytest.raises(StartupError, match="save_keys"):
        keylog_for(str(tmp_path / "missing"), "0.0.0.0")
    assert keylog_for(str(tmp_path), "0.0.0.0").local == "*"


def test_esp_lines_cbc_split_key_and_integrity() -> None:
    from common.ike.ts import ts_from_cidr

    ts = (ts_from_cidr("10.0.0.0/24"),)
    e = ChildSaInstalled(1, "x", 0x1000, 0x2000, "aes128cbc-sha256", False,
                         bytes(range(48)), bytes(range(100, 148)), ts, ts, ("192.0.2.9", 4500))
    inbound, outbound = esp_lines(e, "*")
    assert inbound == ('"IPv4","192.0.2.9","*","0x00001000","AES-CBC [RFC3602]",'
                       f'"0x{bytes(range(16)).hex()}","HMAC-SHA-256-128 [RFC4868]",'
                       f'"0x{bytes(range(16, 48)).hex()}"\n')
    assert outbound.startswith('"IPv4","*","192.0.2.9","0x00002000"')
    chacha = ChildSaInstalled(1, "x", 0x1000, 0x2000, "chacha20poly1305", False, bytes(36),
                              bytes(36), ts, ts, ("192.0.2.9", 4500))
    assert esp_lines(chacha, "*") == []   # not in Wireshark's table: no line


def _writer(path: str, who: int, n: int) -> None:
    for i in range(n):
        append_line(path, f"{who:02d}:{i:05d}:" + "x" * 200 + "\n")


def test_appends_from_several_processes_stay_whole_lines(tmp_path: Path) -> None:
    path = str(tmp_path / ESP_TABLE)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, who, 300)) for who in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = Path(path).read_text().splitlines()
    assert len(got) == 1200
    assert all(len(line) == 209 and line.endswith("x" * 200) for line in got)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -- a cluster: every process's lines, one shared pair of key files --------------------


@pytest.mark.slow
def test_cluster_json_lines_roles_and_shared_key_files(tmp_path: Path) -> None:
    from tests.cluster_util import (
        Procs,
        alive_members,
        cli_argv,
        gateway_toml,
        grid_connections,
        status,
        tail,
        wait_for,
    )
    from tests.test_peer import _free_port_pair

    gw_ports, inside, peer_ports, peer_inside = (_free_port_pair() for _ in range(4))
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    conns = grid_connections(12, 1)
    config = tmp_path / "cluster.toml"
    config.write_text(gateway_toml(
        address=GW_ADDR, ports=gw_ports, inside=f"udp:{GW_ADDR}:{inside[0]}",
        inside_bind=f"{GW_ADDR}:{inside[1]}", members=2, conns=conns,
        extra={"log_format": "json", "save_keys": str(keys)}))
    peer_cfg = tmp_path / "peer.toml"
    peer_cfg.write_text(gateway_toml(
        address=PEER_ADDR, ports=peer_ports, inside=f"udp:{GW_ADDR}:{peer_inside[0]}",
        inside_bind=f"{GW_ADDR}:{peer_inside[1]}", conns=conns, remote=(GW_ADDR, gw_ports[0])))
    procs = Procs(tmp_path)
    try:
        disp = procs.start("cluster", cli_argv("run", "--config", str(config)))
        wait_for("2 members alive", lambda: len(alive_members(status(config))) == 2,
                 timeout=20, diag=lambda: tail(disp.log_path))
        procs.start("peer", cli_argv("peer", "--config", str(peer_cfg)))
        wait_for("12 IKE SAs up", lambda: sum(m["ike_sas"] for m in status(config)["members"])
                 == 12, timeout=30, diag=lambda: tail(disp.log_path))
        time.sleep(0.3)
    finally:
        procs.close()
    recs = [json.loads(line) for line in disp.log_path.read_text().splitlines()
            if line.strip()]   # every line is one JSON object
    assert {"dispatcher", "member 1", "member 2"} <= {r["role"] for r in recs}
    est = [r for r in recs if r.get("event") == "ike_sa_established"]
    assert len(est) == 12 and len({(r["ike_spi_i"], r["ike_spi_r"]) for r in est}) == 12
    for r in est:
        assert r["role"] == f"member {r['member']}" and r["peer"] == PEER_ADDR
    # the SAs spread over both members (all 12 on one: odds 1 in 2048)
    assert {r["member"] for r in est} == {1, 2}
    warnings = [r for r in recs if r["level"] == "warning" and "save_keys" in r["message"]]
    assert {r["role"] for r in warnings} == {"member 1", "member 2"}
    # Both members appended to the same files: one line per IKE SA, two per child.
    ike = (keys / IKE_TABLE).read_text().splitlines()
    assert sorted(line[:33] for line in ike) == sorted(
        f"{r['ike_spi_i']},{r['ike_spi_r']}" for r in est)
    assert len((keys / ESP_TABLE).read_text().splitlines()) == 24


def test_rekeys_are_one_line_each(records: io.StringIO) -> None:
    gw, peer = pair(member_id=4)
    ids = peer.start_connections(0.0, only_start_action=False)
    carry(gw, peer)
    old_sa = next(iter(gw.engine.by_id.values()))
    child = next(r for r in peer.by_spi.values() if r.name == "gcm")
    peer.engine.rekey_child(ids[0], child.inbound.spi, 1.0)
    carry(gw, peer, 1.0)
    peer.engine.rekey_ike(ids[0], 2.0)
    carry(gw, peer, 2.0)
    ours = sa_events(lines(records), 4)[3:]
    assert sorted(r["event"] for r in ours) == [
        "child_sa_deleted", "child_sa_rekeyed", "ike_sa_deleted", "ike_sa_rekeyed"]
    rekeyed = next(r for r in ours if r["event"] == "ike_sa_rekeyed")
    new_sa = gw.engine.by_id[rekeyed["ike_id"]]
    assert (rekeyed["ike_spi_i"], rekeyed["ike_spi_r"]) == (new_sa.spi_i.hex(),
                                                             new_sa.spi_r.hex())
    assert rekeyed["old_ike_id"] == old_sa.ike_id and rekeyed["connection"] == "c"
    assert "rekeyed into c[" in rekeyed["message"]
    gone = next(r for r in ours if r["event"] == "ike_sa_deleted")
    assert (gone["ike_spi_i"], gone["ike_id"]) == (old_sa.spi_i.hex(), old_sa.ike_id)
    child_rekey = next(r for r in ours if r["event"] == "child_sa_rekeyed")
    assert child_rekey["child"] == "gcm" and child_rekey["replaces"]
