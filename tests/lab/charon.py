"""strongSwan's charon as a real peer, one instance per network namespace.

Rules of this file (see docs/testing.md "Things to know about charon here"):
- The kernel has no ESP: charon uses ``kernel-libipsec`` (TUN ``ipsec0``), listed
  BEFORE ``kernel-netlink``; the explicit plugin list must contain ``kdf``.
- Each charon gets its own run dir, bind-mounted over ``/run`` inside
  ``ip netns exec`` (private mount namespace), so the compiled-in
  ``/var/run/charon.pid`` of one instance (or of a system charon) never blocks
  another. The VICI socket, charon.log and the rendered configs live in that dir.
- ``swanctl`` runs outside the namespace: the VICI socket is a filesystem path.
- Every failed operation raises ``CharonError`` carrying the tail of charon.log.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from bench.harness.procs import Proc
from tests.lab import netns

T = TypeVar("T")

DEFAULT_PLUGINS = (
    "random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 x509 pubkey "
    "kernel-libipsec kernel-netlink socket-default vici"
)
START_TIMEOUT_S = 10.0
OP_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 40
SWANCTL_TAIL_LINES = 15
# sockaddr_un.sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 100

STRONGSWAN_CONF = """\
# rendered by tests/lab/charon.py for namespace {ns}
charon {{
    load_modular = no
    load = {plugins}

    port = {port}
    port_nat_t = {port_nat_t}
    install_routes = yes
    routing_table = 220
    routing_table_prio = 220
    retransmit_tries = {retransmit_tries}
    retransmit_timeout = {retransmit_timeout}
    retransmit_base = {retransmit_base}
{charon_options}
    plugins {{
        vici {{
            socket = unix://{run_dir}/charon.vici
        }}
        socket-default {{
            use_ipv6 = no
        }}
    }}
    filelog {{
        main {{
            path = {run_dir}/charon.log
            time_format = %H:%M:%S
            ike_name = yes
            append = no
            flush_line = yes
            default = 1
            ike = 2
            knl = 1
            esp = 1
            net = 1
            cfg = 1
        }}
    }}
    syslog {{
        daemon {{
            default = -1
        }}
    }}
}}
swanctl {{
    load = pem pkcs1 pkcs8 x509 pubkey openssl random
    socket = unix://{run_dir}/charon.vici
}}
"""


class CharonError(RuntimeError):
    """A charon/swanctl operation failed; the message ends with charon.log's tail."""


# -- swanctl --raw parser ----------------------------------------------------------------
# A raw VICI dump is one line per message: ``label {key=value key=[a b] name {...}}``.
# Values are printed verbatim, so a value may contain spaces (e.g. a DN as an ID). VICI
# keys are lower-case, so a value ends before " key=" (lower-case key), " name {" or "}".
_VALUE_END = re.compile(r"\}| (?=[a-z0-9_.-]+=|[^\s{}=]+ \{)")


class _RawParser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def _skip(self) -> None:
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1

    def _expect(self, ch: str) -> None:
        if self.s[self.i : self.i + 1] != ch:
            raise ValueError(f"expected {ch!r} at {self.i}: {self.s[self.i:self.i + 40]!r}")
        self.i += 1

    def section(self) -> dict[str, Any]:
        self._expect("{")
        out: dict[str, Any] = {}
        while True:
            self._skip()
            if self.i >= len(self.s):
                raise ValueError("unterminated section")
            if self.s[self.i] == "}":
                self.i += 1
                return out
            m = re.compile(r"[^\s{}=]+").match(self.s, self.i)
            if m is None:
                raise ValueError(f"bad token at {self.i}: {self.s[self.i:self.i + 40]!r}")
            name, self.i = m.group(0), m.end()
            if self.s.startswith("=[", self.i):
                self.i += 2
                end = self.s.index("]", self.i)
                out[name] = self.s[self.i : end].split()
                self.i = end + 1
            elif self.s.startswith("=", self.i):
                self.i += 1
                v = _VALUE_END.search(self.s, self.i)
                end = v.start() if v else len(self.s)
                out[name], self.i = self.s[self.i : end], end
            else:
                self._skip()
                out[name] = self.section()


