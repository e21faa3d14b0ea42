"""RFC 3948 port-4500 classification."""

from __future__ import annotations

import pytest

from common.errors import MalformedMessage
from common.esp.natt import Kind, classify_4500, parse_esp_header, strip_non_esp_marker

# RFC 7296 §3.1 header: SPIi, SPIr, next payload, version, exchange, flags, MID, length.
IKE_MESSAGE = bytes(16) + bytes([0x21, 0x20, 0x22, 0x08]) + bytes(4) + bytes([0, 0, 0, 28])


def test_keepalive_is_one_ff_byte() -> None:
    # RFC 3948 §2.3: NAT-keepalive is a single octet 0xFF.
    assert classify_4500(b"\xff") == (Kind.KEEPALIVE, 0)


def test_non_esp_marker_is_ike() -> None:
    # RFC 3948 §2.2: four zero octets, then the IKE header.
    assert classify_4500(b"\x00\x00\x00\x00" + IKE_MESSAGE) == (Kind.IKE, 0)
    assert bytes(strip_non_esp_marker(b"\x00" * 4 + IKE_MESSAGE)) == IKE_MESSAGE


def test_esp_carries_its_spi() -> None:
    packet = bytes.fromhex("12345678 00000001") + bytes(40)
    assert classify_4500(packet) == (Kind.ESP, 0x12345678)
    assert parse_esp_header(packet) == (0x12345678, 1)


@pytest.mark.parametrize("datagram", [
    b"", b"\x00", b"\xfe", b"\xff\xff", b"\x00\x00\x00",      # too short / not keepalive
    b"\x00\x00\x00\x00" + bytes(27),                         # IKE header truncated
    bytes.fromhex("000000ff 00000001"),                      # reserved SPI 255
    bytes.fromhex("00000100 000000"),                        # ESP shorter than SPI+seq
])
def test_invalid_datagrams_are_malformed(datagram: bytes) -> None:
    with pytest.raises(MalformedMessage):
        classify_4500(datagram)


def test_every_truncation_raises_only_malformed() -> None:
    for whole in (b"\x00" * 4 + IKE_MESSAGE, bytes.fromhex("12345678 00000001")):
        for cut in range(len(whole)):
            try:
                classify_4500(whole[:cut])
            except MalformedMessage:
                pass
    for cut in range(8):
        with pytest.raises(MalformedMessage):
            parse_esp_header(bytes(range(1, 9))[:cut])


def test_strip_marker_refuses_esp() -> None:
    with pytest.raises(MalformedMessage):
        strip_non_esp_marker(bytes.fromhex("12345678 00000001"))
