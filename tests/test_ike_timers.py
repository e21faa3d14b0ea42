"""The engine's timer heap (RFC 7296 §2.1 retransmits, §2.4 DPD, rekeys):
get_timer() is the earliest deadline of any IKE SA, and a call touches the
deadlines only of the SAs it worked on, not of every SA held."""

from __future__ import annotations

import dataclasses

import pytest

from common.cluster.snapshot import restore, snapshot
from common.ike.events import DpdSucceeded
from common.ike.sa import IkeSa
from tests.ike_pair import Pair, make_pair


def _filled(n: int, dpd_delay: float = 10.0) -> Pair:
    """An established pair, plus ``n`` - 1 more IKE SAs on each side (copies
    adopted under new SPIs: enough for timers, never used on the wire)."""
    p = make_pair(extra_children=False, dpd_delay=dpd_delay)
    p.establish("a")
    for side in ("a", "b"):
        e = p.engine(side)
        base = snapshot(p.sa(side), p.now)
        for i in range(n - 1):
            spi = (i + 1).to_bytes(4, "big") * 2
            now = p.now + i * 0.01
            copy = dataclasses.replace(base, spi_i=spi, spi_r=spi[::-1], children=())
            e.adopt(restore(e, copy, now), now)
    p.drain()
    return p


def _true_min(p: Pair, side: str) -> float | None:
    ds = [d for sa in p.engine(side).by_id.values() if (d := sa.next_deadline()) is not None]
    return min(ds) if ds else None


def test_get_timer_is_the_earliest_deadline() -> None:
    p = _filled(30)
    real = next(sa for sa in p.a.by_id.values() if sa.children)
    for step in range(12):
        for side in ("a", "b"):
            assert p.engine(side).get_timer() == _true_min(p, side)
        if step % 3 == 0:
            p.a.dpd(real.ike_id, p.now)  # INFORMATIONAL SK {} --> <-- SK {}
        p.advance(1.7)
    # DPD ran on every idle SA when its time came: nothing was missed.
    assert len(p.of("a", DpdSucceeded)) >= 30


def test_esp_activity_only_postpones() -> None:
    p = _filled(3)
    sa = next(s for s in p.a.by_id.values() if s.children)
    for s in p.a.by_id.values():
        p.a.note_activity(s.ike_id, p.now + 5.0)
    # Early entries may remain; the timer is never later than the truth.
    t, truth = p.a.get_timer(), _true_min(p, "a")
    assert t is not None and truth is not None and t <= truth
    for _ in range(len(p.a.by_id)):
        if (t := p.a.get_timer()) == truth:
            break
        p.a.handle_timer(t)  # type: ignore[arg-type]  # nothing due: recomputed
    assert p.a.get_timer() == truth == sa.last_heard + 10.0
    assert not p.pending("a")


def test_a_dpd_exchange_does_not_scan_every_sa(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _filled(300, dpd_delay=3600.0)
    real = next(sa for sa in p.a.by_id.values() if sa.children)
    real_b = next(sa for sa in p.b.by_id.values() if sa.children)
    calls: list[int] = []
    inner = IkeSa.next_deadline

    def counting(self: IkeSa) -> float | None:
        calls.append(self.ike_id)
        return inner(self)

    monkeypatch.setattr(IkeSa, "next_deadline", counting)
    p.a.dpd(real.ike_id, p.now)
    p.a.get_timer()
    # INFORMATIONAL SK {} -->   <-- SK {}
    p.step("a")
    p.b.get_timer()
    p.step("b")
    p.a.get_timer()
    p.a.handle_timer(p.now)  # nothing due
    assert len(p.of("a", DpdSucceeded)) == 1
    # Only the two SAs of the exchange had their deadlines recomputed.
    assert len(calls) <= 4 and set(calls) <= {real.ike_id, real_b.ike_id}