def parse_vici_raw(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``swanctl ... --raw`` output into ``[(label, body), ...]``.

    Sections become dicts, lists become lists of str, values stay str.
    """
    messages = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        brace = line.find(" {")
        if brace < 0:
            raise ValueError(f"not a raw VICI message: {line[:60]!r}")
        p = _RawParser(line[brace + 1 :])
        body = p.section()
        if p.s[p.i :].strip():
            raise ValueError(f"trailing text after message: {p.s[p.i:][:40]!r}")
        messages.append((line[:brace], body))
    return messages


def parse_list_sas(text: str) -> list[dict[str, Any]]:
    """IKE SAs from ``swanctl --list-sas --raw``.

    Each IKE SA is its VICI dict plus ``name``; ``child-sas`` becomes a list of
    child dicts (each has ``name`` from VICI and ``key``, e.g. ``net-gcm-3``).
    """
    sas = []
    for label, body in parse_vici_raw(text):
        if label != "list-sa event":
            continue
        for ike_name, ike in body.items():
            ike = dict(ike)
            ike["name"] = ike_name
            ike["child-sas"] = [
                {**child, "key": key} for key, child in ike.get("child-sas", {}).items()
            ]
            sas.append(ike)
    return sas


# -- swanctl.conf renderer --------------------------------------------------------------
@dataclass(slots=True)
class Child:
    """One ``children { NAME { ... } }`` entry; ``extra`` adds raw swanctl keys."""

    name: str
    local_ts: str
    remote_ts: str
    esp_proposals: str = "aes128gcm16"
    rekey_time: str = "1h"
    mode: str = "tunnel"
    start_action: str = "none"
    dpd_action: str = "clear"
    extra: dict[str, str] = field(default_factory=dict)

    def mirrored(self) -> Child:
        return replace(self, local_ts=self.remote_ts, remote_ts=self.local_ts)


@dataclass(slots=True)
class Conn:
    """One IKE connection plus its PSK secret; ``mirrored()`` is the peer's view."""

    name: str
    local_addrs: str
    remote_addrs: str
    children: list[Child]
    local_id: str = "gw-a.test"
    remote_id: str = "gw-b.test"
    psk: str = "interop-test-psk-0123456789"
    proposals: str = "aes128gcm16-prfsha256-ecp256"
    rekey_time: str = "4h"
    dpd_delay: str = "10s"
    local_port: int | None = None
    remote_port: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: "psk" or "pubkey"; with pubkey: the certificate (``local_cert``) and the
    #: CAs we trust (``remote_cacerts``), file names put with ``Charon.add_file``
    #: into x509/ and x509ca/ (the key into private/)
    local_auth: str = "psk"
    remote_auth: str = "psk"
    local_cert: str = ""
    remote_cacerts: str = ""

    def mirrored(self) -> Conn:
        return replace(
            self, local_addrs=self.remote_addrs, remote_addrs=self.local_addrs,
            local_id=self.remote_id, remote_id=self.local_id,
            local_auth=self.remote_auth, remote_auth=self.local_auth,
            local_port=self.remote_port, remote_port=self.local_port,
            children=[c.mirrored() for c in self.children],
        )

    def render(self) -> str:
        opts = {"version": "2", "mobike": "no", "local_addrs": self.local_addrs,
                "remote_addrs": self.remote_addrs, "proposals": self.proposals,
                "dpd_delay": self.dpd_delay, "rekey_time": self.rekey_time}
        if self.local_port is not None:
            opts["local_port"] = str(self.local_port)
        if self.remote_port is not None:
            opts["remote_port"] = str(self.remote_port)
        opts.update(self.extra)
        lines = [f"    {self.name} {{", *(f"        {k} = {v}" for k, v in opts.items())]
        local = [f"auth = {self.local_auth}", f"id = {self.local_id}"]
        local += [f"certs = {self.local_cert}"] if self.local_cert else []
        remote = [f"auth = {self.remote_auth}", f"id = {self.remote_id}"]
        remote += [f"cacerts = {self.remote_cacerts}"] if self.remote_cacerts else []
        lines += ["        local {", *(f"            {x}" for x in local), "        }",
                  "        remote {", *(f"            {x}" for x in remote), "        }",
                  "        children {"]
        for c in self.children:
            copts = {"local_ts": c.local_ts, "remote_ts": c.remote_ts, "mode": c.mode,
                     "esp_proposals": c.esp_proposals, "rekey_time": c.rekey_time,
                     "dpd_action": c.dpd_action, "start_action": c.start_action, **c.extra}
            lines += [f"            {c.name} {{", *(f"                {k} = {v}"
                                                  for k, v in copts.items()), "            }"]
        lines += ["        }", "    }"]
        return "\n".join(lines)

    def render_secret(self) -> str:
        out = ""
        if "psk" in (self.local_auth, self.remote_auth):
            out += (f"    ike-{self.name} {{\n        id-a = {self.local_id}\n"
                    f"        id-b = {self.remote_id}\n        secret = \"{self.psk}\"\n    }}")
        return out


def render_swanctl_conf(*conns: Conn) -> str:
    """A complete swanctl.conf (connections and PSK secrets) for ``conns``."""
    return ("connections {\n" + "\n".join(c.render() for c in conns) + "\n}\n"
            "secrets {\n" + "\n".join(c.render_secret() for c in conns) + "\n}\n")


# -- charon ------------------------------------------------------------------------------
class Charon:
    """One charon in namespace ``ns``; run dir, configs and charon.log in ``run_dir``."""

    def __init__(
        self,
        ns: str,
        run_dir: Path | str,
        *,
        port: int = 500,
        port_nat_t: int = 4500,
        plugins: str = DEFAULT_PLUGINS,
        charon_options: dict[str, str] | None = None,
        retransmit_timeout: float = 2.0,
        retransmit_base: float = 1.4,
        retransmit_tries: int = 3,
    ) -> None:
        self.ns = ns
        self.run_dir = _short_run_dir(Path(run_dir))
        self.conf_path = self.run_dir / "strongswan.conf"
        self.log_path = self.run_dir / "charon.log"
        self.swanctl_dir = self.run_dir / "swanctl"
        self.port, self.port_nat_t = port, port_nat_t
        self.proc: Proc | None = None
        opts = "".join(f"    {k} = {v}\n" for k, v in (charon_options or {}).items())
        self.conf_text = STRONGSWAN_CONF.format(
            ns=ns, plugins=plugins, port=port, port_nat_t=port_nat_t,
            retransmit_tries=retransmit_tries, retransmit_timeout=retransmit_timeout,
            retransmit_base=retransmit_base, charon_options=opts, run_dir=self.run_dir,
        )

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> Charon:
        self.conf_path.write_text(self.conf_text)
        # A pid file left by a killed charon in a reused run dir would block the start.
        (self.run_dir / "charon.pid").unlink(missing_ok=True)
        # swanctl --load-all looks for these next to swanctl.conf; empty is fine.
        for sub in ("x509", "x509ca", "private", "pubkey"):
            (self.swanctl_dir / sub).mkdir(parents=True, exist_ok=True)
        script = (
            f"mount --bind '{self.run_dir}' /run && "
            f"exec env STRONGSWAN_CONF='{self.conf_path}' {netns.CHARON_PATH}"
        )
        self.proc = Proc(["sh", "-c", script], self.run_dir / "charon.stdout", name="charon",
                         ns=self.ns, cwd=None)
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                err = self._error(f"charon exited with {self.proc.returncode} at start")
                self.stop()
                raise err
            if self.swanctl("--stats", check=False).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise self._error(f"VICI not up after {timeout} s")
            time.sleep(0.1)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM charon's process group, SIGKILL after ``grace_s``."""
        if self.proc is not None:
            self.proc.stop(grace_s)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def __enter__(self) -> Charon:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- swanctl --------------------------------------------------------------------
    def swanctl(
        self, *args: str, check: bool = True, timeout: float = OP_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``swanctl ARGS`` against this charon's VICI socket."""
        try:
            proc = subprocess.run(
                ["swanctl", *args], capture_output=True, text=True, check=False,
                timeout=timeout + 5, env={**os.environ, "STRONGSWAN_CONF": str(self.conf_path)},
            )
        except subprocess.TimeoutExpired as exc:
            raise self._error(f"swanctl {' '.join(args)} timed out") from exc
        if check and proc.returncode != 0:
            out = "\n".join((proc.stdout + proc.stderr).splitlines()[-SWANCTL_TAIL_LINES:])
            raise self._error(f"swanctl {' '.join(args)} failed ({proc.returncode}):\n{out}")
        return proc

    def add_file(self, sub: str, src: Path) -> None:
        """A credential for ``swanctl --load-all``: ``sub`` is x509 (our
        certificates), x509ca (trusted CAs) or private (keys)."""
        (self.swanctl_dir / sub / src.name).write_bytes(src.read_bytes())

    def load(self, swanctl_conf_text: str) -> None:
        """Write swanctl.conf into the run dir and ``swanctl --load-all`` it."""
        path = self.swanctl_dir / "swanctl.conf"
        path.write_text(swanctl_conf_text)
        self.swanctl("--load-all", "--noprompt", "--file", str(path))

    def initiate(
        self, child: str | None = None, ike: str | None = None, timeout: float = OP_TIMEOUT_S
    ) -> str:
        """``swanctl --initiate`` and wait for the result; returns swanctl's output."""
        args = ["--initiate", "--timeout", str(int(max(1, timeout)))]
        if child:
            args += ["--child", child]
        if ike:
            args += ["--ike", ike]
        return self.swanctl(*args, timeout=timeout).stdout

    def list_sas(self) -> list[dict[str, Any]]:
        """All IKE SAs (see ``parse_list_sas``); values are strings as VICI sends them."""
        return parse_list_sas(self.swanctl("--list-sas", "--raw").stdout)

    def ike_sa(self, name: str) -> dict[str, Any] | None:
        """The ESTABLISHED IKE SA named ``name`` (newest if several), or None."""
        found = [s for s in self.list_sas() if s["name"] == name and s["state"] == "ESTABLISHED"]
        return max(found, key=lambda s: int(s["uniqueid"])) if found else None

    def child_sas(
        self, name: str | None = None, state: str | None = "INSTALLED"
    ) -> list[dict[str, Any]]:
        """CHILD_SAs in ``state`` (rekeyed ones linger as DELETED), of ``name`` if given."""
        return [
            c for s in self.list_sas() for c in s["child-sas"]
            if (name is None or c["name"] == name) and (state is None or c["state"] == state)
        ]

    def wait_for(self, what: str, predicate: Callable[[], T | None],
                 timeout: float = OP_TIMEOUT_S) -> T:
        """Poll ``predicate()`` until it returns something truthy; CharonError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise self._error(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)

    def rekey_child(self, name: str, timeout: float = OP_TIMEOUT_S) -> dict[str, Any]:
        """Rekey CHILD_SA ``name``; wait for an INSTALLED one with a new SPI and return it."""
        old = {c["spi-in"] for c in self.child_sas(name)}
        self.swanctl("--rekey", "--child", name)

        def new_child() -> dict[str, Any] | None:
            fresh = [c for c in self.child_sas(name) if c["spi-in"] not in old]
            return fresh[0] if fresh else None

        return self.wait_for(f"CHILD_SA {name} rekeyed", new_child, timeout)

    def rekey_ike(self, name: str, timeout: float = OP_TIMEOUT_S) -> dict[str, Any]:
        """Rekey IKE_SA ``name``; wait for an ESTABLISHED one with new SPIs and return it."""
        def spis(s: dict[str, Any]) -> tuple[str, str]:
            return s["initiator-spi"], s["responder-spi"]

        old = {spis(s) for s in self.list_sas() if s["name"] == name}
        self.swanctl("--rekey", "--ike", name)

        def new_ike() -> dict[str, Any] | None:
            fresh = [s for s in self.list_sas() if s["name"] == name
                     and s["state"] == "ESTABLISHED" and spis(s) not in old]
            return fresh[0] if fresh else None

        return self.wait_for(f"IKE_SA {name} rekeyed", new_ike, timeout)

    def terminate_ike(self, name: str, timeout: float = OP_TIMEOUT_S) -> None:
        """``swanctl --terminate --ike NAME`` and wait until no such IKE SA remains."""
        self.swanctl("--terminate", "--ike", name, "--timeout", str(int(max(1, timeout))),
                     timeout=timeout)
        self.wait_for(f"IKE_SA {name} gone",
                      lambda: not any(s["name"] == name for s in self.list_sas()), timeout)

    # -- logs -----------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _error(self, msg: str) -> CharonError:
        return CharonError(
            f"[charon in {self.ns}] {msg}\n--- tail of {self.log_path} ---\n{self.log_tail()}"
        )


def _short_run_dir(wanted: Path) -> Path:
    """``wanted``, or a short dir under /tmp symlinked from it if the VICI path is too long."""
    if len(str(wanted / "charon.vici")) <= MAX_SOCKET_PATH:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    short = Path(tempfile.mkdtemp(prefix="ipclab-charon-"))
    wanted.parent.mkdir(parents=True, exist_ok=True)
    wanted.symlink_to(short, target_is_directory=True)
    return short
