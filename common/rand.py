"""The injected randomness type: cores never draw from the OS random source themselves."""

from __future__ import annotations

from collections.abc import Callable

#: A function returning ``n`` random bytes; shells pass the OS random source, tests a
#: seeded generator.
RandomBytes = Callable[[int], bytes]


def deterministic_random(seed: int) -> RandomBytes:
    """A reproducible byte source for tests and simulations (NOT for keys)."""
    import hashlib

    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
            counter += 1
        return bytes(out[:n])

    return draw
