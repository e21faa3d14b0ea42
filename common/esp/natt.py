"""RFC 3948 classification of UDP port 4500 datagrams.

Rules of this file:
- One byte 0xFF is a NAT-keepalive (RFC 3948 §2.3).
- Four zero bytes (the non-ESP marker) start an IKE message (RFC 3948 §2.2).
- Anything else starts with an ESP SPI (RFC 3948 §2.1), never 1..255
  (reserved, RFC 4303 §2.1).
- Bad bytes raise ``MalformedMessage`` and nothing else.
"""

from __future__ import annotations

import enum
import struct

from common.errors import MalformedMessage

NON_ESP_MARKER = b"\x00\x00\x00\x00"
KEEPALIVE_BYTE = 0xFF
IKE_HEADER_SIZE = 28  # RFC 7296 §3.1
ESP_HEADER_SIZE = 8   # SPI + sequence number, RFC 4303 §2
_ESP_HEADER = struct.Struct("!II")
_SPI = struct.Struct("!I")

Bytes = bytes | bytearray | memoryview


class Kind(enum.Enum):
    KEEPALIVE = "keepalive"
    IKE = "ike"
    ESP = "esp"


def classify_4500(datagram: Bytes) -> tuple[Kind, int]:
    """What a port-4500 datagram carries: ``(kind, spi)``; spi is 0 unless ESP."""
    n = len(datagram)
    if n == 1:
        if datagram[0] == KEEPALIVE_BYTE:
            return Kind.KEEPALIVE, 0
        raise MalformedMessage(f"one-byte datagram is not a NAT-keepalive: {datagram[0]:#04x}")
    if n < 4:
        raise MalformedMessage(f"port-4500 datagram too short: {n} bytes")
    (spi,) = _SPI.unpack_from(datagram)
    if spi == 0:
        if n < 4 + IKE_HEADER_SIZE:
            raise MalformedMessage(f"IKE message after non-ESP marker too short: {n - 4} bytes")
        return Kind.IKE, 0
    if spi < 256:
        raise MalformedMessage(f"ESP SPI {spi} is reserved (RFC 4303 §2.1)")
    if n < ESP_HEADER_SIZE:
        raise MalformedMessage(f"ESP packet too short: {n} bytes")
    return Kind.ESP, int(spi)


def parse_esp_header(data: Bytes) -> tuple[int, int]:
    """``(spi, seq_low32)`` of an ESP packet (no outer IP/UDP header)."""
    if len(data) < ESP_HEADER_SIZE:
        raise MalformedMessage(f"ESP packet too short: {len(data)} bytes")
    spi, seq = _ESP_HEADER.unpack_from(data)
    return int(spi), int(seq)


def strip_non_esp_marker(datagram: Bytes) -> memoryview:
    """The IKE message after the four zero bytes (no copy)."""
    view = memoryview(datagram)
    if len(view) < 4 or view[:4] != NON_ESP_MARKER:
        raise MalformedMessage("datagram does not start with the non-ESP marker")
    return view[4:]
