"""The IkeSaState layout of SYNC_VERSION 2 (common/cluster/sync.py): round trips,
and every truncation or corruption is a MalformedMessage."""

from __future__ import annotations

import pytest

from common.cluster.sync import (
    SYNC_VERSION,
    ChildRecord,
    IkeSaGone,
    IkeSaState,
    decode_sync,
    encode_sync,
)
from common.errors import MalformedMessage
from common.ike.ts import ts_any, ts_from_cidr


def _state(**kw: object) -> IkeSaState:
    lts = (ts_from_cidr("10.1.0.0/16"),)
    rts = (ts_from_cidr("10.2.0.0/16"), ts_any(6))
    children = (
        ChildRecord("net-a", 0xC0000001, 0xD0000001, "aes128gcm16", False, 0, 2, 3600.5, lts,
                    rts),
        ChildRecord("nét-b", 0xC0000002, 0xD0000002, "aes256-sha256", True, 19, 3, -1.0, rts,
                    lts),
    )
    base = dict(
        spi_i=bytes(range(8)), spi_r=bytes(range(8, 16)), initiator=False, state=2,
        policy="site-b", remote_ip=bytes([192, 0, 2, 7]), remote_port=4500, local_port=500,
        encr=20, key_bits=256, prf=5, integ=0, dh=31, sk_d=b"d" * 32, sk_ai=b"", sk_ar=b"",
        sk_ei=b"e" * 36, sk_er=b"E" * 36, sk_pi=b"p" * 32, sk_pr=b"P" * 32, peer_id_type=2,
        peer_id=b"peer.example", peer_mid_sync=True, send_next=7, recv_next=9,
        response_id=8, response=b"R" * 300, request_digest=b"x" * 32, rekey_in=12.25,
        children=children, stale=True)
    base.update(kw)
    return IkeSaState(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [
    {},
    {"initiator": True, "peer_mid_sync": False, "stale": False},
    {"remote_ip": bytes(range(16)), "response_id": -1, "response": b"", "rekey_in": -1.0},
    {"children": ()},
    {"policy": "", "peer_id": b"", "peer_id_type": 0, "request_digest": b""},
    {"send_next": 0xFFFFFFFF, "recv_next": 0, "response_id": 0xFFFFFFFE},
])
def test_ike_sa_state_round_trips(kw: dict[str, object]) -> None:
    st = _state(**kw)
    raw = encode_sync(st)
    assert raw[0] == SYNC_VERSION == 3
    assert decode_sync(raw) == st
    assert decode_sync(bytearray(raw)) == st
    assert decode_sync(memoryview(raw)) == st


def test_every_truncation_and_extension_is_malformed() -> None:
    raw = encode_sync(_state())
    for n in range(len(raw)):
        with pytest.raises(MalformedMessage):
            decode_sync(raw[:n])
    with pytest.raises(MalformedMessage):
        decode_sync(raw + b"\0")


def test_corrupt_bytes_raise_only_malformed() -> None:
    raw = encode_sync(_state())
    for i in range(2, len(raw)):
        for v in (0x00, 0x7F, 0xFF):
            bad = bytearray(raw)
            bad[i] = v
            try:
                decode_sync(bytes(bad))
            except MalformedMessage:
                pass


def test_over_limit_lengths_are_malformed() -> None:
    raw = bytearray(encode_sync(_state()))
    # the response length (u32) sits after the fixed fields and nine u16 lengths
    off = 2 + 16 + 2 + 7 * 2 + 1 + 12 + 8 + 9 * 2
    raw[off:off + 4] = (1 << 20).to_bytes(4, "big")
    with pytest.raises(MalformedMessage, match="limit"):
        decode_sync(bytes(raw))
    raw = bytearray(encode_sync(_state()))
    raw[2 + 16] = 0x80   # unknown flag
    with pytest.raises(MalformedMessage, match="flags"):
        decode_sync(bytes(raw))


def test_unencodable_states_raise_value_error() -> None:
    with pytest.raises(ValueError):
        encode_sync(_state(spi_i=b"short"))
    with pytest.raises(ValueError):
        encode_sync(_state(remote_ip=b"\1\2\3"))
    with pytest.raises(ValueError):
        encode_sync(_state(remote_port=70000))
    with pytest.raises(ValueError):
        encode_sync(_state(sk_d=b"k" * 513))


def test_keys_stay_out_of_the_repr() -> None:
    text = repr(decode_sync(encode_sync(_state(sk_d=b"SECRETKEY" * 3))))
    assert "SECRETKEY" not in text and "RRRR" not in text


def test_other_kinds_still_round_trip() -> None:
    m = IkeSaGone(bytes(8), bytes(range(8)))
    assert decode_sync(encode_sync(m)) == m
