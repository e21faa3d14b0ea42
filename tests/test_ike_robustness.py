"""Hostile and broken input to the IKE engines: every truncation of every
message, and Hypothesis over (state, message) pairs (h11 ``test_io.py``, h2
``test_state_machines.py``). Nothing may raise out of the engine, and what was
established must stay usable."""

from __future__ import annotations

import functools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import IntegrityError, LocalProtocolError, MalformedMessage
from common.ike.context import ChildState, IkeState
from common.ike.message import decode_header, decode_message
from common.ike.payloads import PayloadType
from tests.ike_pair import Pair, assert_children_agree, make_pair

_LENGTH = struct.Struct("!I")
LENGTH_OFFSET = 24  # RFC 7296 §3.1: Length is the last header field


def full_session() -> Pair:
    """Every exchange once, both directions: the corpus of captured messages."""
    p = make_pair(esp="aes128gcm16")
    p.establish("a", children=["net"])
    p.a.create_child(p.ike_id("a"), "ctr", p.now)
    p.flush()
    for side in ("a", "b"):
        p.engine(side).rekey_child(p.ike_id(side), p.child_named(side, "net").spi_in, p.now)
        p.flush()
        assert p.dpd_ok(side)
        p.engine(side).mid_sync(p.ike_id(side), p.now)
        p.flush()
    p.b.rekey_ike(p.ike_id("b"), p.now)
    p.flush()
    p.a.delete_child(p.ike_id("a"), p.child_named("a", "ctr").spi_in, p.now)
    p.flush()
    return p


@functools.cache
def corpus() -> tuple[tuple[str, bytes], ...]:
    return tuple((s, o.data) for s, o in full_session().wire)


def with_length(data: bytes) -> bytes:
    """``data`` with the header Length fixed up, so parsing goes past the header."""
    if len(data) < LENGTH_OFFSET + 4:
        return data
    return data[:LENGTH_OFFSET] + _LENGTH.pack(len(data)) + data[LENGTH_OFFSET + 4:]


def test_corpus_covers_every_exchange() -> None:
    kinds = {decode_header(d).exchange.name for _, d in corpus()}
    assert kinds == {"IKE_SA_INIT", "IKE_AUTH", "CREATE_CHILD_SA", "INFORMATIONAL"}
    assert len(corpus()) >= 20


def test_codec_every_truncation_is_malformed() -> None:
    """Cut anywhere: the header Length no longer matches -> MalformedMessage.
    With Length fixed up: still only MalformedMessage (or IntegrityError once
    an SK payload is reached, RFC 7296 §2.21.2)."""
    session = full_session()
    keys = {}
    for e in (session.a, session.b):
        for sa in list(e.by_id.values()):
            keys[sa.spi_i] = sa
    for _, data in corpus():
        header = decode_header(data)
        for n in range(len(data)):
            try:
                decode_message(data[:n])
                raise AssertionError(f"truncation to {n} parsed")
            except MalformedMessage:
                pass
            patched = with_length(data[:n])
            if len(patched) < 28:
                continue
            try:
                decode_message(patched, _sk_for(header.next_payload, data))
            except (MalformedMessage, IntegrityError):
                pass
            except Exception as exc:  # pragma: no cover - the failure we look for
                raise AssertionError(f"{type(exc).__name__} at {n}: {exc}") from exc


def _sk_for(first: PayloadType, data: bytes) -> object:
    """A cipher of the right shape for SK messages (keys do not matter: a cut
    message never authenticates); None for cleartext ones."""
    if first != PayloadType.SK:
        return None
    return _any_sk()


@functools.cache
def _any_sk() -> object:
    p = make_pair(extra_children=False)
    p.establish("a")
    return p.sa("b").sk_in


def test_engine_survives_every_truncation() -> None:
    p = make_pair()
    p.establish("a")
    before = {s: (p.sa(s).spi_i, p.sa(s).spi_r) for s in ("a", "b")}
    fed = 0
    for sender, data in corpus():
        for n in range(len(data)):
            for cut in (data[:n], with_length(data[:n])):
                p.deliver(sender, cut)
                fed += 1
    p.drain()
    # Every raw cut was counted as malformed by the receiving engine.
    raw = sum(len(d) for _, d in corpus())
    assert p.a.drops["malformed"] + p.b.drops["malformed"] >= raw
    total = sum(e.drops.total() for e in (p.a, p.b)) + sum(
        sa.counters["dropped"] for e in (p.a, p.b) for sa in e.by_id.values())
    assert total > 0 and fed > raw
    # Answers (e.g. half-open SAs for cut IKE_SA_INIT requests that still
    # parse) go nowhere harmful; the established pair is untouched.
    p.flush()
    for s in ("a", "b"):
        assert (p.established_sa(s).spi_i, p.established_sa(s).spi_r) == before[s]
    assert_children_agree(p)
    assert p.dpd_ok("a") and p.dpd_ok("b")


