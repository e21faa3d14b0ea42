"""Resources stay bounded under floods (common/ike/limits.py; RFC 7296 §2.1,
§2.6, §3.10.1; RFC 8019 §4), in memory with time as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.ike.constants import ExchangeType, NotifyType
from common.ike.context import IkeState
from common.ike.cookies import cookie_answer, packed_ip, peek_init
from common.ike.events import ChildSaFailed, ChildSaInstalled, IkeSaEstablished
from common.ike.exchanges.ike_init import error_answer
from common.ike.limits import (
    CHILD_SA_MAX_PER_IKE_SA,
    DROP_HALF_OPEN_CAP,
    DROP_HALF_OPEN_MEMORY,
    DROP_INIT_RATE,
    DROP_NO_ADDITIONAL_SAS,
    DROP_RETRANSMIT_RATE,
    HALF_OPEN_MAX,
    BucketTable,
    EngineLimits,
    LimitSettings,
)
from common.ike.message import IkeMessage, decode_header, decode_message, encode_message
from common.ike.payloads import NoncePayload, NotifyPayload
from common.ike.refusals import Refused
from tests.ike_pair import Pair, make_pair

LOOSE = LimitSettings(init_rate_per_s=1000.0, init_burst=1000.0)


def pair(limits: LimitSettings | None = None, cookie_threshold: int = 100) -> Pair:
    p = make_pair(extra_children=False, cookie_threshold_b=cookie_threshold)
    p.b.limits = EngineLimits(limits)
    return p


class Flood:
    """IKE_SA_INIT requests from many sources, each a real request of ``a``
    (real KE, nonce) with its own initiator SPI, answering COOKIEs."""

    def __init__(self, p: Pair) -> None:
        self.p = p
        ike_id = p.initiate("a")
        [m1] = p.pending("a")
        p.a.delete_ike(ike_id, p.now)  # a only lends its request
        p.drain()
        self.template = decode_message(m1.data)
        self.spi = 0x1000
        self.sent = 0

    def request(self) -> bytes:
        self.spi += 1
        t = self.template
        return encode_message(IkeMessage(self.spi.to_bytes(8, "big"), t.spi_r, t.exchange,
                                         t.message_id, False, True, list(t.payloads)))

    def send(self, source: str, now: float) -> list[bytes]:
        """One request from ``source``; if it is answered with a COOKIE, the
        same request again with it. Returns the responder's answers."""
        engine = self.p.b
        data = self.request()
        engine.receive_datagram(data, (source, 500), 500, now)
        answers = [o.data for o in engine.datagrams_to_send()]
        if answers and _notifies(answers[0]) == [NotifyType.COOKIE]:
            cookie = decode_message(answers[0]).payloads[0]
            assert isinstance(cookie, NotifyPayload)
            msg = decode_message(data)
            msg.payloads.insert(0, cookie)
            engine.receive_datagram(encode_message(msg), (source, 500), 500, now)
            answers = [o.data for o in engine.datagrams_to_send()]
        self.sent += 1
        return answers


def _notifies(data: bytes) -> list[NotifyType]:
    return [p.notify_type for p in decode_message(data).payloads if isinstance(p, NotifyPayload)]


def _source(i: int) -> str:
    return f"198.51.{i // 250}.{i % 250 + 1}"


def _legit_handshake(p: Pair) -> None:
    p.clear_events()
    p.initiate("a")
    p.flush()
    assert p.of("a", IkeSaEstablished) and p.of("b", IkeSaEstablished)


# -- half-open SAs ------------------------------------------------------------------------


def test_cap_reached_no_new_state_then_recovers() -> None:
    cap = 20
    p = pair(LimitSettings(half_open_max=cap, init_rate_per_s=1000.0, init_burst=1000.0),
             cookie_threshold=5)
    flood = Flood(p)
    answered = [flood.send(_source(i), p.now) for i in range(50)]
    assert p.b.half_open_count() == cap
    assert len(p.b.by_id) == cap  # the refused ones made no IKE SA at all
    assert p.b.drops[DROP_HALF_OPEN_CAP] == 50 - cap
    # Every refused request (answered its COOKIE) got no answer: no SA, no DH.
    assert sum(1 for a in answered if not a) == 50 - cap
    # Above the threshold, a request without a cookie makes no state either.
    p.b.receive_datagram(flood.request(), (_source(99), 500), 500, p.now)
    [answer] = p.b.datagrams_to_send()
    assert _notifies(answer.data) == [NotifyType.COOKIE]
    assert len(p.b.by_id) == cap
    # Half-open SAs made under pressure expire quickly (RFC 8019 §4): only
    # the 5 made below the threshold are left after 5 s ...
    p.now += LOOSE.half_open_timeout_pressure_s + 0.1
    p.b.handle_timer(p.now)
    assert p.b.half_open_count() == 5
    p.now += p.b.ctx.options.half_open_timeout_s
    p.b.handle_timer(p.now)
    assert p.b.half_open_count() == 0 and not p.b.by_id
    assert p.b.limits.half_open_bytes == 0
    # ... and a real initiator gets through again.
    _legit_handshake(p)


