"""Message-ID and retransmission manager (RFC 7296 §2.1, §2.2, §2.3).

Rules of this file:
- Window size 1 both ways: at most one request of ours is outstanding.
- A retransmitted request (message ID one below the next expected) gets the
  cached response, byte for byte; the request is not processed again.
- A request or response sent in RFC 7383 fragments is resent as all of its
  fragments (RFC 7383 §2.6); ``request``/``response`` keep the whole message.
- Retransmits back off exponentially: timeout * base**n, ``tries`` times, then
  the exchange has failed and the IKE SA is dead (§2.4).
- Time is an argument; there is no clock here.
- Message IDs never wrap (RFC 7296 §2.2): once ``send_next`` has passed
  MAX_MESSAGE_ID the IKE SA can send no request (``exhausted``) and must end;
  a ``recv_next`` past it means the peer can send none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from common.errors import LocalProtocolError, PeerTimeout
from common.ike.message import MAX_MESSAGE_ID


class RequestVerdict(Enum):
    NEW = auto()         # process it
    RETRANSMIT = auto()  # answer with the cached response
    INVALID = auto()     # drop silently (RFC 7296 §2.3)


@dataclass(slots=True)
class RetransmitPolicy:
    timeout_s: float = 2.0
    base: float = 1.4
    tries: int = 3


@dataclass(slots=True)
class MessageIds:
    """Both directions of one IKE SA's message-ID state."""

    policy: RetransmitPolicy = field(default_factory=RetransmitPolicy)
    #: ID of the next request we send.
    send_next: int = 0
    #: ID of the next request we expect from the peer.
    recv_next: int = 0
    #: bytes of our outstanding request, or None.
    request: bytes | None = None
    request_id: int = -1
    request_tries: int = 0
    request_deadline: float | None = None
    #: bytes of our last response and the ID it answered (for retransmits).
    response: bytes | None = None
    response_id: int = -1
    #: digest of the request the cached response answers (sa.request_digest)
    response_digest: bytes = b""
    #: the RFC 7383 fragments ``request``/``response`` went out as
    #: (empty: sent whole); a retransmission sends all of them (§2.6)
    request_frags: list[bytes] = field(default_factory=list)
    response_frags: list[bytes] = field(default_factory=list)

    # -- our requests -----------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.request is not None

    @property
    def exhausted(self) -> bool:
        """No message ID left for a request of ours (RFC 7296 §2.2)."""
        return self.send_next > MAX_MESSAGE_ID

    def take_request_id(self) -> int:
        mid = self.send_next
        if mid > MAX_MESSAGE_ID:
            # Callers check ``exhausted`` first (IkeSa.kick ends the SA).
            raise LocalProtocolError(f"message ID {mid} past 2^32-1 (RFC 7296 §2.2)")
        self.send_next += 1
        return mid

    def sent_request(self, mid: int, data: bytes, now: float,
                     frags: list[bytes] | None = None) -> None:
        self.request = data
        self.request_frags = frags or []
        self.request_id = mid
        self.request_tries = 0
        self.request_deadline = now + self.policy.timeout_s

    def is_our_response(self, mid: int) -> bool:
        return self.request is not None and mid == self.request_id

    def response_received(self) -> None:
        self.request = None
        self.request_deadline = None

    def retransmit_due(self, now: float) -> bytes | None:
        """The request to send again, or None. Raises ``RetransmitsExhausted``
        when the peer stayed silent through every try."""
        if self.request is None or self.request_deadline is None:
            return None
        if now < self.request_deadline:
            return None
        if self.request_tries >= self.policy.tries:
            self.request_deadline = None
            raise RetransmitsExhausted(self.request_id)
        self.request_tries += 1
        self.request_deadline = now + self.policy.timeout_s * (
            self.policy.base ** self.request_tries)
        return self.request

    # -- peer requests ------------------------------------------------------

    def classify_request(self, mid: int) -> RequestVerdict:
        if mid == self.recv_next:
            return RequestVerdict.NEW
        if self.response is not None and mid == self.response_id:
            return RequestVerdict.RETRANSMIT
        return RequestVerdict.INVALID

    def sent_response(self, mid: int, data: bytes, frags: list[bytes] | None = None) -> None:
        self.response = data
        self.response_frags = frags or []
        self.response_id = mid
        self.recv_next = mid + 1


class RetransmitsExhausted(PeerTimeout):
    """Our request got no answer after every retransmission (RFC 7296 §2.4)."""

    def __init__(self, mid: int) -> None:
        super().__init__(f"no response to request {mid} after all retransmits")
        self.mid = mid
