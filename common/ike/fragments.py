"""IKEv2 message fragmentation, RFC 7383: the Encrypted Fragment (SKF)
payload, splitting our messages and reassembling the peer's.

Rules of this file:
- Pure: no clock (``now`` is an argument), no randomness of its own (IVs come
  from the caller's ``RandomBytes``).
- Only protected messages are fragmented (RFC 7383 §2.5.3: never
  IKE_SA_INIT); a message that fits one datagram goes out whole.
- Every fragment is authenticated before anything of it is stored (RFC 7383
  §2.6.1): unauthenticated bytes never hold memory.
- Reassembly is bounded (RFC 7383 §3, "DoS"): fragments per message, bytes
  per message, messages being reassembled at once (engine-wide) and the age of
  a partial message. A refused fragment raises ``FragmentRefused`` (a
  ``RemoteProtocolError``) naming the reason the engine counts it under.

SKF payload (RFC 7383 §2.5), always the only payload of its message here:
    Next Payload | C | Payload Length | Fragment Number (2) | Total Fragments (2)
    | IV | encrypted inner payload bytes | Padding | Pad Length | ICV
The AAD / integrity check covers the IKE header and these 8 header octets.
Next Payload is the first inner payload's type in fragment 1, zero in the others.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from common.errors import MalformedMessage, RemoteProtocolError
from common.ike.constants import GENERIC_PAYLOAD_HEADER_LEN, IKE_HEADER_LEN, PayloadType
from common.ike.message import IkeHeader, IkeMessage, encode_header
from common.ike.payloads import encode_payloads
from common.ike.sk import SkCipher
from common.rand import RandomBytes

# Next Payload, flags, Payload Length, Fragment Number, Total Fragments.
SKF_HEADER = struct.Struct("!BBHHH")
SKF_HEADER_LEN = SKF_HEADER.size

#: IP datagram size of a fragment we send (RFC 7383 §2.5.1: the IPv6 minimum
#: MTU, which also passes nearly every IPv4 path; strongSwan's
#: charon.fragment_size default is the same 1280, for both families).
FRAGMENT_SIZE_DEFAULT = 1280
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
NON_ESP_MARKER_LEN = 4  # RFC 3948 §2.2, on port 4500
#: RFC 7383 §2.5: Fragment Number and Total Fragments are 16-bit, from 1.
MAX_FRAGMENT_NUMBER = 0xFFFF

#: Reassembly limits (RFC 7383 §3). A PSK IKE_AUTH with 60 selectors per side
#: is about 3 kB, one with a certificate chain 5-10 kB: 64 fragments of at
#: least ~500 bytes and 32 KiB cover both with room to spare (the same figures
#: as Rockhopper's defaults; strongSwan refuses messages over 10000 bytes).
MAX_FRAGMENTS_PER_MESSAGE = 64
MAX_REASSEMBLY_BYTES = 32 * 1024
#: Messages being reassembled at once, over all IKE SAs: with the byte limit
#: above, at most 4 MiB held, whatever a flood of authenticated fragments does.
MAX_REASSEMBLIES = 128
#: A partial message older than this is discarded; the sender's retransmits
#: (RFC 7296 §2.4, every fragment again) start it over.
REASSEMBLY_TIMEOUT_S = 30.0

DROP_FRAGMENT_DUPLICATE = "fragment_duplicate"
DROP_FRAGMENT_TOTAL = "fragment_total"
DROP_FRAGMENT_LIMIT = "fragment_limit"
DROP_FRAGMENT_FULL = "fragment_reassembly_full"


class FragmentRefused(RemoteProtocolError):
    """An authenticated fragment not stored: duplicate, stale total, over a
    limit (RFC 7383 §2.6.2, §3)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.drop_reason = reason


@dataclass(slots=True, frozen=True)
class Fragment:
    """One authenticated, decrypted fragment."""

    number: int
    total: int
    next_type: int
    plaintext: bytes


def max_message_len(fragment_size: int, remote_ip: str, natt: bool) -> int:
    """Bytes of IKE message that fit a datagram of ``fragment_size`` IP
    octets to ``remote_ip`` (RFC 7383 §2.5.1)."""
    ip = IPV6_HEADER_LEN if ":" in remote_ip else IPV4_HEADER_LEN
    return fragment_size - ip - UDP_HEADER_LEN - (NON_ESP_MARKER_LEN if natt else 0)


def _chunk_len(sk: SkCipher, max_len: int) -> int:
    """The most inner bytes one fragment of at most ``max_len`` bytes carries."""
    room = max_len - IKE_HEADER_LEN - SKF_HEADER_LEN
    n = room - sk.iv_size - sk.icv_size - 1
    while n > 0 and sk.sealed_size(n) > room:
        n -= 1  # at most one block's worth of steps
    if n <= 0:
        raise ValueError(f"a fragment of {max_len} bytes has no room for payload")
    return n


