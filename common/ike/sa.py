"""One IKE SA, either role (RFC 7296): state, message IDs, keys, the task
queue, and its lifecycle: established, rekeyed into a successor, gone.

Rules of this file:
- Sans-I/O: bytes come in through ``receive_request``/``receive_response``
  with the time; bytes leave through the context's outbox; facts leave as
  events. No clock, no sockets, randomness from ``ctx.random``.
- The IKE SA state changes only through ``apply`` and ``IKE_TRANSITIONS``
  (common/ike/context.py); an unknown (state, input) pair is a bug and moves
  the SA to FAILED.
- Requests we initiate are tasks in a queue, one in flight (window size 1,
  RFC 7296 §2.3); requests from the peer are answered at once by the
  exchange modules, which sit above this file: it reaches them only through
  ``ctx.exchanges`` (common/ike/exchanges/dispatch.py), never by import.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import deque
from collections.abc import Callable

from common.cluster.pools import Lease
from common.errors import LocalProtocolError, RemoteProtocolError
from common.ike.child import ChildSa
from common.ike.constants import ExchangeType, IdType, NotifyType, PayloadType, ProtocolId
from common.ike.context import (
    IKE_TRANSITIONS,
    TERMINAL,
    Address,
    ChildInput,
    ChildState,
    IkeContext,
    IkeInput,
    IkeState,
    Outgoing,
    Task,
)
from common.ike.describe import describe
from common.ike.dh import DhKeyPair
from common.ike.events import (
    ChildSaDeleted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
)
from common.ike.fragments import max_message_len, open_fragment, split_message
from common.ike.keys import IkeKeys
from common.ike.message import (
    MAX_MESSAGE_ID,
    EncryptedWithoutKeys,
    IkeHeader,
    IkeMessage,
    decode_message,
    encode_message,
    message_from_plaintext,
)
from common.ike.msgid import MessageIds, RequestVerdict, RetransmitsExhausted
from common.ike.payloads import NotifyPayload, Payload, UnsupportedCriticalPayload
from common.ike.policy import IkePolicy, format_identity
from common.ike.proposals import IkeSuite, format_ike_suite
from common.ike.refusals import DropRequest, notify_for
from common.ike.sk import SkCipher

log = logging.getLogger("ipsec_cluster.ike")


class IkeSa:
    """State of one IKE SA and its children."""

    def __init__(self, ctx: IkeContext[IkeSa], *, initiator: bool, spi_i: bytes, spi_r: bytes,
                 remote: Address, local_port: int, state: IkeState,
                 policy: IkePolicy | None, candidates: list[IkePolicy] | None = None) -> None:
        self.ctx = ctx
        self.ike_id = ctx.new_id()
        self.initiator = initiator
        self.spi_i = spi_i
        self.spi_r = spi_r
        self.remote = remote
        self.local_port = local_port
        self.state = state
        self.policy = policy
        self.candidates = candidates or ([policy] if policy else [])
        self.mids = MessageIds(policy=ctx.options.retransmit)
        self.suite: IkeSuite | None = None
        self.keys: IkeKeys | None = None
        self.sk_in: SkCipher | None = None
        self.sk_out: SkCipher | None = None
        self.ni = b""
        self.nr = b""
        self.dh: DhKeyPair | None = None
        self.init_request = b""
        self.init_response = b""
        self.last_request = b""
        self.last_message = b""
        self.peer_id: tuple[IdType, bytes] | None = None
        self.peer_mid_sync = False
        #: the peer sent IKEV2_FRAGMENTATION_SUPPORTED in IKE_SA_INIT (RFC 7383 §2.3)
        self.peer_fragmentation = False
        #: RFC 7427 §4: the peer's N(SIGNATURE_HASH_ALGORITHMS), None if absent
        self.peer_hash_algs: frozenset[int] | None = None
        #: RFC 6311: nonce and answer data of the last MID sync request we took,
        #: so that its retransmission gets the same answer and no second bump.
        self.mid_sync_answered: tuple[bytes, bytes] | None = None
        #: RFC 6311 §5.1: the highest M1 of a sync we took (-1: none), and the
        #: last M1 we sent (each sync of ours announces a higher one)
        self.mid_sync_m1_seen = -1
        self.mid_sync_m1_sent = 0
        self.children: dict[int, ChildSa] = {}
        #: virtual IPs leased to the peer (CP reply, RFC 7296 §3.15)
        self.leases: tuple[Lease, ...] = ()
        self.queue: deque[Task[IkeSa]] = deque()
        self.active: Task[IkeSa] | None = None
        self.created_at = 0.0
        self.established_at: float | None = None
        self.last_heard = 0.0
        self.rekey_at: float | None = None
        self.half_open_deadline: float | None = None
        #: the IKE SA that replaced this one (after an IKE rekey)
        self.successor: IkeSa | None = None
        #: RFC 7296 §2.8.2 collision bookkeeping for IKE rekeys
        self.peer_rekey: tuple[bytes, bytes, IkeSa] | None = None
        self.counters: dict[str, int] = {"requests_in": 0, "responses_in": 0,
                                         "retransmits_answered": 0, "dropped": 0}
        #: hook for the failover issue: called with the response bytes before
        #: they leave; returns when the backup has them.
        self.on_response: Callable[[IkeSa, bytes], None] | None = None

    # -- state ----------------------------------------------------------------

    def apply(self, event: IkeInput) -> None:
        self.ctx.touched.add(self)
        nxt = IKE_TRANSITIONS.get((self.state, event))
        if nxt is None:
            old = self.state
            self.state = IkeState.FAILED
            raise LocalProtocolError(f"IKE SA {self.ike_id}: {event.name} in state {old.name}")
        self.state = nxt

    @property
    def name(self) -> str:
        return self.policy.name if self.policy else "?"

    @property
    def established(self) -> bool:
        return self.state in (IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def spis(self) -> tuple[bytes, bytes]:
        return self.spi_i, self.spi_r

    def fail(self, reason: str) -> None:
        """End this IKE SA because of an error; the shell logs the reason."""
        if self.terminal:
            return
        self.apply(IkeInput.FAILED)
        self.ctx.events.append(IkeSaFailed(self.ike_id, self.name, self.remote, reason))
        self._drop_children(reason)

    def gone(self, reason: str) -> None:
        """This IKE SA is deleted (by either end, or without telling the peer):
        its children go with it."""
        if self.terminal:
            return
        self._drop_children(reason)
        self.apply(IkeInput.DELETED)
        self.ctx.events.append(IkeSaDeleted(self.ike_id, self.name, reason))

    def _drop_children(self, reason: str) -> None:
        for child in list(self.children.values()):
            self.child_gone(child, reason)

    def establish(self, now: float) -> None:
        """IKE_AUTH succeeded (either role): the SA is up, its rekey timer runs."""
        if self.policy is None or self.suite is None or self.peer_id is None:
            raise LocalProtocolError("establishing an IKE SA without policy, suite or peer id")
        self.apply(IkeInput.AUTH_DONE)
        self.half_open_deadline = None
        self.established_at = self.last_heard = now
        if self.policy.rekey_time > 0:
            self.rekey_at = now + self.policy.rekey_time
        self.ctx.events.append(IkeSaEstablished(
            self.ike_id, self.policy.name, self.spi_i, self.spi_r, self.remote, self.initiator,
            format_ike_suite(self.suite), format_identity(*self.policy.local_id),
            format_identity(*self.peer_id)))

    # -- IKE rekey bookkeeping (RFC 7296 §2.18, collisions §2.8.2) ----------------

    def move_children(self, new: IkeSa, now: float) -> None:
        """The rekey into ``new`` is done: children, leases and queued child
        exchanges move there, and this SA is REKEYED."""
        new.children.update(self.children)
        self.children.clear()
        new.leases, self.leases = self.leases, ()  # the virtual IPs follow (RFC 7296 §2.18)
        # Queued child exchanges follow their children (strongSwan adopts them
        # too): left behind, they would find no child and be dropped as moot,
        # e.g. the delete of a child we just rekeyed.
        for task in [t for t in self.queue if t.name.startswith("child_")]:
            self.queue.remove(task)
            new.queue.append(task)
        new.established_at = new.last_heard = now
        if new.policy is not None and new.policy.rekey_time > 0:
            new.rekey_at = now + new.policy.rekey_time
        self.successor = new
        self.apply(IkeInput.REKEYED)
        self.ctx.events.append(IkeSaRekeyed(self.ike_id, new.ike_id, new.spi_i, new.spi_r))

    def peer_rekey_won(self, now: float) -> None:
        """RFC 7296 §2.8.2 collision where our request was lost or refused: the
        peer's rekey completed without seeing ours, so its new SA is the one, and
        the answer to ours will never come. The children go to the peer's new SA
        instead of dying with the old one when the peer deletes it."""
        if self.peer_rekey is None:
            return
        _, _, theirs = self.peer_rekey
        self.peer_rekey = None
        if theirs.terminal or self.state is not IkeState.ESTABLISHED:
            return
        log.info("IKE SA %d: the peer's rekey into %d completed first", self.ike_id,
                 theirs.ike_id)
        self.move_children(theirs, now)
        theirs.kick(now)

    # -- keys -------------------------------------------------------------------

    def install_keys(self, suite: IkeSuite, keys: IkeKeys) -> None:
        self.suite = suite
        self.keys = keys
        sk_ei = SkCipher(suite.encr, suite.key_bits, suite.integ, keys.sk_ei, keys.sk_ai)
        sk_er = SkCipher(suite.encr, suite.key_bits, suite.integ, keys.sk_er, keys.sk_ar)
        self.sk_out, self.sk_in = (sk_ei, sk_er) if self.initiator else (sk_er, sk_ei)

    def nonce(self) -> bytes:
        return self.ctx.random(self.ctx.options.nonce_len)

    # -- sending ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.ctx.touched.add(self)
        self.ctx.outbox.append(Outgoing(data, self.remote, self.local_port, self.ike_id))

    def encode(self, exchange: ExchangeType, mid: int, response: bool,
               payloads: list[Payload]) -> bytes:
        msg = IkeMessage(spi_i=self.spi_i, spi_r=self.spi_r, exchange=exchange,
                         message_id=mid, is_response=response, is_initiator=self.initiator,
                         payloads=payloads)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("IKE SA %d: sending %s to %s", self.ike_id, describe(msg), self.remote[0])
        if self.sk_out is None:
            return encode_message(msg)
        return encode_message(msg, self.sk_out, self.ctx.random(self.sk_out.iv_size))

    def encode_out(self, exchange: ExchangeType, mid: int, response: bool,
                   payloads: list[Payload]) -> tuple[bytes, list[bytes]]:
        """The message whole, and the RFC 7383 fragments it goes out as
        (empty: it goes out whole)."""
        data = self.encode(exchange, mid, response, payloads)
        opts = self.ctx.options
        # RFC 7383 §2.3, §2.5.3: only when both announced it, never IKE_SA_INIT.
        if (self.sk_out is None or exchange == ExchangeType.IKE_SA_INIT
                or not self.peer_fragmentation or self.policy is None
                or self.policy.fragmentation not in ("yes", "force")):
            return data, []
        limit = max_message_len(opts.fragment_size, self.remote[0],
                                self.local_port != opts.ike_port)
        if len(data) <= limit:
            return data, []
        msg = IkeMessage(spi_i=self.spi_i, spi_r=self.spi_r, exchange=exchange,
                         message_id=mid, is_response=response, is_initiator=self.initiator,
                         payloads=payloads)
        return data, split_message(msg, self.sk_out, self.ctx.random, limit) or []

    def send_all(self, data: bytes, frags: list[bytes]) -> None:
        for datagram in frags or [data]:
            self.send(datagram)

    def queue_task(self, task: Task[IkeSa], now: float, *, first: bool = False) -> None:
        if first:
            self.queue.appendleft(task)
        else:
            self.queue.append(task)
        self.kick(now)

    def kick(self, now: float) -> None:
        """Send the next queued request if none is in flight. A responder
        sends nothing before IKE_AUTH made the SA ESTABLISHED (the peer is not
        authenticated yet); queued tasks wait until then."""
        self.ctx.touched.add(self)  # the queue changed: DPD is due or not
        if self.state is IkeState.HALF_OPEN:
            return
        while self.active is None and self.queue and not self.terminal:
            fixed = getattr(self.queue[0], "fixed_mid", None)
            if fixed is None and self.mids.exhausted:
                # RFC 7296 §2.2: message IDs never wrap, and without one not
                # even a delete can be sent: the IKE SA ends here.
                self.fail(f"message IDs exhausted (next would be {self.mids.send_next})")
                return
            task = self.queue.popleft()
            payloads = task.build(self, now)
            if payloads is None:
                continue
            mid = self.mids.take_request_id() if fixed is None else fixed
            data, frags = self.encode_out(task.exchange, mid, False, payloads)
            self.mids.sent_request(mid, data, now, frags)
            self.last_request = data
            self.active = task
            self.send_all(data, frags)

    def restart_request(self, task: Task[IkeSa], payloads: list[Payload], now: float,
                        mid: int) -> None:
        """Send a new request with a given message ID (IKE_SA_INIT retry after
        COOKIE or INVALID_KE_PAYLOAD, RFC 7296 §2.6/§1.2; MID sync uses 0)."""
        data, frags = self.encode_out(task.exchange, mid, False, payloads)
        self.mids.sent_request(mid, data, now, frags)
        self.last_request = data
        self.active = task
        self.send_all(data, frags)

    # -- receiving --------------------------------------------------------------

    def receive_response(self, header: IkeHeader, data: bytes, remote: Address,
                         local_port: int, now: float) -> None:
        self.ctx.touched.add(self)
        if not self.mids.is_our_response(header.message_id) or self.active is None:
            self._drop("unexpected_response")
            return
        try:
            msg = self._decode(header, data, now)
        except RemoteProtocolError as exc:
            # RFC 7296 §2.21.2: a message failing integrity is dropped.
            self._drop(exc.drop_reason)
            log.debug("IKE SA %d: dropped bad response: %s", self.ike_id, exc)
            return
        if msg is None:
            return  # a fragment stored, more to come
        if log.isEnabledFor(logging.DEBUG):
            log.debug("IKE SA %d: received %s from %s", self.ike_id, describe(msg), remote[0])
        self.counters["responses_in"] += 1
        self.last_heard = now
        self.last_message = data
        self.mids.response_received()
        task, self.active = self.active, None
        try:
            task.process(self, msg, now)
        finally:
            # A bad answer ends its exchange only: the next request goes
            # out (the engine counts the error itself).
            self.kick(now)

    def _decode(self, header: IkeHeader, data: bytes, now: float) -> IkeMessage | None:
        """The protected message, or None while RFC 7383 fragments of it are
        still missing. Each fragment is authenticated before it is stored
        (RFC 7383 §2.6.1); the reassembly bounds are common/ike/fragments.py's."""
        if header.next_payload != PayloadType.SKF:
            return decode_message(data, self.sk_in)
        if self.sk_in is None:
            raise EncryptedWithoutKeys("fragment before keys exist")
        frag = open_fragment(data, header, self.sk_in)
        whole = self.ctx.reassembly.add(
            (self.ike_id, header.message_id, header.is_response), frag, now)
        if whole is None:
            return None
        return message_from_plaintext(header, whole[0], whole[1])

    def _drop(self, reason: str) -> None:
        self.counters["dropped"] += 1
        self.ctx.drops[reason] += 1

    def receive_request(self, header: IkeHeader, data: bytes, remote: Address,
                        local_port: int, now: float) -> None:
        self.ctx.touched.add(self)
        verdict = self.mids.classify_request(header.message_id)
        # RFC 6311: a MID sync request always has message ID 0, outside the
        # sequence; only its decrypted content tells it from a retransmit.
        maybe_sync = (header.message_id == 0 and verdict is not RequestVerdict.NEW
                      and header.exchange == ExchangeType.INFORMATIONAL and self.established)
        if verdict is RequestVerdict.RETRANSMIT and not maybe_sync:
            if header.next_payload == PayloadType.SKF:
                self._fragment_retransmit(header, data, remote, local_port)
            else:
                self._answer_retransmit(data, remote, local_port)
            return
        if verdict is RequestVerdict.INVALID and not maybe_sync:
            self._drop("bad_message_id")
            return
        if self.sk_in is None:
            # RFC 7296 §1.2: no request reaches an IKE SA before its keys
            # exist (the peer answers our IKE_SA_INIT first): not even an
            # unprotected error answer goes out, which would use up ID 0.
            self._drop("unexpected_exchange")
            return
        try:
            decoded = self._decode(header, data, now)
        except UnsupportedCriticalPayload as exc:
            # RFC 7296 §2.5: answer with the type of the payload we do not know.
            stub = IkeMessage(self.spi_i, self.spi_r, header.exchange, header.message_id,
                              False, not self.initiator, [])
            self.respond(stub, [notify_for(exc)], now, request=data)
            return
        except RemoteProtocolError as exc:
            self._drop(exc.drop_reason)
            log.debug("IKE SA %d: dropped bad request: %s", self.ike_id, exc)
            return
        if decoded is None:
            return  # a fragment stored, more to come
        msg = decoded
        if maybe_sync and not is_mid_sync_request(msg):
            if verdict is RequestVerdict.RETRANSMIT:
                self._answer_retransmit(data, remote, local_port)
            else:
                self._drop("bad_message_id")
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("IKE SA %d: received %s from %s", self.ike_id, describe(msg), remote[0])
        self.counters["requests_in"] += 1
        self.last_heard = now
        # RFC 7296 §2.23: follow the peer's NAT mapping on authenticated requests.
        self.remote = remote
        self.local_port = local_port
        try:
            payloads = self.ctx.exchanges.handle_request(self, msg, now)
        except DropRequest as exc:
            self._drop(exc.drop_reason)
            log.info("IKE SA %d: request dropped: %s", self.ike_id, exc)
            return
        except RemoteProtocolError as exc:
            log.info("IKE SA %d: request refused: %s", self.ike_id, exc)
            payloads = [notify_for(exc)]
        self.respond(msg, payloads, now, request=data)

    def _answer_retransmit(self, data: bytes, remote: Address, local_port: int) -> None:
        """RFC 7296 §2.1: a retransmitted request gets the same response, byte
        for byte — but only if it IS the same request (a digest of it is kept):
        a forged header with a guessed message ID must not make us reflect
        our larger response to any address."""
        digest = self.mids.response_digest
        if self.mids.response is None or (digest and not hmac.compare_digest(
                digest, request_digest(data))):
            self.counters["dropped"] += 1
            return
        self._resend_response(remote, local_port)

    def _resend_response(self, remote: Address, local_port: int) -> None:
        if self.mids.response is None:
            return
        self.counters["retransmits_answered"] += 1
        for datagram in self.mids.response_frags or [self.mids.response]:
            self.ctx.outbox.append(Outgoing(datagram, remote, local_port, self.ike_id))

    def _fragment_retransmit(self, header: IkeHeader, data: bytes, remote: Address,
                             local_port: int) -> None:
        """A fragment of the request our cached response answers (RFC 7383
        §2.6.1): checked first, and only fragment 1 brings the whole response
        again (all its fragments), so that a retransmitted request of n
        fragments gets one response, not n."""
        if self.sk_in is None:
            self._drop("sk_without_keys")
            return
        try:
            frag = open_fragment(data, header, self.sk_in)
        except RemoteProtocolError as exc:
            self._drop(exc.drop_reason)
            return
        if frag.number == 1:
            self._resend_response(remote, local_port)

    def respond(self, msg: IkeMessage, payloads: list[Payload], now: float, *,
                request: bytes = b"") -> None:
        data, frags = self.encode_out(msg.exchange, msg.message_id, True, payloads)
        # RFC 6311: a MID sync request is outside the message-ID sequence; its
        # message ID 0 must not count as the peer's request 0 (the handler has
        # set recv_next to the value we announced).
        if msg.message_id == self.mids.recv_next and not (
                msg.exchange == ExchangeType.INFORMATIONAL and is_mid_sync_request(msg)):
            self.mids.sent_response(msg.message_id, data, frags)
            self.mids.response_digest = request_digest(request) if request else b""
        if self.on_response is not None:
            self.on_response(self, data)
        self.send_all(data, frags)
        if self.successor is not None:
            # After answering an IKE rekey: child exchanges moved to the new SA.
            self.successor.kick(now)
        if self.state in TERMINAL:
            return
        if self.mids.recv_next > MAX_MESSAGE_ID and self.state is IkeState.ESTABLISHED:
            # RFC 7296 §2.2: the peer has used its last message ID; it can
            # send no request on this IKE SA again (not even a rekey), so
            # we close it while our own IDs still allow the delete.
            self.queue_task(self.ctx.exchanges.delete_ike("peer's message IDs exhausted"), now)
            return
        self.kick(now)

    # -- timers -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        # The rekey time counts only while ESTABLISHED, as in handle_timer: a
        # REKEYED SA whose delete never comes must not stay due for ever (the
        # shell's timer would spin).
        rekey = self.rekey_at if self.state is IkeState.ESTABLISHED else None
        times = [t for t in (self.mids.request_deadline, self.half_open_deadline,
                             rekey, self._dpd_at()) if t is not None]
        times += [c.rekey_at for c in self.children.values()
                  if c.rekey_at is not None and c.state is ChildState.INSTALLED]
        return min(times) if times else None

    def _dpd_at(self) -> float | None:
        if self.state is not IkeState.ESTABLISHED or self.policy is None:
            return None
        if self.policy.dpd_delay <= 0 or self.active is not None or self.queue:
            return None
        return self.last_heard + self.policy.dpd_delay

    def handle_timer(self, now: float) -> None:
        self.ctx.touched.add(self)
        if self.terminal:
            return
        try:
            again = self.mids.retransmit_due(now)
        except RetransmitsExhausted as exc:
            task, self.active = self.active, None
            if task is not None:
                task.failed(self, now)
            self.fail(f"peer not answering: {exc}")
            return
        if again is not None:
            self.send_all(again, self.mids.request_frags)
        if self.half_open_deadline is not None and now >= self.half_open_deadline:
            self.fail("half-open IKE SA timed out")
            return
        if (self.rekey_at is not None and now >= self.rekey_at
                and self.state is IkeState.ESTABLISHED):
            self.rekey_at = None
            self.queue_task(self.ctx.exchanges.rekey_ike(), now)
        for child in list(self.children.values()):
            if child.rekey_at is not None and now >= child.rekey_at and \
                    child.state is ChildState.INSTALLED:
                child.rekey_at = None
                self.queue_task(self.ctx.exchanges.rekey_child(child.spi_in), now)
        dpd = self._dpd_at()
        if dpd is not None and now >= dpd:
            self.queue_task(self.ctx.exchanges.dpd(), now)

    # -- children ---------------------------------------------------------------

    def child_by_out(self, spi_out: int) -> ChildSa | None:
        for child in self.children.values():
            if child.spi_out == spi_out:
                return child
        return None

    def mark_child(self, child: ChildSa, event: ChildInput) -> None:
        child.apply(event)

    def child_gone(self, child: ChildSa, reason: str) -> None:
        """Forget a child SA and tell the shell to remove its ESP state."""
        if self.children.pop(child.spi_in, None) is None:
            return
        if child.state is not ChildState.DELETED:
            child.apply(ChildInput.DELETED)
        self.ctx.spis.release_esp(child.spi_in)
        self.ctx.events.append(ChildSaDeleted(self.ike_id, child.name, child.spi_in,
                                              child.spi_out, reason))


def is_mid_sync_request(msg: IkeMessage) -> bool:
    """An RFC 6311 IKEV2_MESSAGE_ID_SYNC request (always message ID 0, §4)."""
    return msg.message_id == 0 and msg.has_notify(NotifyType.IKEV2_MESSAGE_ID_SYNC)


def request_digest(data: bytes) -> bytes:
    """What identifies a request for retransmit detection."""
    return hashlib.sha256(data).digest()[:16]


def protocol_esp_spi(n: NotifyPayload) -> int | None:
    """The 4-byte ESP SPI of a REKEY_SA notify, or None."""
    if n.protocol != ProtocolId.ESP or len(n.spi) != 4:
        return None
    return int.from_bytes(n.spi, "big")
