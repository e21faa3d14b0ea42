"""The control API against a real strongSwan (charon) in network namespaces:
a clean stop of our gateway is a Delete that charon sees at once (not DPD
~25 s later), and ``initiate --ike`` brings a connection up to a charon
responder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop_gw import ROOT, OurProcess, gateway_toml
from tests.lab.charon import Child, Conn, render_swanctl_conf
from tests.lab.netns import Lab

pytestmark = [pytest.mark.interop, pytest.mark.slow]

GCM = Child("net-gcm", "10.91.1.0/24", "10.91.2.0/24", esp_proposals="aes128gcm16")
CTR = Child("net-ctr", "10.91.11.0/24", "10.91.12.0/24", esp_proposals="aes128ctr-sha256")
#: the clean stop must reach charon well before DPD would (dpd_delay 10 s here)
DELETE_SEEN_WITHIN_S = 3.0


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=30,
                          cwd=ROOT, check=False)


def test_sigterm_is_a_delete_strongswan_sees_at_once(lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, _veth = lab.pair()
    for addr in ("10.91.1.1", "10.91.11.1"):
        lab.add_lo_addr(ns_a, addr)
    lab.add_lo_addr(ns_b, "10.91.12.1")
    gw = OurProcess(lab, ns_b, gateway_toml(), tmp_path)
    gw.wait_ready()
    charon = lab.charon(ns_a, "charon-a")
    charon.load(render_swanctl_conf(Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM, CTR])))
    charon.initiate(child="net-gcm", ike="a-b")
    charon.initiate(child="net-ctr", ike="a-b")
    assert len(charon.child_sas()) == 2
    gw.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    charon.wait_for("charon without SAs", lambda: not charon.list_sas(),
                    timeout=DELETE_SEEN_WITHIN_S)
    took = time.monotonic() - start
    assert took < DELETE_SEEN_WITHIN_S
    assert "received DELETE for IKE_SA" in charon.log_text(), charon.log_tail()
    gw.proc.wait(10)
    assert "deleting 1 IKE SA" in gw.log_text()


def test_initiate_ike_to_a_strongswan_responder(lab: Lab, tmp_path: Path) -> None:
    ns_a, ns_b, _veth = lab.pair()
    lab.add_lo_addr(ns_b, "10.91.2.1")
    lab.add_lo_addr(ns_b, "10.91.12.1")
    charon = lab.charon(ns_b, "charon-b")
    charon.load(render_swanctl_conf(
        Conn("a-b", "198.18.0.1", "198.18.0.2", [GCM, CTR]).mirrored()))
    gw = OurProcess(lab, ns_a, gateway_toml(
        address="198.18.0.1", remote="198.18.0.2", inside="tun:ipsc1",
        inside_address="10.91.1.1", local_id="gw-a.test", remote_id="gw-b.test",
        children=[("net-gcm", "10.91.1.0/24", "10.91.2.0/24", "aes128gcm16"),
                  ("net-ctr", "10.91.11.0/24", "10.91.12.0/24", "aes128ctr-sha256")]),
        tmp_path)
    gw.wait_ready()
    lab.add_lo_addr(ns_a, "10.91.11.1")
    time.sleep(0.5)
    assert not charon.list_sas()   # start_action none: nothing until asked
    done = _cli(gw.config, "initiate", "--ike", "a-b")
    assert done.returncode == 0, done.stdout + done.stderr
    charon.wait_for("both children up at the responder",
                    lambda: len(charon.child_sas()) == 2, timeout=10)
    listed = _cli(gw.config, "list-sas", "--json")
    assert listed.returncode == 0 and '"a-b"' in listed.stdout
    # and terminate: charon sees the Delete
    gone = _cli(gw.config, "terminate", "--ike", "a-b")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    charon.wait_for("charon without SAs", lambda: not charon.list_sas(), timeout=5)
