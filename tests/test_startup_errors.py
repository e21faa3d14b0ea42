"""Start-up failures on this host are one line that names the cause and the fix
(issue "Operate it like a gateway"): a TUN inside without CAP_NET_ADMIN, in
the single gateway and in the cluster, and the cluster leaves no run folder.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from tests.lab.netns import Lab

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, members: int) -> Path:
    text = (ROOT / "examples" / "gateway.toml").read_text()
    path = tmp_path / f"gw{members}.toml"
    path.write_text(text.replace("members = 1", f"members = {members}"))
    return path


@pytest.mark.netns
@pytest.mark.parametrize("members", [1, 3])
def test_tun_without_cap_net_admin_is_one_line(lab: Lab, tmp_path: Path, members: int) -> None:
    ns = lab.netns()
    lab.add_lo_addr(ns, "198.18.0.2")
    config = _config(tmp_path, members)
    # capsh drops CAP_NET_ADMIN from the bounding set: TUNSETIFF gets EPERM.
    cmd = f"{sys.executable} -m dispatcher.cli run --config {config}"
    proc = lab.run(ns, ["capsh", "--drop=cap_net_admin", "--", "-c", cmd],
                   check=False, cwd=str(ROOT), timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ipsec-cluster: cannot create the TUN device 'ipsc0'")
    assert "CAP_NET_ADMIN" in lines[0] and 'inside = "udp:' in lines[0]
    digest = hashlib.sha256(str(config.resolve()).encode()).hexdigest()[:12]
    assert not (Path("/tmp") / f"ipsec-cluster-{digest}").exists()