def test_memory_cap() -> None:
    settings = LimitSettings(half_open_memory_max=10 * 4096, half_open_sa_bytes=4096,
                             init_rate_per_s=1000.0, init_burst=1000.0)
    p = pair(settings, cookie_threshold=1000)
    flood = Flood(p)
    for i in range(30):
        flood.send(_source(i), p.now)
    # each SA is estimated at 4096 bytes plus its two messages: fewer than 10 fit
    held = p.b.half_open_count()
    assert 0 < held < 10
    assert p.b.drops[DROP_HALF_OPEN_MEMORY] == 30 - held
    assert p.b.limits.half_open_bytes <= settings.half_open_memory_max


def test_half_open_timeout_shorter_under_pressure() -> None:
    p = pair(LOOSE, cookie_threshold=3)
    flood = Flood(p)
    for i in range(6):
        flood.send(_source(i), p.now)
    deadlines = sorted(sa.half_open_deadline or 0.0 for sa in p.b.by_id.values())
    configured = p.b.ctx.options.half_open_timeout_s
    assert deadlines[:3] == [LOOSE.half_open_timeout_pressure_s] * 3
    assert deadlines[3:] == [configured] * 3


def test_established_sa_leaves_the_half_open_budget() -> None:
    p = pair(LOOSE)
    p.establish("a")
    assert p.b.half_open_count() == 0 and p.b.limits.half_open_bytes == 0


# -- cookie secret rotation -----------------------------------------------------------------


def _cookie_for(p: Pair, data: bytes, now: float) -> bytes:
    p.b.receive_datagram(data, ("198.51.100.9", 500), 500, now)
    [answer] = p.b.datagrams_to_send()
    cookie = decode_message(answer.data).payloads[0]
    assert isinstance(cookie, NotifyPayload) and cookie.notify_type == NotifyType.COOKIE
    return cookie.data


def _with_cookie(data: bytes, cookie: bytes) -> bytes:
    msg = decode_message(data)
    msg.payloads.insert(0, NotifyPayload(NotifyType.COOKIE, data=cookie))
    return encode_message(msg)


def _answer_to(p: Pair, data: bytes, now: float) -> list[NotifyType]:
    p.b.receive_datagram(data, ("198.51.100.9", 500), 500, now)
    [answer] = p.b.datagrams_to_send()
    return _notifies(answer.data)


def test_cookie_of_previous_secret_accepted() -> None:
    period = LOOSE.cookie_lifetime_s
    p = pair(LOOSE, cookie_threshold=0)
    flood = Flood(p)
    data = flood.request()
    cookie = _cookie_for(p, data, 0.0)
    # one rotation later, the cookie's secret is the previous one: accepted
    assert _cookie_for(p, data, period + 1) != cookie  # the secret did change
    assert NotifyType.COOKIE not in _answer_to(p, _with_cookie(data, cookie), period + 1)
    assert p.b.half_open_count() == 1


def test_cookie_two_rotations_old_refused() -> None:
    period = LOOSE.cookie_lifetime_s
    p = pair(LOOSE, cookie_threshold=0)
    flood = Flood(p)
    data = flood.request()
    cookie = _cookie_for(p, data, 0.0)
    _cookie_for(p, flood.request(), period + 1)       # rotation 1
    _cookie_for(p, flood.request(), 2 * period + 2)   # rotation 2
    assert _answer_to(p, _with_cookie(data, cookie), 2 * period + 2) == [NotifyType.COOKIE]
    assert p.b.half_open_count() == 0


def test_cookie_stale_after_idle_periods() -> None:
    # Nobody asked for a cookie for two periods: the rotation catches up twice.
    period = LOOSE.cookie_lifetime_s
    p = pair(LOOSE, cookie_threshold=0)
    flood = Flood(p)
    data = flood.request()
    cookie = _cookie_for(p, data, 0.0)
    assert _answer_to(p, _with_cookie(data, cookie), 3 * period) == [NotifyType.COOKIE]
    assert p.b.half_open_count() == 0


# -- per-source rate ---------------------------------------------------------------------------


def test_per_source_bucket() -> None:
    p = pair(LimitSettings(init_rate_per_s=1.0, init_burst=3.0), cookie_threshold=0)
    flood = Flood(p)
    for _ in range(10):
        flood.send("198.51.100.1", p.now)
    assert p.b.half_open_count() == 3
    assert p.b.drops[DROP_INIT_RATE] == 7
    # another source has its own bucket
    flood.send("198.51.100.2", p.now)
    assert p.b.half_open_count() == 4
    # the bucket refills at its rate
    for _ in range(5):
        flood.send("198.51.100.1", p.now + 2.0)
    assert p.b.half_open_count() == 6
    assert p.b.drops[DROP_INIT_RATE] == 7 + 3


