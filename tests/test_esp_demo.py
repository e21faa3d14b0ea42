"""The ESP demo runs and shows what it promises."""

from __future__ import annotations

import io

from bench.esp_demo import run_demo


def test_demo_runs() -> None:
    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    for transform in ("aes128gcm16", "aes256gcm16", "aes128ctr-sha256", "aes256ctr-sha256"):
        assert f"{transform:<17} IPv4" in text and f"{transform:<17} IPv6" in text
    assert "FAILED" not in text
    assert "replayed packet refused: ReplayError" in text
    assert "tampered packet refused: IntegrityError" in text
    assert ": 0 shared IVs" in text
    assert "kpps" in text
