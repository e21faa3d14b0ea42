"""IKEv2 messages (RFC 7296 §3.1) with the Encrypted payload (§3.14).

Rules of this file:
- ``decode_header`` alone is what the dispatcher needs to route a datagram.
- ``decode_message(data)`` without keys decodes a message in the clear and
  raises ``EncryptedWithoutKeys`` (a ``MalformedMessage``: where no keys
  exist, e.g. in a first IKE_SA_INIT, an SK payload is the peer's error) when
  it meets an SK payload. ``decode_message(data, sk)`` insists on protection: a
  message without an SK payload raises ``IntegrityError``, so nothing
  unauthenticated slips through a caller that expected keys to be used.
- Bad bytes raise ``MalformedMessage``; failed authentication
  ``IntegrityError``; a wrong major version ``InvalidMajorVersion``; an unknown
  critical payload ``UnsupportedCriticalPayload``.
- The AUTH payload (RFC 7296 §2.15) signs the raw octets of the IKE_SA_INIT
  message as sent or received: the output of ``encode_message`` and the input
  of ``decode_message`` are those octets; nothing is re-encoded for signing.
- RFC 7383 fragments (a header whose first payload is SKF) are opened and
  reassembled by common/ike/fragments.py; ``message_from_plaintext`` builds the
  message from the reassembled payload bytes. An SKF payload reaching
  ``decode_message`` (after other payloads, or unexpected) is malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TypeVar

from common.buffer import Reader
from common.errors import (
    IntegrityError,
    MalformedMessage,
    RemoteProtocolError,
)
from common.ike.constants import (
    GENERIC_PAYLOAD_HEADER_LEN,
    IKE_HEADER_LEN,
    IKE_VERSION,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from common.ike.payloads import (
    GENERIC_HEADER,
    MAX_PAYLOAD_LEN,
    NotifyPayload,
    Payload,
    decode_payloads,
    decode_raw_payload,
    encode_payloads,
    iter_raw_payloads,
)
from common.ike.sk import SkCipher

# RFC 7296 §3.1: SPIi (8), SPIr (8), Next Payload, Version, Exchange Type,
# Flags (1 each), Message ID (4), Length (4).
HEADER = struct.Struct("!8s8sBBBBII")
SPI_LEN = 8
MAX_MESSAGE_ID = 0xFFFFFFFF
_IKE_MAJOR_VERSION = IKE_VERSION >> 4

_P = TypeVar("_P")


class InvalidMajorVersion(RemoteProtocolError):
    """The header's major version is not 2 (RFC 7296 §2.5, §3.1)."""

    notify_type = NotifyType.INVALID_MAJOR_VERSION
    drop_reason = "malformed"

    def __init__(self, major_version: int) -> None:
        super().__init__(f"IKE major version {major_version}, we speak 2")
        self.major_version = major_version


class EncryptedWithoutKeys(MalformedMessage):
    """``decode_message`` met an SK payload but was given no keys. Callers
    that have keys pass them; without keys (a first IKE_SA_INIT, an IKE SA
    before IKE_SA_INIT completed) nothing can be encrypted yet (RFC 7296
    §1.2), so this is bad input from the peer, dropped and counted."""

    drop_reason = "sk_without_keys"


@dataclass(slots=True, frozen=True)
class IkeHeader:
    """The fixed IKE header (RFC 7296 §3.1)."""

    spi_i: bytes
    spi_r: bytes
    next_payload: PayloadType
    exchange: ExchangeType
    flags: HeaderFlag
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)

    @property
    def is_initiator(self) -> bool:
        return bool(self.flags & HeaderFlag.INITIATOR)


@dataclass(slots=True)
class IkeMessage:
    """A whole IKE message. ``is_initiator`` is the I flag: the sender is the
    original initiator of the IKE SA (RFC 7296 §3.1)."""

    spi_i: bytes
    spi_r: bytes
    exchange: ExchangeType
    message_id: int
    is_response: bool
    is_initiator: bool
    payloads: list[Payload] = field(default_factory=list)

    def get(self, cls: type[_P]) -> _P | None:
        """The first payload of class ``cls``, or None."""
        for p in self.payloads:
            if isinstance(p, cls):
                return p
        return None

    def get_all(self, cls: type[_P]) -> list[_P]:
        return [p for p in self.payloads if isinstance(p, cls)]

    def notify(self, notify_type: NotifyType) -> NotifyPayload | None:
        """The first Notify payload of ``notify_type``, or None."""
        for p in self.payloads:
            if isinstance(p, NotifyPayload) and p.notify_type == notify_type:
                return p
        return None

    def has_notify(self, notify_type: NotifyType) -> bool:
        return self.notify(notify_type) is not None