def test_completed_handshakes_give_their_token_back() -> None:
    # Under pressure, from one address: a peer that completes IKE_AUTH each
    # time is not throttled; a flood source that never does is.
    p = pair(LimitSettings(init_rate_per_s=0.001, init_burst=1.0), cookie_threshold=0)
    for _ in range(5):
        _legit_handshake(p)  # each one is established on both sides
    assert not p.b.drops
    flood = Flood(p)
    for _ in range(5):
        flood.send("198.18.0.1", p.now)  # the same address as the peer, A_ADDR
    assert p.b.half_open_count() == 1
    assert p.b.drops[DROP_INIT_RATE] == 4


def test_no_per_source_rate_below_the_cookie_threshold() -> None:
    # A peer bringing up many IKE SAs at once is not an attack (RFC 8019 §4
    # applies the limits when under attack).
    p = pair(LimitSettings(init_rate_per_s=1.0, init_burst=3.0), cookie_threshold=20)
    flood = Flood(p)
    for _ in range(10):
        flood.send("198.51.100.1", p.now)
    assert p.b.half_open_count() == 10
    assert not p.b.drops


def test_source_table_bounded_lru() -> None:
    table = BucketTable(rate=1.0, burst=1.0, size=3)
    assert table.take("x", 0.0)
    assert not table.take("x", 0.0)
    for key in ("a", "b", "c"):  # "x" is the least recently used: forgotten
        table.take(key, 0.0)
    assert len(table) == 3
    assert table.take("x", 0.0)  # came back with a full bucket
    assert not table.take("c", 0.0)  # recently used: still empty


# -- children per IKE SA -------------------------------------------------------------------------


def test_3000_create_child_sa_only_the_limit_accepted() -> None:
    p = make_pair(extra_children=False)
    p.establish("a")
    a_sa = p.established_sa("a")
    requests = 3000
    for _ in range(requests):
        p.a.create_child(a_sa.ike_id, "net", p.now)
    p.flush(rounds=10 * requests)
    b_sa = p.established_sa("b")
    assert len(b_sa.children) == CHILD_SA_MAX_PER_IKE_SA
    accepted = CHILD_SA_MAX_PER_IKE_SA - 1  # the first came with IKE_AUTH
    assert len(p.of("b", ChildSaInstalled)) == CHILD_SA_MAX_PER_IKE_SA
    refused = requests - accepted
    assert p.b.drops[DROP_NO_ADDITIONAL_SAS] == refused
    failed = p.of("a", ChildSaFailed)
    assert len(failed) == refused
    assert all("NO_ADDITIONAL_SAS" in f.reason for f in failed)
    # the IKE SA still works both ways
    assert a_sa.state is IkeState.ESTABLISHED and b_sa.state is IkeState.ESTABLISHED
    assert p.dpd_ok("a") and p.dpd_ok("b")


# -- retransmitted answers ------------------------------------------------------------------------


def test_replayed_request_answered_at_most_n_per_second() -> None:
    settings = LimitSettings(retransmit_rate_per_s=2.0, retransmit_burst=4.0)
    p = pair(settings)
    p.establish("a")
    ike_id = p.established_sa("a").ike_id
    p.a.dpd(ike_id, p.now)
    [request] = p.pending("a")
    p.deliver("a", request.data, request)
    [answer] = p.pending("b")
    p.deliver("b", answer.data, answer)
    p.drain()
    assert decode_header(request.data).exchange == ExchangeType.INFORMATIONAL
    # The same bytes replayed 100 times within one instant, from spoofed sources.
    for i in range(100):
        p.b.receive_datagram(request.data, (_source(i), 4500), 4500, p.now)
    assert len(p.b.datagrams_to_send()) == 4
    assert p.b.drops[DROP_RETRANSMIT_RATE] == 96
    # One second later: two more (the rate), not a burst of 100.
    for i in range(100):
        p.b.receive_datagram(request.data, (_source(i), 4500), 4500, p.now + 1.0)
    assert len(p.b.datagrams_to_send()) == 2
    # The IKE SA is unharmed.
    assert p.dpd_ok("a", ike_id) and p.dpd_ok("b")


def test_replayed_ike_sa_init_answered_at_most_n_per_second() -> None:
    settings = LimitSettings(retransmit_rate_per_s=2.0, retransmit_burst=4.0)
    p = pair(settings)
    p.initiate("a")
    [m1] = p.pending("a")
    for _ in range(50):
        p.deliver("a", m1.data, m1)
    assert p.b.half_open_count() == 1
    assert len(p.b.datagrams_to_send()) == 1 + 4  # the answer, then 4 retransmits
    assert p.b.drops[DROP_RETRANSMIT_RATE] == 50 - 1 - 4


