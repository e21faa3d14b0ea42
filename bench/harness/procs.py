"""The one process launcher of the demo, the tests and the benchmarks.

A ``Proc`` is one command in its own session (so its whole process group is
ours to stop: the dispatcher's members are in the dispatcher's group), its
output in a log file, optionally inside a network namespace. It dies with
the process that started it (Linux ``PR_SET_PDEATHSIG``: SIGTERM when the
starting thread ends, even by SIGKILL; the dispatcher then stops its
members). ``stop()`` ends the group cleanly: SIGTERM, a grace period, then
SIGKILL to whatever is left. ``Procs`` holds everything a test or the demo
started and stops it all at once. ``stop_groups`` is that stop for any
``subprocess.Popen`` started in its own session (the lab's processes,
tests/lab). ``run_coro`` runs a coroutine on the product's event-loop runner.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent.parent
#: SIGTERM to SIGKILL
KILL_GRACE_S = 5.0
#: after SIGKILL, how long a group may take to disappear
REAP_S = 3.0
_PR_SET_PDEATHSIG = 1

Popen = Callable[..., "subprocess.Popen[Any]"]
T = TypeVar("T")

# resolved here, not in the child between fork and exec
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (the thread that
    started it) dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside network namespace ``ns`` (None: ours)."""
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def python_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def cli_argv(*args: str) -> list[str]:
    """``ipsec-cluster ARGS`` (this interpreter, this tree)."""
    return python_argv("dispatcher.cli", *args)


def pid_alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child, not yet reaped) is dead too
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return False


def group_alive(pgid: int) -> bool:
    """Some process of group ``pgid`` is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a log, under a header naming it ("" if unreadable)."""
    with contextlib.suppress(OSError):
        return f"--- {path.name} (last lines)\n{path.read_text(errors='replace')[-n:]}"
    return ""


class Proc:
    """One command in its own session, logging to ``log_path`` (stdout and
    stderr; with ``stdout_pipe`` stdout is a pipe for the caller and only
    stderr goes to the log).

    ``popen`` starts it (default ``subprocess.Popen``; a lab passes its own,
    which runs the command in a namespace and tracks it). ``env`` is added
    to this process's environment; ``stdin_pipe`` gives the caller the
    child's stdin; ``text`` makes the pipes text."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, name: str | None = None,
                 ns: str | None = None, cwd: Path | str | None = ROOT,
                 env: Mapping[str, str] | None = None, stdout_pipe: bool = False,
                 stdin_pipe: bool = False, text: bool = False,
                 popen: Popen | None = None, with_parent: bool = True) -> None:
        self.name = name or log_path.stem
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        start: Popen = popen or subprocess.Popen
        try:
            self.proc: subprocess.Popen[Any] = start(
                ns_argv(ns, argv) if popen is None else list(argv),
                stdout=subprocess.PIPE if stdout_pipe else self._log,
                stderr=self._log if stdout_pipe else subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                cwd=cwd, env={**os.environ, **env} if env else None, text=text,
                start_new_session=True, preexec_fn=die_with_parent if with_parent else None)
        except BaseException:
            self._log.close()
            raise
        self.pid: int = self.proc.pid

    # -- state -----------------------------------------------------------------------

    def alive(self) -> bool:
        """The command itself (the group leader) still runs."""
        return self.proc.poll() is None

    def group_alive(self) -> bool:
        """Something of its process group still runs (the leader or a child)."""
        return group_alive(self.pid)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status once it exited, None if it still runs after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # -- its log ---------------------------------------------------------------------

    def log_text(self) -> str:
        with contextlib.suppress(ValueError):   # closed: the file is complete
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        return tail(self.log_path, n)

    # -- signals and stopping ----------------------------------------------------------

    def signal_group(self, sig: int) -> None:
        """``sig`` to the whole group (nothing if it is gone)."""
        signal_group(self.pid, sig)

    def stop(self, grace_s: float = KILL_GRACE_S) -> bool:
        """SIGTERM to the group, up to ``grace_s`` for it to end, then
        SIGKILL to what is left; True when the whole group is gone."""
        return not stop_all([self], grace_s)

    def close(self) -> None:
        """Close our end of the log (the pipes are the caller's)."""
        with contextlib.suppress(OSError):
            self._log.close()


def stop_all(procs: Sequence[Proc], grace_s: float = KILL_GRACE_S) -> list[str]:
    """Stop ``procs`` together (``stop_groups``) and close their logs.
    Returns the names of those whose group outlived SIGKILL too."""
    left = set(stop_groups([p.proc for p in procs], grace_s))
    for p in procs:
        p.close()
    return [p.name for p in procs if p.pid in left]


def stop_groups(popens: Sequence[subprocess.Popen[Any]],
                grace_s: float = KILL_GRACE_S) -> list[int]:
    """Stop the process groups these processes lead (each started in its own
    session) together: SIGTERM to every group (last started first), up to
    ``grace_s`` for all to end, then SIGKILL to every group still there.
    Returns the pids whose group outlived SIGKILL too."""
    for p in reversed(popens):
        if p.poll() is None or group_alive(p.pid):
            signal_group(p.pid, signal.SIGTERM)
    _wait_gone(popens, time.monotonic() + grace_s)
    for p in popens:
        if group_alive(p.pid):
            signal_group(p.pid, signal.SIGKILL)
    _wait_gone(popens, time.monotonic() + REAP_S)
    return [p.pid for p in popens if group_alive(p.pid)]


def signal_group(pgid: int, sig: int) -> None:
    """``sig`` to process group ``pgid`` (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_gone(popens: Sequence[subprocess.Popen[Any]], end: float) -> None:
    for p in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.05, end - time.monotonic()))
    while time.monotonic() < end and any(group_alive(p.pid) for p in popens):
        time.sleep(0.05)


class Procs:
    """Everything one test (or the demo) starts, its logs in ``workdir``;
    ``close()`` stops all of it (also as a context manager)."""

    def __init__(self, workdir: Path, *, proc_class: type[Proc] = Proc) -> None:
        self.workdir = workdir
        self.proc_class = proc_class
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], **kw: Any) -> Proc:
        """``argv`` as ``name`` (log: ``workdir/name.log``); ``kw`` as for ``Proc``."""
        proc = self.proc_class(argv, self.workdir / f"{name}.log", name=name, **kw)
        self.procs.append(proc)
        return proc

    def close(self, grace_s: float = KILL_GRACE_S) -> list[str]:
        """Stop everything; the names of groups still there after SIGKILL."""
        left = stop_all(self.procs, grace_s)
        self.procs.clear()
        return left

    def __iter__(self) -> Iterator[Proc]:
        return iter(self.procs)

    def __len__(self) -> int:
        return len(self.procs)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_coro(coro: Coroutine[Any, Any, T]) -> T:
    """What ``coro`` returns, run on the product's one event-loop runner
    (``member.main.run_loop``: uvloop)."""
    from member.main import run_loop

    results: list[T] = []

    async def wrapper() -> None:
        results.append(await coro)

    run_loop(wrapper())
    if not results:
        raise RuntimeError("the event loop stopped before the coroutine returned")
    return results[0]


def run_main(main: Coroutine[Any, Any, int]) -> int:
    """The exit status ``main`` returns, run on ``run_coro``; 1 if it returned nothing."""
    code = run_coro(main)
    return code if code is not None else 1
