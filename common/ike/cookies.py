"""Stateless anti-DoS cookies (RFC 7296 §2.6).

Rules of this file:
- Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>), with the hash
  an HMAC-SHA-256 keyed by the secret and the variable-length inputs
  length-prefixed, so no (Ni, IP) pair can be re-split into another.
- No clock: the caller calls ``rotate()`` when it decides (RFC 7296 §2.6 suggests
  regularly); the current and the previous secret are accepted, so a cookie
  handed out just before a rotation still works for the retried request.
- Secrets come from the injected ``RandomBytes`` and never show in a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from common.rand import RandomBytes

SECRET_LEN = 32
COOKIE_LEN = 1 + hashlib.sha256().digest_size  # version octet + MAC (RFC 7296: 1-64 octets)

_LENGTHS = struct.Struct("!HB")  # len(Ni), len(IPi)


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