def test_limits_are_pure() -> None:
    limits = EngineLimits(LimitSettings(half_open_max=1))
    assert limits.admit_half_open("192.0.2.1", 0, 0.0) is None
    assert limits.admit_half_open("192.0.2.1", 1, 0.0) == DROP_HALF_OPEN_CAP
    assert limits.cookie_rotations_due(0.0) == 0
    assert limits.cookie_rotations_due(LOOSE.cookie_lifetime_s) == 1
    assert limits.cookie_rotations_due(10 * LOOSE.cookie_lifetime_s) == 2
    limits.half_open_added(7, 600)
    assert limits.half_open_bytes == LimitSettings().half_open_sa_bytes + 600
    limits.ike_sa_gone(7)
    assert limits.half_open_bytes == 0


# -- the stateless fast path (common/ike/cookies.py) ----------------------------------------


def test_cookie_answer_without_decoding_is_the_full_answer() -> None:
    p = pair(LOOSE, cookie_threshold=0)
    flood = Flood(p)
    data = flood.request()
    peek = peek_init(data)
    full = decode_message(data)
    assert peek is not None and peek.cookie is None
    nonce = full.get(NoncePayload)
    assert nonce is not None and peek.spi_i == full.spi_i and peek.nonce == nonce.data
    cookie = p.b.cookies.make(peek.nonce, bytes([198, 51, 100, 9]), peek.spi_i)
    slow = error_answer(peek.spi_i, ExchangeType.IKE_SA_INIT, 0,
                        Refused(NotifyType.COOKIE, data=cookie))
    assert cookie_answer(peek.spi_i, cookie) == slow
    again = peek_init(_with_cookie(data, cookie))
    assert again is not None and again.cookie == cookie and again.nonce == peek.nonce


def test_packed_ip_is_ipaddress_packed() -> None:
    import ipaddress

    for a in ("198.51.100.9", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::ffff:1.2.3.4"):
        assert packed_ip(a) == ipaddress.ip_address(a).packed
    for bad in ("256.1.1.1", "1.2.3", "01.2.3.4", "1.2.3.-4", "1.2.3.4x"):
        with pytest.raises(ValueError):
            packed_ip(bad)


def test_peek_refuses_broken_chains() -> None:
    p = pair(LOOSE)
    data = Flood(p).request()
    assert peek_init(data[:-1]) is None  # the last payload overruns
    assert peek_init(data + b"\0" * 4) is None  # bytes after the chain
    bad = bytearray(data)
    bad[28 + 2:28 + 4] = (1).to_bytes(2, "big")  # a payload length below its header
    assert peek_init(bytes(bad)) is None


def test_rate_refused_before_decoding_counts_the_same() -> None:
    # Above the threshold, with the source's bucket empty, a request with a
    # valid cookie is dropped before the full decode: counted all the same.
    p = pair(LimitSettings(init_rate_per_s=0.001, init_burst=1.0), cookie_threshold=0)
    flood = Flood(p)
    assert flood.send("198.51.100.1", p.now)  # the one token: a half-open SA
    for _ in range(5):
        assert flood.send("198.51.100.1", p.now) == []
    assert p.b.half_open_count() == 1
    assert p.b.drops[DROP_INIT_RATE] == 5


# -- live: a flood against a running cluster in namespaces ---------------------------------


@pytest.mark.netns
@pytest.mark.slow
def test_live_flood_keeps_half_open_bounded_and_a_peer_gets_through(tmp_path: Path) -> None:
    """bench/flood.py against ``ipsec-cluster run`` (3 members) from 250
    source addresses answering COOKIEs, 12 s at 1,000 IKE_SA_INIT/s."""
    from tests.lab.netns import lab_unavailable_reason

    reason = lab_unavailable_reason(need_charon=False)
    if reason is not None:
        pytest.skip(reason)
    from bench.flood import FloodLab, run_flood

    lab = FloodLab(tmp_path, members=3, n_sources=250)
    try:
        run = run_flood(lab, rate=1000.0, seconds=12.0, probe_every_s=4.0,
                        probe_timeout_s=15.0)
    finally:
        lab.close()
    assert run.generator["cookies_answered"] > 1000, run.generator  # the flood got COOKIEs
    assert run.samples and run.peak_half_open, run
    assert all(n <= HALF_OPEN_MAX for n in run.peak_half_open.values()), run.peak_half_open
    assert max(run.peak_half_open.values()) > 0  # ... and did make half-open SAs
    assert run.drops.get(f"ike_{DROP_INIT_RATE}", 0) > 0, run.drops  # the per-source rate
    assert any(h is not None for h in run.handshakes), run.handshakes
