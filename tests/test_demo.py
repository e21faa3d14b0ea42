"""`make demo` (`python -m bench.demo`, bench/demo/): the whole show with the shortened
schedule as a subprocess (exit 0, the summary's key lines, nothing left
running), Ctrl-C in the middle (everything stopped), the ``--esp`` demo still
there, and the loss accounting on its own."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.demo.verdict import _loss_runs, _silences
from bench.harness.procs import Proc, python_argv

ROOT = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT_S = 150


def demo_argv(*args: str) -> list[str]:
    return python_argv("bench.demo", *args)


def markers_of(output: str) -> list[str]:
    """What the command lines of the demo's processes contain: its work
    directory (the cluster, its members, the peer) and the echo's address."""
    m = re.search(r"work directory (\S+)", output)
    e = re.search(r"inner echo at (\S+)", output)
    assert m and e, output[-3000:]
    return [m.group(1), f"echo {e.group(1)}"]


def processes_mentioning(texts: list[str]) -> list[str]:
    """Command lines of running processes that contain one of ``texts``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if any(t in cmdline for t in texts) and state != "Z":
            out.append(f"{entry.name}: {cmdline}")
    return out


def assert_nothing_left(markers: list[str]) -> None:
    end = time.monotonic() + 5
    while (left := processes_mentioning(markers)) and time.monotonic() < end:
        time.sleep(0.1)
    assert not left, left


@pytest.mark.slow
def test_quick_demo_runs_the_failover_and_exits_0() -> None:
    proc = subprocess.run(demo_argv("--quick"), capture_output=True, text=True, cwd=ROOT,
                          timeout=DEMO_TIMEOUT_S, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    markers = markers_of(out)
    assert "Summary" in out
    for line in (
            "IKE SAs        6/6 up, 18/18 child SAs",
            "failover       kill -9 member ",
            "declared dead after ",
            "took over ",
            "rejoined after ",
            "autobalance gave back ",
            "loss at kill   ",
            "failover gap   ~",
            "same IKE SAs   6/6 IKE SAs kept their SPIs",
            "nothing left running",
            "result         OK"):
        assert line in out, f"{line!r} missing:\n{out[-5000:]}"
    m = re.search(r"traffic +(\d+) packets peer -> cluster, (\d+) back", out)
    assert m, out[-3000:]
    sent, back = int(m.group(1)), int(m.group(2))
    assert sent > 1000 and back > 0.9 * sent
    # without a terminal the table is printed at the moments that matter
    for moment in ("-- before the kill", "-- member dead", "-- balanced again", "-- at the end"):
        assert moment in out, moment
    assert "DEAD" in out
    assert_nothing_left(markers)
    assert not Path(markers[0]).exists(), "the work directory is removed when it worked"


@pytest.mark.slow
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    proc = Proc(demo_argv("--quick"), log)
    try:
        end = time.monotonic() + 60
        while "traffic: " not in log.read_text():
            assert proc.alive(), log.read_text()
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.1)
        markers = markers_of(log.read_text())
        assert len(processes_mentioning(markers)) >= 6   # echo, cluster, 3 members, peer
        proc.proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130, log.read_text()
    finally:
        if proc.alive():   # only a demo that did not stop: what it left is checked below
            proc.stop(grace_s=0)
        proc.close()
    text = log.read_text()
    assert "INTERRUPTED" in text and "nothing left running" in text, text[-3000:]
    assert_nothing_left(markers)


def test_esp_demo_is_still_there() -> None:
    proc = subprocess.run(demo_argv("--esp"), capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "replayed packet refused: ReplayError" in proc.stdout


def test_loss_runs_group_consecutive_losses_per_child() -> None:
    n = 3   # children; packet s goes through child s % n
    sent_at = [i * 0.01 for i in range(30)]
    lost = [4, 5, 7, 10, 13, 20, 29]   # child 1: 4, 7, 10, 13 in a row; child 2: 5, 20, 29
    runs = _loss_runs(lost, sent_at, n)
    assert sorted((r["child"], r["packets"]) for r in runs) == [(1, 4), (2, 1), (2, 1), (2, 1)]
    one = next(r for r in runs if r["child"] == 1)
    assert (one["first"], one["last"]) == (sent_at[4], sent_at[13])
    assert sum(r["packets"] for r in runs) == len(lost)


def test_silences_are_found_per_child() -> None:
    arrivals = [[0.0, 0.1, 0.2, 0.9, 1.0], [0.05, 0.15, 0.25, 0.35]]
    assert _silences(arrivals, 0.5) == [{"child": 0, "from": 0.2, "to": 0.9}]
    assert _silences(arrivals, 1.0) == []
