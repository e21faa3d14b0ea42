"""Stateless anti-DoS cookies (RFC 7296 §2.6).

Rules of this file:
- Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>), with the hash
  an HMAC-SHA-256 keyed by the secret and the variable-length inputs
  length-prefixed, so no (Ni, IP) pair can be re-split into another.
- No clock: the caller calls ``rotate()`` when it decides (RFC 7296 §2.6 suggests
  regularly); the current and the previous secret are accepted, so a cookie
  handed out just before a rotation still works for the retried request.
- Secrets come from the injected ``RandomBytes`` and never show in a repr.
- Under a flood, most IKE_SA_INITs only need a COOKIE answer: ``peek_init``
  reads what that takes (SPIi, Ni, a COOKIE in front) from the generic
  payload headers alone, and ``cookie_answer`` builds the answer's bytes,
  without decoding proposals or encoding a message (a full decode costs a
  member ~0.5 ms; this ~20 us).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from common.ike.constants import (
    IKE_HEADER_LEN,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from common.ike.message import HEADER
from common.rand import RandomBytes

SECRET_LEN = 32
COOKIE_LEN = 1 + hashlib.sha256().digest_size  # version octet + MAC (RFC 7296: 1-64 octets)

_LENGTHS = struct.Struct("!HB")  # len(Ni), len(IPi)
_GENERIC = struct.Struct("!BBH")  # next payload, critical, length (RFC 7296 §3.2)
_NOTIFY = struct.Struct("!BBHBBH")  # generic header, protocol, SPI size, type (§3.10)
_IKE_VERSION = 0x20
#: payloads walked before giving up (a real IKE_SA_INIT has fewer than 10)
_MAX_PAYLOADS = 32


class CookieJar:
    """Makes and checks COOKIE notification data for one responder (or for a
    whole cluster, when every member holds the same secrets)."""

    __slots__ = ("_previous", "_random", "_secret", "_version")

    def __init__(self, secret_random: RandomBytes) -> None:
        self._random = secret_random
        self._version = 0
        self._secret = secret_random(SECRET_LEN)
        self._previous: tuple[int, bytes] | None = None

    def __repr__(self) -> str:
        return f"CookieJar(version={self._version})"

    @property
    def version(self) -> int:
        """The VersionIDofSecret of the current secret (one octet, wraps)."""
        return self._version

    def rotate(self) -> None:
        """Switch to a fresh secret; cookies of the one before stay valid until
        the next rotation."""
        self._previous = (self._version, self._secret)
        self._version = (self._version + 1) % 256
        self._secret = self._random(SECRET_LEN)

    def make(self, ni: bytes, ip: bytes, spi_i: bytes) -> bytes:
        """The cookie for an IKE_SA_INIT request with nonce ``ni`` from address
        ``ip`` (4 or 16 raw octets) and initiator SPI ``spi_i``."""
        return bytes((self._version,)) + _mac(self._secret, ni, ip, spi_i)

    def check(self, cookie: bytes, ni: bytes, ip: bytes, spi_i: bytes) -> bool:
        """Is ``cookie`` one we made for this request, with the current or the
        previous secret?"""
        if len(cookie) != COOKIE_LEN:
            return False
        version = cookie[0]
        if version == self._version:
            secret = self._secret
        elif self._previous is not None and version == self._previous[0]:
            secret = self._previous[1]
        else:
            return False
        return hmac.compare_digest(cookie[1:], _mac(secret, ni, ip, spi_i))


def _mac(secret: bytes, ni: bytes, ip: bytes, spi_i: bytes) -> bytes:
    data = _LENGTHS.pack(len(ni), len(ip)) + ni + ip + spi_i
    return hmac.digest(secret, data, "sha256")


@dataclass(slots=True, frozen=True)
class InitPeek:
    """What a COOKIE decision needs of an IKE_SA_INIT request."""

    spi_i: bytes
    nonce: bytes
    #: the data of a COOKIE notify that is the first payload, or None
    cookie: bytes | None


def peek_init(data: bytes) -> InitPeek | None:
    """SPIi, Ni and a leading COOKIE of an IKE_SA_INIT request whose header
    is already checked, by walking the generic payload headers only. None
    when the chain is not well formed or has no Nonce: the full decoder
    then decides (and names the error)."""
    spi_i = data[:8]
    next_type = data[16]
    offset, cookie, nonce = IKE_HEADER_LEN, None, None
    for _ in range(_MAX_PAYLOADS):
        if next_type == PayloadType.NONE:
            break
        if offset + _GENERIC.size > len(data):
            return None
        following, _, length = _GENERIC.unpack_from(data, offset)
        if length < _GENERIC.size or offset + length > len(data):
            return None
        if next_type == PayloadType.NONCE and nonce is None:
            nonce = data[offset + _GENERIC.size:offset + length]
        elif (next_type == PayloadType.NOTIFY and offset == IKE_HEADER_LEN
              and length >= _NOTIFY.size):
            _, _, _, _, spi_size, notify = _NOTIFY.unpack_from(data, offset)
            if notify == NotifyType.COOKIE and spi_size == 0:
                cookie = data[offset + _NOTIFY.size:offset + length]
        next_type, offset = following, offset + length
    else:
        return None
    if nonce is None or offset != len(data):
        return None
    return InitPeek(spi_i, nonce, cookie)


def cookie_answer(spi_i: bytes, cookie: bytes) -> bytes:
    """The unprotected IKE_SA_INIT answer carrying only N(COOKIE) (RFC 7296
    §2.6), byte for byte what encoding it as a message gives."""
    notify = _NOTIFY.pack(PayloadType.NONE, 0, _NOTIFY.size + len(cookie), 0, 0,
                          NotifyType.COOKIE) + cookie
    header = HEADER.pack(spi_i, bytes(8), PayloadType.NOTIFY, _IKE_VERSION,
                         ExchangeType.IKE_SA_INIT, HeaderFlag.RESPONSE, 0,
                         IKE_HEADER_LEN + len(notify))
    return header + notify


def packed_ip(address: str) -> bytes:
    """``ipaddress.ip_address(address).packed``, ~5x faster for the dotted
    IPv4 addresses the shells hand us (this runs for every IKE_SA_INIT of a
    flood)."""
    parts = address.split(".")
    if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 for p in parts):
        values = [int(p) for p in parts]
        # canonical form only (no leading zeros), as ipaddress insists
        if max(values) <= 255 and ".".join(map(str, values)) == address:
            return bytes(values)
    return ipaddress.ip_address(address).packed
