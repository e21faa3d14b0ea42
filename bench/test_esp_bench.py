"""ESP per-packet cost beside bare ``cryptography``, in one run (pytest-benchmark).

Run: .venv/bin/pytest bench -q   (only this file: .venv/bin/pytest bench/test_esp_bench.py)

Every timed call processes a batch of BATCH distinct packets (distinct nonces
for the bare AEAD too), so the per-call timer overhead vanishes and caches see
the same working set; results are divided by BATCH.  ``unprotect`` gets a fresh
replay window (outside the timed part) before each round, so replay never fires.
The last test prints the ratio table (protect+unprotect vs encrypt+decrypt) for
both implementations: ``c`` (common/esp/_esp_fast.c, the default when built) and
``python`` (the pure-Python reference, as IPSEC_CLUSTER_PURE_ESP=1 forces).

The bare baseline of a transform is the same cryptography done with bare
``cryptography`` calls on the same payload: AES-GCM (the historic baseline,
also used for AES-CTR), ChaCha20-Poly1305, and for AES-CBC + HMAC a CBC
encryptor fed a fresh IV per packet plus a copied keyed HMAC (decrypt: the
HMAC check, then ECB + XOR; see ``_cbc_hmac``).  No ESP framing, padding, sequence numbers
or replay window in the baselines.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hmac import HMAC

from bench.harness.packets import UDP, ipv4
from bench.harness.timing import best_us_per_packet
from common.esp import transforms as esp
from common.esp.replay import ReplayState
from common.esp.transforms import TRANSFORMS, InboundSA, OutboundSA

BATCH = 256
ROUNDS = 200
SIZES = (64, 1400)
SPI = 0x0A00_0001
IMPLS = ("c", "python")
RESULTS: dict[tuple[int, str], float] = {}   # (size, name) -> µs per packet


def use_impl(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAs built from now on use ``impl``; skip "c" when it is not built."""
    if impl == "c":
        compiled = esp._load_compiled()
        if compiled is None:
            pytest.skip("common.esp._esp_fast is not built (or IPSEC_CLUSTER_PURE_ESP=1)")
        monkeypatch.setattr(esp, "_compiled", compiled)
    else:
        monkeypatch.setattr(esp, "_compiled", None)