def split_message(msg: IkeMessage, sk: SkCipher, random: RandomBytes,
                  max_len: int) -> list[bytes] | None:
    """``msg`` as RFC 7383 fragments of at most ``max_len`` bytes each, or
    None when it fits one SK message of that size (then it goes out whole)."""
    first, inner = encode_payloads(msg.payloads)
    if IKE_HEADER_LEN + GENERIC_PAYLOAD_HEADER_LEN + sk.sealed_size(len(inner)) <= max_len:
        return None
    chunk = _chunk_len(sk, max_len)
    pieces = [inner[i:i + chunk] for i in range(0, len(inner), chunk)]
    total = len(pieces)
    if total > MAX_FRAGMENT_NUMBER:
        raise ValueError(f"{len(inner)} bytes need {total} fragments")
    out = []
    for number, piece in enumerate(pieces, 1):
        skf_len = SKF_HEADER_LEN + sk.sealed_size(len(piece))
        aad = (encode_header(msg, PayloadType.SKF, IKE_HEADER_LEN + skf_len)
               + SKF_HEADER.pack(int(first) if number == 1 else 0, 0, skf_len, number, total))
        out.append(aad + sk.seal(aad, piece, random(sk.iv_size)))
    return out


def open_fragment(data: bytes, header: IkeHeader, sk: SkCipher) -> Fragment:
    """Check and decrypt a message whose first payload is SKF. Raises
    ``MalformedMessage`` or ``IntegrityError`` (RFC 7383 §2.6.1: nothing of a
    fragment is believed before its ICV is checked)."""
    if header.next_payload != PayloadType.SKF:
        raise MalformedMessage("not a fragment")
    if len(data) < IKE_HEADER_LEN + SKF_HEADER_LEN:
        raise MalformedMessage("SKF payload header past the end")
    next_type, _, length, number, total = SKF_HEADER.unpack_from(data, IKE_HEADER_LEN)
    if length != len(data) - IKE_HEADER_LEN:
        # The SKF payload is the only one: it ends with the datagram.
        raise MalformedMessage(f"SKF length {length} does not end the message")
    if not 1 <= number <= total:
        # RFC 7383 §2.5: numbered from 1 up to Total Fragments.
        raise MalformedMessage(f"fragment {number} of {total}")
    aad_end = IKE_HEADER_LEN + SKF_HEADER_LEN
    plaintext = sk.open(memoryview(data)[:aad_end], memoryview(data)[aad_end:])
    return Fragment(number, total, next_type, plaintext)


@dataclass(slots=True)
class _Partial:
    total: int
    started: float
    next_type: int = 0
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


#: (IKE SA id, message ID, is a response)
ReassemblyKey = tuple[int, int, bool]


@dataclass(slots=True)
class Reassembly:
    """Partial messages of every IKE SA of one engine, bounded."""

    max_fragments: int = MAX_FRAGMENTS_PER_MESSAGE
    max_bytes: int = MAX_REASSEMBLY_BYTES
    max_messages: int = MAX_REASSEMBLIES
    timeout_s: float = REASSEMBLY_TIMEOUT_S
    _partials: dict[ReassemblyKey, _Partial] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._partials)

    @property
    def held_bytes(self) -> int:
        return sum(p.size for p in self._partials.values())

    @property
    def held_fragments(self) -> int:
        return sum(len(p.pieces) for p in self._partials.values())

    def add(self, key: ReassemblyKey, frag: Fragment, now: float) -> tuple[int, bytes] | None:
        """Store an authenticated fragment; the whole message (type of its
        first payload, inner payload bytes) once every fragment is in."""
        self._expire(now)
        if frag.total > self.max_fragments:
            raise FragmentRefused(DROP_FRAGMENT_LIMIT,
                                  f"{frag.total} fragments, at most {self.max_fragments}")
        part = self._partials.get(key)
        if part is not None and frag.total != part.total:
            if frag.total < part.total:
                # RFC 7383 §2.6.2: fewer fragments than before: a stale one.
                raise FragmentRefused(DROP_FRAGMENT_TOTAL, f"total {frag.total} after "
                                      f"{part.total}")
            # More than before: the sender re-fragmented smaller (PMTU
            # discovery, RFC 7383 §2.5.2); what we hold is of the old split.
            del self._partials[key]
            part = None
        if part is None:
            part = self._start(key, frag.total, now)
        if frag.number in part.pieces:
            raise FragmentRefused(DROP_FRAGMENT_DUPLICATE, f"fragment {frag.number} again")
        if part.size + len(frag.plaintext) > self.max_bytes:
            del self._partials[key]
            raise FragmentRefused(DROP_FRAGMENT_LIMIT, f"message over {self.max_bytes} bytes")
        part.pieces[frag.number] = frag.plaintext
        part.size += len(frag.plaintext)
        if frag.number == 1:
            part.next_type = frag.next_type
        if len(part.pieces) < part.total:
            return None
        del self._partials[key]
        return part.next_type, b"".join(part.pieces[i] for i in range(1, part.total + 1))

    def _start(self, key: ReassemblyKey, total: int, now: float) -> _Partial:
        ike_id, _, response = key
        # Window size 1 (RFC 7296 §2.3): a new message ID in one direction
        # makes older partial messages of that direction stale.
        for old in [k for k in self._partials if k[0] == ike_id and k[2] == response]:
            del self._partials[old]
        if len(self._partials) >= self.max_messages:
            raise FragmentRefused(DROP_FRAGMENT_FULL,
                                  f"{self.max_messages} messages in reassembly already")
        part = _Partial(total, now)
        self._partials[key] = part
        return part

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._partials.items() if now - p.started > self.timeout_s]:
            del self._partials[key]

    def forget(self, ike_id: int) -> None:
        """The IKE SA is gone: drop its partial messages."""
        for key in [k for k in self._partials if k[0] == ike_id]:
            del self._partials[key]
