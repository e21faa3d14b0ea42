"""The supervisor's restarts (dispatcher/supervisor.py): a failing member is
started again after growing delays, and after too many quick failures the
supervisor stops with one line naming the member, its exit status and its
last stderr line; members and the dispatcher die with their supervisor
(also on kill -9)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatcher.supervisor import Backoff
from tests.cluster_util import (
    ROOT,
    ChildSpec,
    ConnSpec,
    Procs,
    alive_members,
    cli_argv,
    gateway_toml,
    pid_alive,
    status,
    tail,
    wait_for,
)

GW = "127.0.0.1"
BASE = 27000 + os.getpid() % 1000


def _config(tmp_path: Path, base: int, members: int) -> Path:
    config = tmp_path / "cluster.toml"
    conns = (ConnSpec("c1", "gw.test", "peer.test",
                      (ChildSpec("net", "10.70.2.0/24", "10.70.1.0/24"),)),)
    config.write_text(gateway_toml(address=GW, ports=(base, base + 1),
                                   inside=f"udp:127.0.0.1:{base + 2}",
                                   inside_bind=f"127.0.0.1:{base + 3}",
                                   members=members, conns=conns))
    return config


def test_backoff_doubles_to_a_cap_resets_after_a_stable_run_and_gives_up() -> None:
    b = Backoff(initial_s=0.5, max_s=30.0, stable_s=60.0, give_up_after=10)
    delays = [b.exited(1.0) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert b.exited(61.0) == 0.5          # it ran fine for a minute: a new series
    b = Backoff(initial_s=0.5, give_up_after=3)
    assert [b.exited(0.1) for _ in range(4)] == [0.5, 1.0, 2.0, None]


# A supervisor whose members always fail (exit 7 with a message), with short delays.
FAILING = """
import sys
from dispatcher import cli, supervisor
supervisor.Supervisor.member_command = (
    "sh", "-c", "echo starting >&2; echo 'member broke: no such thing' >&2; exit 7", "member")
supervisor.Supervisor.new_backoff = lambda self: supervisor.Backoff(
    initial_s=0.2, max_s=1.0, give_up_after=4)
sys.exit(cli.main(["run", "--config", sys.argv[1]]))
"""


def test_a_member_that_always_fails_backs_off_then_the_supervisor_gives_up(
        tmp_path: Path) -> None:
    config = _config(tmp_path, BASE, members=2)
    proc = subprocess.run([sys.executable, "-c", FAILING, str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    err = proc.stderr
    assert proc.returncode != 0, err
    delays = [float(d) for d in re.findall(r"member 1 \(pid \d+\) exited with 7 after "
                                           r"[\d.]+ s; starting it again in ([\d.]+) s", err)]
    assert delays == [0.2, 0.4, 0.8, 1.0], err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ipsec-cluster: member "), err
    assert "failed 5 times in a row, last exit status 7: member broke: no such thing" in last
    assert "Traceback" not in err


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _spare(pid: int) -> bool:
    """A warm spare dispatcher (``ipsec-cluster dispatcher --spare``, waiting
    for its handoff; the supervisor keeps one, dispatcher/supervisor.py)."""
    try:
        return b"--spare" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def _members_of(supervisor: int, dispatcher: int) -> list[int]:
    """The supervisor's children but its dispatcher and its warm spare."""
    return sorted(p for p in _children(supervisor) if p != dispatcher and not _spare(p))


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_members_die_with_their_supervisor_on_kill_9(tmp_path: Path, keep: bool) -> None:
    """The members and the dispatcher; unless IPSEC_CLUSTER_KEEP_MEMBERS=1
    leaves them running on purpose."""
    config = _config(tmp_path, BASE + (20 if keep else 10), members=2)
    procs = Procs(tmp_path)
    members: list[int] = []
    spares: list[int] = []
    old = os.environ.pop("IPSEC_CLUSTER_KEEP_MEMBERS", None)
    if keep:
        os.environ["IPSEC_CLUSTER_KEEP_MEMBERS"] = "1"
    try:
        disp = procs.start("cluster", cli_argv("run", "--config", str(config)))
        wait_for("2 members alive", lambda: len(alive_members(status(config))) == 2,
                 timeout=20, diag=lambda: tail(disp.log_path))
        st = status(config)
        members = [m["pid"] for m in st["members"]]
        # the supervisor's children: the members, the dispatcher (a process
        # of its own, dispatcher/process.py) and the warm spare dispatcher
        dispatcher = st["dispatcher"]["pid"]
        assert st["dispatcher"]["supervisor_pid"] == disp.pid, st["dispatcher"]
        assert dispatcher not in (disp.pid, *members)
        spares = wait_for("the warm spare", lambda: [
            p for p in _children(disp.pid) if p != dispatcher and _spare(p)] or None,
            timeout=10)
        assert len(spares) == 1, spares
        assert sorted([*members, dispatcher, *spares]) == sorted(_children(disp.pid))
        members.append(dispatcher)
        if not keep:
            # `ipsec-cluster status | cat`: plain tab-separated lines, a totals row
            piped = subprocess.run(cli_argv("status", "--config", str(config)), cwd=ROOT,
                                   capture_output=True, text=True, timeout=30, check=True)
            rows = [ln.split("\t") for ln in piped.stdout.splitlines()]
            assert rows[1][:4] == ["id", "pid", "host", "alive"], piped.stdout
            assert rows[-2][:4] == ["total", "-", "-", "2/2"], piped.stdout
        os.kill(disp.pid, signal.SIGKILL)
        disp.proc.wait(5)
        end = time.monotonic() + 1.0
        while time.monotonic() < end and any(pid_alive(p) for p in members):
            time.sleep(0.02)
        if keep:
            assert all(pid_alive(p) for p in members), members
        else:
            assert not any(pid_alive(p) for p in members), members
        # the spare ends either way: its handoff can never come (its channel
        # closed with the supervisor)
        wait_for("the spare gone", lambda: not any(pid_alive(p) for p in spares), timeout=5)
    finally:
        os.environ.pop("IPSEC_CLUSTER_KEEP_MEMBERS", None)
        if old is not None:
            os.environ["IPSEC_CLUSTER_KEEP_MEMBERS"] = old
        for pid in [*members, *spares]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        procs.close()


def test_keygen_refuses_to_overwrite_a_key_pair(tmp_path: Path) -> None:
    def keygen(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli_argv("keygen", "--dir", str(tmp_path), "--name", "d",
                                       *extra), cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=False)

    assert keygen().returncode == 0
    secret = (tmp_path / "d.key_secret").read_bytes()
    again = keygen()
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "exists" in again.stderr
    assert "--force" in again.stderr
    assert (tmp_path / "d.key_secret").read_bytes() == secret
    assert keygen("--force").returncode == 0
    assert (tmp_path / "d.key_secret").read_bytes() != secret


def test_every_option_of_every_command_has_a_help_text_and_version_works() -> None:
    import argparse

    from dispatcher.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"run", "peer", "member", "status", "sas", "keygen"}
    assert "demo" not in sub.choices  # the demo is bench/demo/, outside the product
    for name, p in sub.choices.items():
        assert "--config" in p.format_help() or name == "keygen", name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"ipsec-cluster {name} {action.option_strings[0]}"
    out = subprocess.run(cli_argv("--version"), cwd=ROOT, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert re.fullmatch(r"ipsec-cluster \S+.*\n", out), out