def inner_packet(size: int) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` bytes."""
    return ipv4("10.0.0.1", "10.0.0.2", UDP, os.urandom(size - 20), checksum=False)


def run(benchmark: pytest.FixtureRequest, size: int, name: str, fn: Callable[[], object],
        setup: Callable[[], None] | None = None) -> None:
    RESULTS[(size, name)] = best_us_per_packet(benchmark, fn, rounds=ROUNDS, per_call=BATCH,
                                               setup=setup)


def baseline(transform: str) -> str:
    """The bare-cryptography baseline a transform is compared with."""
    return "aes128gcm16" if TRANSFORMS[transform].cipher == "ctr" else transform


BASELINES = sorted({baseline(t) for t in TRANSFORMS})
_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
           "sha512": hashes.SHA512}


def _cbc_hmac(transform: str) -> tuple[Callable[[bytes, bytes], bytes],
                                      Callable[[bytes], bytes]]:
    """Bare AES-CBC + truncated HMAC: (seal(iv, data), open(iv | ct | icv)).

    The cheapest use of ``cryptography`` we found for CBC with a new IV per
    packet (a ``Cipher`` per packet costs tens of µs): one CBC encryptor kept
    open, its first block XOR'd with IV ^ the previous ciphertext block; ECB
    decryption of all blocks XOR'd with the shifted ciphertext."""
    t = TRANSFORMS[transform]
    aes = algorithms.AES(os.urandom(t.key_size))
    assert t.integ is not None
    mac = HMAC(os.urandom(t.integ_key_size), _HASHES[t.integ]())
    icv = t.icv_size
    cbc = Cipher(aes, modes.CBC(bytes(16))).encryptor()
    ecb = Cipher(aes, modes.ECB()).decryptor()
    last = [0]

    def seal(iv: bytes, data: bytes) -> bytes:
        first = int.from_bytes(data[:16]) ^ int.from_bytes(iv) ^ last[0]
        ct = cbc.update(first.to_bytes(16) + data[16:])
        last[0] = int.from_bytes(ct[-16:])
        body = iv + ct
        m = mac.copy()
        m.update(body)
        return body + m.finalize()[:icv]

    def open_(packet: bytes) -> bytes:
        m = mac.copy()
        m.update(packet[:-icv])
        if m.finalize()[:icv] != packet[-icv:]:
            raise ValueError("ICV")
        plain = int.from_bytes(ecb.update(packet[16:-icv])) ^ int.from_bytes(packet[:-icv - 16])
        return plain.to_bytes(len(packet) - 16 - icv)
    return seal, open_


@pytest.mark.parametrize("base", BASELINES)
@pytest.mark.parametrize("size", SIZES)
def test_bare_encrypt(benchmark: pytest.FixtureRequest, size: int, base: str) -> None:
    benchmark.group = f"esp-{size}B"
    t = TRANSFORMS[base]
    data, aad = inner_packet(size), os.urandom(8)
    if t.cipher == "cbc":
        data += bytes(-len(data) % 16)          # whole blocks, as ESP pads them
        seal, _ = _cbc_hmac(base)
        ivs = [os.urandom(16) for _ in range(BATCH)]

        def batch() -> None:
            for iv in ivs:
                seal(iv, data)
    else:
        aead = ChaCha20Poly1305(os.urandom(32)) if t.cipher == "chacha20poly1305" \
            else AESGCM(os.urandom(t.key_size))
        nonces = [os.urandom(12) for _ in range(BATCH)]
        encrypt = aead.encrypt

        def batch() -> None:
            for nonce in nonces:
                encrypt(nonce, data, aad)
    run(benchmark, size, f"bare-encrypt {base}", batch)


@pytest.mark.parametrize("base", BASELINES)
@pytest.mark.parametrize("size", SIZES)
def test_bare_decrypt(benchmark: pytest.FixtureRequest, size: int, base: str) -> None:
    benchmark.group = f"esp-{size}B"
    t = TRANSFORMS[base]
    data, aad = inner_packet(size), os.urandom(8)
    if t.cipher == "cbc":
        data += bytes(-len(data) % 16)
        seal, open_ = _cbc_hmac(base)
        packets = [seal(os.urandom(16), data) for _ in range(BATCH)]

        def batch() -> None:
            for packet in packets:
                open_(packet)
    else:
        aead = ChaCha20Poly1305(os.urandom(32)) if t.cipher == "chacha20poly1305" \
            else AESGCM(os.urandom(t.key_size))
        sealed = [(n, aead.encrypt(n, data, aad)) for n in (os.urandom(12)
                                                            for _ in range(BATCH))]
        decrypt = aead.decrypt

        def batch() -> None:
            for nonce, ct in sealed:
                decrypt(nonce, ct, aad)
    run(benchmark, size, f"bare-decrypt {base}", batch)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("size", SIZES)
def test_protect(benchmark: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, size: int,
                 transform: str, impl: str) -> None:
    benchmark.group = f"esp-{size}B"
    use_impl(impl, monkeypatch)
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    out = OutboundSA(SPI, transform, km, sender_id=1)
    data = inner_packet(size)
    protect = out.protect

    def batch() -> None:
        for _ in range(BATCH):
            protect(data)
    run(benchmark, size, f"protect {transform} {impl}", batch)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("size", SIZES)
def test_unprotect(benchmark: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, size: int,
                   transform: str, impl: str) -> None:
    benchmark.group = f"esp-{size}B"
    use_impl(impl, monkeypatch)
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    out = OutboundSA(SPI, transform, km, sender_id=1)
    data = inner_packet(size)
    packets = [out.protect(data) for _ in range(BATCH)]
    inb = InboundSA(SPI, transform, km, replay_window=1024)
    fresh = ReplayState(1024, 0, 1)
    unprotect = inb.unprotect

    def batch() -> None:
        for packet in packets:
            unprotect(packet)
    run(benchmark, size, f"unprotect {transform} {impl}", batch,
        setup=lambda: inb.import_window(fresh))


BATCH_TRANSFORMS = ("aes128gcm16", "chacha20poly1305", "aes128cbc-sha256")
BATCH_REPS = 15


def _best(fn: Callable[[], object]) -> float:
    """µs per packet of ``fn`` (BATCH packets per call): the best of BATCH_REPS."""
    best = float("inf")
    for _ in range(BATCH_REPS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / BATCH * 1e6


def test_batch_vs_per_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    """``seal_batch`` / ``open_batch`` (one C call per BATCH packets) against
    BATCH ``protect`` / ``unprotect`` calls, compiled path, same run; prints
    µs per packet and the per-packet/batch ratio."""
    use_impl("c", monkeypatch)
    lines = ["| transform | size | protect µs | seal_batch µs | x | unprotect µs "
             "| open_batch µs | x |", "|---|---|---|---|---|---|---|---|"]
    fresh = ReplayState(1024, 0, 1)
    for transform in BATCH_TRANSFORMS:
        km = os.urandom(TRANSFORMS[transform].keymat_size)
        for size in SIZES:
            data = [inner_packet(size)] * BATCH
            out = OutboundSA(SPI, transform, km, sender_id=1)
            packets = out.seal_batch(data)
            assert all(isinstance(p, bytes) for p in packets)
            inb = InboundSA(SPI, transform, km, replay_window=1024)
            protect, unprotect = out.protect, inb.unprotect

            def per_packet_out() -> None:
                for d in data:   # noqa: B023 - called within this iteration
                    protect(d)   # noqa: B023

            def per_packet_in() -> None:
                inb.import_window(fresh)   # noqa: B023
                for p in packets:          # noqa: B023
                    unprotect(p)           # type: ignore[arg-type]  # noqa: B023

            def batch_in() -> None:
                inb.import_window(fresh)          # noqa: B023
                inb.open_batch(packets)           # type: ignore[arg-type]  # noqa: B023

            p1 = _best(per_packet_out)
            p2 = _best(lambda: out.seal_batch(data))   # noqa: B023
            u1 = _best(per_packet_in)
            u2 = _best(batch_in)
            lines.append(f"| {transform} | {size} | {p1:.2f} | {p2:.2f} | {p1 / p2:.2f}x "
                         f"| {u1:.2f} | {u2:.2f} | {u1 / u2:.2f}x |")
    assert inb.packets > 0
    print("\n\nESP batch of 256 vs per-packet calls (compiled, best of "
          f"{BATCH_REPS}, µs per packet)\n" + "\n".join(lines))


def ratio_table() -> str:
    lines = ["| transform | impl | size | protect µs | unprotect µs | bare | bare enc+dec µs "
             "| ratio | goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        goal = 1.5 if size >= 1400 else 2.5
        for transform in sorted(TRANSFORMS):
            base = baseline(transform)
            bare = RESULTS[(size, f"bare-encrypt {base}")] \
                + RESULTS[(size, f"bare-decrypt {base}")]
            for impl in IMPLS:
                p = RESULTS.get((size, f"protect {transform} {impl}"))
                u = RESULTS.get((size, f"unprotect {transform} {impl}"))
                if p is None or u is None:
                    continue   # the C path was not built
                lines.append(f"| {transform} | {impl} | {size} | {p:.2f} | {u:.2f} | {base} | "
                             f"{bare:.2f} | {(p + u) / bare:.2f}x | ≤{goal}x |")
    return "\n".join(lines)


def test_zz_print_ratio_table(capsys: pytest.CaptureFixture[str]) -> None:
    if len(RESULTS) < len(SIZES) * 2 * (len(BASELINES) + len(TRANSFORMS)):
        pytest.skip("run the whole bench module to get the ratio table")
    with capsys.disabled():
        print("\n\nESP per-packet cost (min of rounds, µs per packet)\n" + ratio_table())
