"""The README's walkthrough runs as written: its shell commands (between the
``walkthrough:begin`` and ``walkthrough:end`` markers) run with ``bash -e`` in
a fresh network namespace, from a copy of the repository's layout (``.venv``
= the venv running this test, ``examples/`` = the repository's), and every
command succeeds."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.cluster_util import ROOT
from tests.lab import netns

BEGIN, END = "<!-- walkthrough:begin -->", "<!-- walkthrough:end -->"


def walkthrough_commands(readme: str) -> list[str]:
    """The shell lines of the fenced blocks between the markers."""
    start, end = readme.index(BEGIN), readme.index(END)
    block = readme[start:end]
    lines: list[str] = []
    for body in re.findall(r"```(?:sh|bash)?\n(.*?)```", block, re.S):
        lines += [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
    return lines


def test_the_walkthrough_is_found_and_names_root_address_and_venv() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = walkthrough_commands(readme)
    assert any("ip address add 198.18.0.2" in c for c in commands)
    assert any(c.startswith(".venv/bin/ipsec-cluster") for c in commands)
    intro = readme[readme.index("### Walkthrough"):readme.index(BEGIN)]
    assert "root" in intro and ".venv/bin/ipsec-cluster" in intro


@pytest.mark.netns
@pytest.mark.slow
def test_the_walkthrough_runs_verbatim_in_a_network_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and ip(8) for a network namespace")
    work = tmp_path / "repo"
    work.mkdir()
    venv = ROOT / ".venv" if (ROOT / ".venv").exists() else Path(sys.prefix)
    if not (venv / "bin" / "ipsec-cluster").exists():
        pytest.skip(f"no ipsec-cluster in {venv}/bin (make .venv/.installed)")
    (work / ".venv").symlink_to(venv)
    shutil.copytree(ROOT / "examples", work / "examples")
    script = "\n".join(["set -e", "ip link set lo up",
                        *walkthrough_commands((ROOT / "README.md").read_text())])
    ns = netns.create_netns(netns.unique_name("walk"))
    try:
        # this tree's code wins over the venv's installed copy
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = netns.run(ns, ["bash", "-c", script], check=False, timeout=120, cwd=work,
                         env=env)
    finally:
        netns.delete_netns(ns)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in work.glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "1/1 IKE SAs up" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "total\t-\t-\t3/3" in proc.stdout, proc.stdout
