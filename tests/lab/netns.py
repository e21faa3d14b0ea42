"""Network namespaces, veth pairs and processes for the real-peer lab.

Rules of this file:
- Every namespace we create is named ``{prefix}-{pid}-{n}``; a later run with the
  same prefix deletes namespaces whose pid is dead (aborted runs leave nothing).
- Interfaces are created directly inside their namespaces, never in the root
  namespace, so parallel runs cannot collide on interface names.
- Everything a ``Lab`` starts or creates is undone by ``Lab.close()``, also when
  the test failed: its process groups are stopped (the harness's
  ``stop_groups``, bench/harness/procs.py), then namespaces are deleted.
- 198.18.0.0/15 (RFC 2544 benchmarking) and 10.91.0.0/16 are used only inside
  namespaces created here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness.procs import KILL_GRACE_S, ns_argv, pid_alive, stop_groups

if TYPE_CHECKING:
    from tests.lab.charon import Charon

DEFAULT_PREFIX = "ipclab"
DEFAULT_ADDR_A = "198.18.0.1/24"
DEFAULT_ADDR_B = "198.18.0.2/24"
CHARON_PATH = "/usr/lib/ipsec/charon"
CMD_TIMEOUT_S = 30.0

_counter = itertools.count(1)


class LabError(RuntimeError):
    """A lab command failed (namespace, link, address, route or process)."""


def unique_name(prefix: str = DEFAULT_PREFIX) -> str:
    """A namespace name unique across parallel and aborted runs."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def create_netns(name: str) -> str:
    """Create a namespace with ``lo`` up."""
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
    except LabError:
        delete_netns(name)
        raise
    return name


def delete_netns(name: str) -> None:
    """Kill whatever still runs in the namespace (it is ours), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = netns_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + KILL_GRACE_S
        while pids and netns_pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
    _ip("netns", "delete", name, check=False)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces ``{prefix}-{pid}-{n}`` left behind by dead processes."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+$")
    removed = []
    for name in list_netns():
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            delete_netns(name)
            removed.append(name)
    return removed


def run(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = CMD_TIMEOUT_S,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``ns``; output captured as text; LabError if check fails."""
    kwargs.setdefault("capture_output", True)
    proc = subprocess.run(
        ns_argv(ns, argv), text=True, timeout=timeout, check=False, **kwargs
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"[{ns}] {' '.join(argv)} failed ({proc.returncode}):\n"
            f"{proc.stdout or ''}{proc.stderr or ''}"
        )
    return proc


def popen(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside ``ns`` in its own session (so its group can be killed)."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(ns_argv(ns, argv), **kwargs)


def lab_unavailable_reason(*, need_charon: bool = True) -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not found (scripts/install-sysdeps.sh)"
    probe = unique_name()  # matches cleanup_stale() if we die right here
    proc = _ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"'ip netns add' does not work here: {proc.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    if not need_charon:
        return None
    if not os.access(CHARON_PATH, os.X_OK):
        return f"strongSwan charon not installed at {CHARON_PATH} (scripts/install-sysdeps.sh)"
    for tool in ("swanctl", "ping"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (scripts/install-sysdeps.sh)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing: charon's kernel-libipsec needs a TUN device"
    return None


@dataclass(frozen=True, slots=True)
class Veth:
    ns_a: str
    dev_a: str
    addr_a: str
    ns_b: str
    dev_b: str
    addr_b: str

    @property
    def ip_a(self) -> str:
        return self.addr_a.split("/")[0]

    @property
    def ip_b(self) -> str:
        return self.addr_b.split("/")[0]


class Lab:
    """Namespaces, links, processes and charons of one test; ``close()`` undoes all."""

    def __init__(self, workdir: Path | str | None = None, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.charons: list[Charon] = []
        self._ndev: dict[str, int] = {}
        cleanup_stale(prefix)

    # -- namespaces and links ---------------------------------------------------------
    def netns(self) -> str:
        name = create_netns(unique_name(self.prefix))
        self.namespaces.append(name)
        return name

    def _next_dev(self, ns: str) -> str:
        n = self._ndev.get(ns, 0)
        self._ndev[ns] = n + 1
        return f"veth{n}"

    def veth(
        self,
        ns_a: str,
        ns_b: str,
        addr_a: str = DEFAULT_ADDR_A,
        addr_b: str = DEFAULT_ADDR_B,
        *,
        mtu: int | None = None,
    ) -> Veth:
        """A veth pair between two namespaces, addressed and up."""
        dev_a, dev_b = self._next_dev(ns_a), self._next_dev(ns_b)
        _ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b,
            "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            if mtu is not None:
                _ip("-n", ns, "link", "set", dev, "mtu", str(mtu))
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        return Veth(ns_a, dev_a, addr_a, ns_b, dev_b, addr_b)

    def pair(
        self, addr_a: str = DEFAULT_ADDR_A, addr_b: str = DEFAULT_ADDR_B
    ) -> tuple[str, str, Veth]:
        """Two fresh namespaces joined by a veth pair: ``(ns_a, ns_b, veth)``."""
        ns_a, ns_b = self.netns(), self.netns()
        return ns_a, ns_b, self.veth(ns_a, ns_b, addr_a, addr_b)

    def add_lo_addr(self, ns: str, cidr: str) -> None:
        """An extra address on ``lo`` (``/32`` if no prefix); ``dummy`` links do not work here."""
        if "/" not in cidr:
            cidr += "/32"
        _ip("-n", ns, "addr", "add", cidr, "dev", "lo")

    def add_route(
        self, ns: str, dst: str, *, via: str | None = None, dev: str | None = None,
        src: str | None = None, table: str | None = None,
    ) -> None:
        args = ["-n", ns, "route", "add", dst]
        for key, val in (("via", via), ("dev", dev), ("src", src), ("table", table)):
            if val is not None:
                args += [key, val]
        _ip(*args)

    # -- processes --------------------------------------------------------------------
    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(ns, argv, **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Like ``popen()``, and killed (whole process group) by ``close()``."""
        proc = popen(ns, argv, **kwargs)
        self.processes.append(proc)
        return proc

    def charon(self, ns: str, name: str | None = None, **kwargs: Any) -> Charon:
        """Start a charon in ``ns`` with its run dir under the workdir; stopped by close()."""
        from tests.lab.charon import Charon

        name = name or f"charon{len(self.charons)}"
        ch = Charon(ns, self.workdir / name, **kwargs)
        self.charons.append(ch)
        ch.start()
        return ch

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        errors: list[BaseException] = []
        for ch in reversed(self.charons):
            try:
                ch.stop()
            except Exception as exc:  # keep tearing down
                errors.append(exc)
        stop_groups(self.processes)
        for ns in reversed(self.namespaces):
            delete_netns(ns)
        self.charons.clear()
        self.processes.clear()
        self.namespaces.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError(f"lab teardown: {errors[0]}") from errors[0]

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def lab(workdir: Path | str | None = None, prefix: str = DEFAULT_PREFIX) -> Iterator[Lab]:
    """``with lab() as lb:`` — a Lab that is always closed."""
    lb = Lab(workdir, prefix)
    try:
        yield lb
    finally:
        lb.close()
