"""Type stub of the compiled ESP byte primitive (common/_esp_fast.c).

One ``SaCipher`` per SA.  It holds only keys (inside OpenSSL contexts), the
SPI and the ESN flag; sequence numbers, IVs and the replay window stay in
``common.esp``.  Errors: ``common.errors.MalformedMessage`` for an inner packet
that is not IPv4/IPv6 or an ESP packet of impossible size or foreign SPI,
``common.errors.IntegrityError`` when the ICV fails.
"""

from collections.abc import Sequence

from typing_extensions import Buffer

from common.errors import IntegrityError, MalformedMessage

class SaCipher:
    def __init__(self, cipher: str, key: Buffer, salt: Buffer, integ_key: Buffer,
                 digest: str, spi: int, esn: bool) -> None:
        """``cipher`` "gcm" or "chacha20poly1305" (``digest`` "", no ``integ_key``),
        or "ctr" / "cbc" with ``digest`` "sha1", "sha256", "sha384" or "sha512"
        and its HMAC key; ``salt`` is 4 bytes, empty for "cbc"."""

    def seal(self, seq: int, iv: int, inner: Buffer, /) -> bytes:
        """``SPI | seq low | IV | ciphertext | ICV`` of ``inner`` + RFC 4303 trailer;
        for CBC the wire IV is the encryption of ``iv`` (see common.esp.CbcHmac)."""

    def peek(self, packet: Buffer, /) -> int:
        """The 32-bit sequence number on the wire, after the size and SPI checks."""

    def open(self, packet: Buffer, seq_high: int, /) -> bytes | None:
        """The inner packet; ``None`` if authentic but its trailer is malformed."""

    def seal_batch(self, first_seq: int, first_iv: int, inners: Sequence[Buffer], /
                   ) -> list[bytes | MalformedMessage]:
        """``seal`` of each inner packet in order, ``seq`` and ``iv`` starting at
        ``first_seq`` / ``first_iv`` and advancing by one per packet sealed; a
        refused inner packet takes no number and stands as its MalformedMessage.
        The caller keeps the batch inside one IV block and before its checkpoints."""

    def open_batch(self, packets: Sequence[Buffer], seq_highs: Sequence[int] | None, /
                   ) -> list[tuple[int, bytes | IntegrityError | MalformedMessage | None]]:
        """Per packet ``(seq_low, result)``: ``peek`` then ``open(packet, seq_high)``
        (``seq_highs`` None: all 0).  Size/SPI failure: ``(-1, MalformedMessage)``;
        else the inner bytes, None (authentic, malformed trailer) or the
        IntegrityError.  No replay window here: the caller walks the results."""

def match_selectors(src_blob: Buffer, dst_blob: Buffer, packet: Buffer, /) -> bool:
    """``common.selectors.packet_matches`` on compiled sides (``compile_blob``)."""

def five_tuple(packet: Buffer, /) -> tuple[int, int, int, int, int, int]:
    """``common.selectors.five_tuple``: the same fields and MalformedMessage cases."""
