"""Helpers for tests that run our gateway against strongSwan in the lab."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.lab.netns import Lab

PSK = "interop-test-psk-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def gateway_toml(*, address: str = "198.18.0.2", remote: str = "%any",
                 inside: str = "tun:ipsc0", inside_address: str = "10.91.2.1",
                 psk: str = PSK, proposals: str = "aes128gcm16-prfsha256-ecp256",
                 local_id: str = "gw-b.test", remote_id: str = "gw-a.test",
                 children: list[tuple[str, str, str, str]] | None = None,
                 dpd_delay: int = 10, rekey_time: int = 14400, child_rekey: int = 3600,
                 start_action: str = "none", remote_port: int = 500, extra: str = "") -> str:
    """A config file for our gateway; ``children`` = (name, local, remote, esp)."""
    children = children or [("net-gcm", "10.91.2.0/24", "10.91.1.0/24", "aes128gcm16"),
                            ("net-ctr", "10.91.12.0/24", "10.91.11.0/24", "aes128ctr-sha256")]
    remote_addrs = f'["{remote}"]'
    text = f"""
[cluster]
address = "{address}"
inside = "{inside}"
inside_address = "{inside_address}"
log_level = "debug"
{extra}
[connections.a-b]
remote_addrs = {remote_addrs}
remote_port = {remote_port}
proposals = ["{proposals}"]
local_id = "{local_id}"
remote_id = "{remote_id}"
psk = "{psk}"
dpd_delay = {dpd_delay}
rekey_time = {rekey_time}
"""
    for name, local, rem, esp in children:
        text += f"""
[connections.a-b.children.{name}]
local_ts = ["{local}"]
remote_ts = ["{rem}"]
esp_proposals = ["{esp}"]
rekey_time = {child_rekey}
start_action = "{start_action}"
"""
    return text


class OurProcess:
    """``ipsec-cluster run|peer`` in a namespace, with its log kept."""

    def __init__(self, lab: Lab, ns: str, config_text: str, workdir: Path, *,
                 command: str = "run", name: str = "gw") -> None:
        self.config = workdir / f"{name}.toml"
        self.config.write_text(config_text)
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = lab.popen(ns, [sys.executable, "-m", "dispatcher.cli", command,
                                   "--config", str(self.config)],
                              stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT))

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log_text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in our log:\n{self.log_text()[-4000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None