# -- Hypothesis: random interleavings of actions, replays and mutations -------------

OPS = ["rekey_child", "rekey_ike", "dpd", "delete_child", "create_child", "mid_sync",
       "flush", "advance", "replay", "replay_mutated", "drop_next", "deliver_one"]


def _do(p: Pair, op: str, side: str, n: int, seen: list[tuple[str, bytes]]) -> None:
    e = p.engine(side)
    sas = [sa for sa in e.by_id.values() if sa.state is IkeState.ESTABLISHED]
    sa = sas[n % len(sas)] if sas else None
    try:
        if op == "rekey_child" and sa is not None and sa.children:
            e.rekey_child(sa.ike_id, sorted(sa.children)[n % len(sa.children)], p.now)
        elif op == "delete_child" and sa is not None and sa.children:
            e.delete_child(sa.ike_id, sorted(sa.children)[n % len(sa.children)], p.now)
        elif op == "rekey_ike" and sa is not None:
            e.rekey_ike(sa.ike_id, p.now)
        elif op == "dpd" and sa is not None:
            e.dpd(sa.ike_id, p.now)
        elif op == "create_child" and sa is not None:
            e.create_child(sa.ike_id, "ctr" if n % 2 else "net", p.now)
        elif op == "mid_sync" and sa is not None:
            e.mid_sync(sa.ike_id, p.now, margin=n % 3)
    except LocalProtocolError:
        pass  # our own API misuse (e.g. an SA that just went away), not the peer's
    if op == "flush":
        p.flush()
    elif op == "advance":
        p.advance(float(n % 40))
    elif op in ("replay", "replay_mutated") and seen:
        sender, data = seen[n % len(seen)]
        if op == "replay_mutated":
            i = n % len(data)
            data = data[:i] + bytes([data[i] ^ (1 + n % 255)]) + data[i + 1:] \
                if n % 3 else with_length(data[: max(0, len(data) - 1 - n % 40)])
        p.deliver(sender, data)
    elif op == "drop_next":
        p.pending(side)
    elif op == "deliver_one":
        for o in p.pending(side):
            p.deliver(side, o.data, o)
    p.drain()
    seen.extend((s, o.data) for s, o in p.wire[len(seen):])


def _check_states(p: Pair) -> None:
    for e in (p.a, p.b):
        for sa in e.by_id.values():
            assert isinstance(sa.state, IkeState)
            for c in sa.children.values():
                assert isinstance(c.state, ChildState)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(OPS), st.sampled_from(["a", "b"]),
                                st.integers(0, 10_000)), max_size=25),
       ini=st.sampled_from(["a", "b"]))
def test_random_interleavings(steps: list[tuple[str, str, int]], ini: str) -> None:
    p = make_pair(dpd_delay=10.0)
    p.initiate(ini)
    seen: list[tuple[str, bytes]] = []
    for op, side, n in steps:
        _do(p, op, side, n, seen)
        _check_states(p)
    # Quiesce: deliver everything, let retransmits, DPD and half-open
    # timeouts run their course.
    p.drop = None
    p.advance(120.0)
    _check_states(p)
    ests = {s: [sa for sa in p.engine(s).by_id.values() if sa.established] for s in ("a", "b")}
    spis_a = {(sa.spi_i, sa.spi_r) for sa in ests["a"]}
    spis_b = {(sa.spi_i, sa.spi_r) for sa in ests["b"]}
    assert spis_a == spis_b, (spis_a, spis_b)
    for s in ("a", "b"):
        for sa in ests[s]:
            assert sa.state is IkeState.ESTABLISHED
            assert p.dpd_ok(s, sa.ike_id)
    if spis_a:
        assert_children_agree(p)
        assert all(c.state is ChildState.INSTALLED for s in ("a", "b")
                   for sa in ests[s] for c in sa.children.values())
