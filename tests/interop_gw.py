"""Helpers for tests that run our gateway against strongSwan in the lab, on
the harness (bench/harness/): its config builder for a gateway facing
strongSwan, its process launcher (here through the lab, which runs the
command in a namespace and stops it with the lab), and the waits for the
gateway's events (tests/cluster_util.py's ``Proc``)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import configs
from bench.harness.procs import ROOT as ROOT
from bench.harness.procs import cli_argv
from tests.cluster_util import Proc
from tests.lab.netns import Lab

PSK = "interop-test-psk-0123456789"

#: (name, local selectors, remote selectors, ESP proposal), as this gateway sees them
ChildTuple = tuple[str, "str | Sequence[str]", "str | Sequence[str]", str]


def gateway_toml(*, address: str = configs.LAB_GATEWAY, remote: str = "%any",
                 inside: str = "tun:ipsc0", inside_address: str = "10.91.2.1",
                 psk: str = PSK, proposals: str = configs.IKE_PROPOSAL,
                 local_id: str = "gw-b.test", remote_id: str = "gw-a.test",
                 children: Sequence[ChildTuple] | None = None,
                 dpd_delay: int = 10, rekey_time: int = 14400, child_rekey: int = 3600,
                 start_action: str = "none", remote_port: int = 500,
                 extra: str | Mapping[str, Any] = "") -> str:
    """A config file for our gateway; ``children`` = (name, local, remote,
    esp); ``extra``: more ``[cluster]`` keys (a mapping, or TOML lines)."""
    kids = configs.LAB_CHILDREN if children is None else tuple(
        configs.Child(name, local, rem, esp) for name, local, rem, esp in children)
    more = tomllib.loads(extra) if isinstance(extra, str) else dict(extra)
    return configs.dumps(configs.strongswan_gateway(
        psk=psk, address=address, remote=remote, inside=inside, inside_address=inside_address,
        proposals=proposals, local_id=local_id, remote_id=remote_id, children=kids,
        dpd_delay=dpd_delay, rekey_time=rekey_time, child_rekey=child_rekey,
        start_action=start_action, remote_port=remote_port, extra=more))


class OurProcess(Proc):
    """``ipsec-cluster run|peer`` in a namespace, with its log kept (the lab
    stops it with the rest); ``wait_event``/``wait_ready``/``mark`` (the
    cluster_util ``Proc``'s) read its event stream (``run``: ``peer`` serves none)."""

    def __init__(self, lab: Lab, ns: str, config_text: str, workdir: Path, *,
                 command: str = "run", name: str = "gw", args: Sequence[str] = ()) -> None:
        self.config = workdir / f"{name}.toml"
        self.config.write_text(config_text)
        super().__init__(cli_argv(command, "--config", str(self.config), *args),
                         workdir / f"{name}.log", name=name,
                         popen=lambda argv, **kw: lab.popen(ns, argv, **kw))