def decode_header(data: bytes | bytearray | memoryview) -> IkeHeader:
    """Parse and check the IKE header of a whole datagram (non-ESP marker
    already removed): major version 2, Length equal to the datagram size."""
    if len(data) < IKE_HEADER_LEN:
        raise MalformedMessage(f"{len(data)} bytes is shorter than an IKE header")
    spi_i, spi_r, next_payload, version, exchange, flags, message_id, length = \
        HEADER.unpack_from(data, 0)
    # RFC 7296 §3.1: the minor version is ignored on receipt.
    if version >> 4 != _IKE_MAJOR_VERSION:
        raise InvalidMajorVersion(version >> 4)
    if length != len(data):
        raise MalformedMessage(f"IKE Length {length} but the datagram has {len(data)} bytes")
    return IkeHeader(spi_i, spi_r, PayloadType(next_payload), ExchangeType(exchange),
                     HeaderFlag(flags), message_id, length)


def encode_header(msg: IkeMessage, next_payload: int, length: int) -> bytes:
    if len(msg.spi_i) != SPI_LEN or len(msg.spi_r) != SPI_LEN:
        raise ValueError("IKE SPIs are 8 bytes")
    if not 0 <= msg.message_id <= MAX_MESSAGE_ID:
        raise ValueError(f"message ID out of range: {msg.message_id}")
    flags = (HeaderFlag.INITIATOR if msg.is_initiator else 0) | (
        HeaderFlag.RESPONSE if msg.is_response else 0)
    return HEADER.pack(msg.spi_i, msg.spi_r, next_payload, IKE_VERSION, int(msg.exchange),
                       int(flags), msg.message_id, length)


def encode_message(msg: IkeMessage, sk: SkCipher | None = None, iv: bytes = b"") -> bytes:
    """The message as sent. Without ``sk`` the payloads are in the clear;
    with ``sk`` they all go inside one SK payload, sealed with ``iv``."""
    if sk is None:
        first, body = encode_payloads(msg.payloads)
        return encode_header(msg, first, IKE_HEADER_LEN + len(body)) + body
    first, inner = encode_payloads(msg.payloads)
    sk_len = GENERIC_PAYLOAD_HEADER_LEN + sk.sealed_size(len(inner))
    if sk_len > MAX_PAYLOAD_LEN:
        raise ValueError(f"SK payload of {sk_len} bytes does not fit its length field")
    # RFC 7296 §3.14 / RFC 5282 §5.1: authenticated data is the header and the
    # SK generic header, both already carrying the final lengths.
    aad = (encode_header(msg, PayloadType.SK, IKE_HEADER_LEN + sk_len)
           + GENERIC_HEADER.pack(int(first), 0, sk_len))
    return aad + sk.seal(aad, inner, iv)


def decode_message(data: bytes | bytearray | memoryview,
                   sk: SkCipher | None = None) -> IkeMessage:
    """Parse a whole IKE message, checking and decrypting its SK payload with
    ``sk`` (see the rules at the top of this file)."""
    view = memoryview(data)
    header = decode_header(view)
    buf = Reader(view, IKE_HEADER_LEN)
    raws = list(iter_raw_payloads(header.next_payload, buf))
    if not buf.eof():
        raise MalformedMessage("bytes after the last payload")
    last = raws[-1] if raws else None
    if last is not None and last.payload_type == PayloadType.SKF:
        raise MalformedMessage("SKF payload not in a fragment of an IKE SA (RFC 7383 §2.5)")
    inner: list[Payload] = []
    if last is not None and last.payload_type == PayloadType.SK:
        # The chain walk stops at SK, so SK is last if the datagram ends there.
        if sk is None:
            raise EncryptedWithoutKeys("message is encrypted; decode it with its keys")
        # AAD: every byte before the IV (RFC 5282 §5.1; RFC 7296 §3.14).
        body_start = last.start + GENERIC_PAYLOAD_HEADER_LEN
        plaintext = sk.open(view[:body_start], last.body.pull_view(last.body.remaining))
        inner = decode_payloads(last.next_type, plaintext)
        raws.pop()
    elif sk is not None:
        raise IntegrityError("message without an SK payload where protection is required")
    # Payloads before SK are interpreted only now, after authentication.
    payloads: list[Payload] = []
    for raw in raws:
        p = decode_raw_payload(raw)
        if p is not None:
            payloads.append(p)
    return IkeMessage(header.spi_i, header.spi_r, header.exchange, header.message_id,
                      header.is_response, header.is_initiator, payloads + inner)


def message_from_plaintext(header: IkeHeader, first_type: int,
                           plaintext: bytes | bytearray | memoryview) -> IkeMessage:
    """The message whose Encrypted payload(s) held ``plaintext`` (the inner
    payload chain, starting with a payload of ``first_type``): a message
    reassembled from RFC 7383 fragments, each already authenticated."""
    return IkeMessage(header.spi_i, header.spi_r, header.exchange, header.message_id,
                      header.is_response, header.is_initiator,
                      decode_payloads(first_type, plaintext))
