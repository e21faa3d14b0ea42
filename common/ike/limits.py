"""Resource bounds of one IKE engine against floods (RFC 7296 §2.1, §2.6;
RFC 8019 "Protecting IKE implementations from DoS").

Rules of this file:
- Pure: no clock, no randomness; every method takes ``now`` (seconds, any
  monotonic origin) and the engine decides what to do with the verdict.
- Every refusal has a stable snake_case reason; the engine counts it in its
  ``drops`` under that name.
- Every table here is bounded: by count (half-open SAs, sources, IKE SAs with
  a retransmit bucket), never by what a peer sends.

The bounds, in the order an IKE_SA_INIT meets them:

1. Above ``cookie_threshold`` half-open SAs (IkeOptions) every IKE_SA_INIT
   must carry a valid COOKIE (RFC 7296 §2.6): the answer costs no state.
2. Above that threshold too, a request that would create state draws a token
   from its source address's bucket (RFC 8019 §4: rate limits per source);
   an empty bucket drops it.
3. At ``HALF_OPEN_MAX`` half-open SAs, or at ``HALF_OPEN_MEMORY_MAX_BYTES`` of
   their estimated memory, a new one is refused before any state is made.
4. Under pressure (above the cookie threshold) a new half-open SA lives
   ``HALF_OPEN_TIMEOUT_PRESSURE_S`` instead of the configured timeout.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

#: hard cap of half-open responder IKE SAs per engine (one cluster member)
HALF_OPEN_MAX = 2000
#: estimated memory of one half-open SA beyond its two IKE_SA_INIT messages:
#: the IkeSa object and its dicts, keys, nonces, cipher contexts, the index
#: entries. Measured on 10,000 half-open SAs (aes128gcm16-prfsha256-ecp256,
#: messages of ~300 bytes each): the process RSS grows by ~10.1 KB per SA
#: (tracemalloc sees ~5.3 KB of Python objects; the rest is OpenSSL and
#: allocator overhead).
HALF_OPEN_SA_BYTES = 9 * 1024
#: cap of the estimated memory of all half-open SAs per engine (~2,000 SAs
#: with small messages; fewer with big KE payloads or many proposals)
HALF_OPEN_MEMORY_MAX_BYTES = 20 * 1024 * 1024
#: how long a half-open SA made under pressure waits for IKE_AUTH (RFC 8019
#: §4: shorten the wait while attacked; a real initiator sends IKE_AUTH
#: within a round trip)
HALF_OPEN_TIMEOUT_PRESSURE_S = 5.0

#: state-creating IKE_SA_INITs per source address: sustained rate and burst
#: (RFC 8019 §4). A real initiator needs one per IKE SA; a restarting
#: gateway with many connections to us gets a burst.
INIT_PER_SOURCE_RATE_PER_S = 0.1
INIT_PER_SOURCE_BURST = 2.0
#: source addresses with a bucket; the least recently seen is forgotten
#: first (it comes back with a full bucket, which only helps an attacker with
#: more addresses than this, and the caps above still hold)
SOURCE_TABLE_MAX = 4096

#: RFC 7296 §2.6: the cookie secret is changed periodically; a cookie made
#: with the previous secret stays valid for one more period
COOKIE_SECRET_LIFETIME_S = 60.0

#: child SAs per IKE SA (RFC 7296 §3.10.1 NO_ADDITIONAL_SAS beyond it); the
#: old child of a rekey counts until it is deleted
CHILD_SA_MAX_PER_IKE_SA = 64

#: answers to retransmitted requests per IKE SA (RFC 7296 §2.1: a retransmit
#: gets the cached response): rate and burst. A real peer retransmits with
#: exponential back-off (about one a second at most); a faster stream is a
#: replay, possibly with a spoofed source, and answering it 1:1 would make
#: us a reflector.
RETRANSMIT_ANSWERS_PER_S = 2.0
RETRANSMIT_ANSWERS_BURST = 4.0

#: drop reasons (the engine's ``drops`` keys)
DROP_HALF_OPEN_CAP = "half_open_cap"
DROP_HALF_OPEN_MEMORY = "half_open_memory"
DROP_INIT_RATE = "init_rate_per_source"
DROP_RETRANSMIT_RATE = "retransmit_rate"
DROP_NO_ADDITIONAL_SAS = "no_additional_sas"


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; starts full."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class BucketTable:
    """A token bucket per key, at most ``size`` of them, least recently used
    evicted first."""

    __slots__ = ("_buckets", "burst", "rate", "size")

    def __init__(self, rate: float, burst: float, size: int) -> None:
        self.rate, self.burst, self.size = rate, burst, size
        self._buckets: OrderedDict[object, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: object, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def refund(self, key: object) -> None:
        """Give back a token taken for ``key`` (a bucket gone meanwhile stays gone)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(bucket.burst, bucket.tokens + 1.0)

    def has_token(self, key: object, now: float) -> bool:
        """Would ``take`` succeed? (Nothing changes; an unknown key has a full
        bucket.)"""
        bucket = self._buckets.get(key)
        if bucket is None:
            return True
        return min(bucket.burst, bucket.tokens + max(0.0, now - bucket.stamp) * bucket.rate) >= 1.0

    def forget(self, key: object) -> None:
        self._buckets.pop(key, None)


@dataclass(slots=True)
class LimitSettings:
    """The bounds above; tests shrink them."""

    half_open_max: int = HALF_OPEN_MAX
    half_open_memory_max: int = HALF_OPEN_MEMORY_MAX_BYTES
    half_open_sa_bytes: int = HALF_OPEN_SA_BYTES
    half_open_timeout_pressure_s: float = HALF_OPEN_TIMEOUT_PRESSURE_S
    init_rate_per_s: float = INIT_PER_SOURCE_RATE_PER_S
    init_burst: float = INIT_PER_SOURCE_BURST
    source_table_max: int = SOURCE_TABLE_MAX
    cookie_lifetime_s: float = COOKIE_SECRET_LIFETIME_S
    retransmit_rate_per_s: float = RETRANSMIT_ANSWERS_PER_S
    retransmit_burst: float = RETRANSMIT_ANSWERS_BURST


class EngineLimits:
    """The engine's bookkeeping for the bounds: half-open memory, per-source
    and per-IKE-SA buckets, the cookie secret's schedule."""

    __slots__ = ("_half_open", "_next_rotation", "_retransmits", "_sources",
                 "half_open_bytes", "settings")

    def __init__(self, settings: LimitSettings | None = None) -> None:
        s = self.settings = settings or LimitSettings()
        self._sources = BucketTable(s.init_rate_per_s, s.init_burst, s.source_table_max)
        # one entry per IKE SA that had a retransmit answered, removed with it
        self._retransmits = BucketTable(s.retransmit_rate_per_s, s.retransmit_burst,
                                        1 << 62)
        #: half-open IKE SA id -> (estimated bytes, the source charged a token)
        self._half_open: dict[int, tuple[int, str | None]] = {}
        self.half_open_bytes = 0
        self._next_rotation: float | None = None

    # -- half-open SAs -----------------------------------------------------------

    def admit_half_open(self, source: str, count: int, now: float,
                        message_bytes: int = 0, *, pressure: bool = True) -> str | None:
        """May an IKE_SA_INIT from ``source`` create a half-open SA, with
        ``count`` held? ``message_bytes``: what its two IKE_SA_INIT messages
        will take (the answer is about as long as the request). The source's
        rate counts under ``pressure`` only (above the cookie threshold: a
        peer bringing up many IKE SAs at once is not an attack). None, or the
        drop reason. Caps first: a refused request spends no token."""
        refused = self._caps(count, message_bytes)
        if refused is None and pressure and not self._sources.take(source, now):
            return DROP_INIT_RATE
        return refused

    def shed_half_open(self, source: str, count: int, now: float,
                       message_bytes: int = 0) -> str | None:
        """Under pressure, before the request is even decoded: the reason
        ``admit_half_open`` would refuse it, or None (then it decides)."""
        refused = self._caps(count, message_bytes)
        if refused is None and not self._sources.has_token(source, now):
            return DROP_INIT_RATE
        return refused

    def _caps(self, count: int, message_bytes: int) -> str | None:
        s = self.settings
        if count >= s.half_open_max:
            return DROP_HALF_OPEN_CAP
        if self.half_open_bytes + s.half_open_sa_bytes + message_bytes > s.half_open_memory_max:
            return DROP_HALF_OPEN_MEMORY
        return None

    def half_open_added(self, ike_id: int, message_bytes: int,
                        charged: str | None = None) -> None:
        """A half-open SA was made; ``charged``: the source whose token it took."""
        size = self.settings.half_open_sa_bytes + message_bytes
        self.half_open_bytes += size - self._half_open.get(ike_id, (0, None))[0]
        self._half_open[ike_id] = (size, charged)

    def half_open_gone(self, ike_id: int, *, completed: bool = False) -> None:
        """The SA is no longer half-open. ``completed`` (IKE_AUTH done): its
        source gets its token back, so a peer that finishes its handshakes
        (a gateway bringing up many IKE SAs) is never throttled; only half-open
        SAs left to expire, a flood's, use up the source's rate."""
        size, source = self._half_open.pop(ike_id, (0, None))
        self.half_open_bytes -= size
        if completed and source is not None:
            self._sources.refund(source)

    def half_open_timeout(self, configured_s: float, count: int, threshold: int) -> float:
        """RFC 8019 §4: under pressure, half-open SAs expire sooner."""
        if count >= threshold:
            return min(configured_s, self.settings.half_open_timeout_pressure_s)
        return configured_s

    # -- cookies -------------------------------------------------------------------

    def cookie_rotations_due(self, now: float) -> int:
        """How many times to rotate the cookie secret now (0, 1 or 2): after
        two idle periods, the previous secret is stale too."""
        period = self.settings.cookie_lifetime_s
        if self._next_rotation is None:
            self._next_rotation = now + period
            return 0
        if now < self._next_rotation:
            return 0
        missed = 1 if now < self._next_rotation + period else 2
        self._next_rotation = now + period
        return missed

    # -- retransmits -----------------------------------------------------------------

    def answer_retransmit(self, ike_id: int, now: float) -> bool:
        """May the cached response of IKE SA ``ike_id`` be sent once more?"""
        return self._retransmits.take(ike_id, now)

    def ike_sa_gone(self, ike_id: int) -> None:
        self._retransmits.forget(ike_id)
        self.half_open_gone(ike_id)
