"""No test and not the demo learns a cluster event by parsing log text.

The cluster's facts are typed: the event stream of the control socket (READY,
members joined and dead, takeovers, segments moved, SAs up, down, rekeyed and
failed, leases released: ``Proc.wait_event`` in tests/cluster_util.py, the
harness's ``ControlClient.wait_event``) and the counters of ``status`` and
``stats``. This test reads the source of tests/ and bench/ with ``ast`` and
fails on:

- a call of anything named ``wait_log``;
- a check over the text of a log: the right side of ``in``/``not in``, the
  text a ``re`` function or a compiled pattern searches, the subject of
  ``count``, ``find``, ``index``, ``startswith``, ``endswith``, ``split`` or
  ``splitlines``, where that text is ``X.log_text()``, ``X.log_tail()``,
  ``X.tail()``, ``tail(...)``, ``read_text()`` of something named like a
  log, or a local name given one of those;
- a process's ``log_path`` handed to anything but ``tail`` (a log reader
  such as the demo's former ``LogWatch``);

unless the log is strongSwan's (the receiver is a ``charon``: the peer is
not our cluster), or the place is one of ``ALLOWED`` below, each with the
reason its log text is what it tests (a log line's format, a message to the
operator, the output of another program) rather than a cluster event.
Diagnostics (a log's tail in an assertion message or a ``diag=``) are not
checks and pass.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tests", "bench")

#: calls that give a log's text
LOG_READS = frozenset({"log_text", "log_tail", "tail"})
#: ``re`` functions and compiled-pattern methods that search a text
RE_SEARCHES = frozenset({"search", "match", "fullmatch", "findall", "finditer", "sub", "split"})
#: string methods whose subject is searched
STR_SEARCHES = frozenset({"count", "find", "index", "rfind", "rindex", "startswith",
                          "endswith", "split", "splitlines", "partition"})
#: a receiver that is strongSwan (tests/lab/charon.py's ``Charon``): the peer's log
STRONGSWAN = re.compile(r"(^|\.)charon\w*$")

#: (file, function) -> why its log text is not a cluster event; function "*": the whole file
ALLOWED: dict[tuple[str, str], str] = {
    ("tests/test_logs.py", "*"):
        "the log lines themselves: their format, fields, levels and roles",
    ("tests/lab/charon.py", "*"):
        "strongSwan's own log (the lab's charon wrapper)",
    ("tests/test_lab_strongswan.py", "*"):
        "the strongSwan lab on its own: charon's log, no cluster of ours",
    ("tests/test_harness.py", "test_stop_ends_the_whole_group_with_sigkill_after_the_grace"):
        "the harness's process launcher: the output of a test's own script",
    ("tests/test_harness.py", "test_procs_close_reports_and_logs"):
        "the harness's process launcher: a Python error of a test's own command",
    ("tests/test_harness.py", "test_stop_groups_stops_popens_started_elsewhere"):
        "the harness's process launcher: the output of a test's own script",
    ("tests/test_demo.py", "*"):
        "the demo's own output (what it shows the user), not a log of the cluster",
    ("tests/cluster_util.py", "peer_result"):
        "our peer's --json result: the command's output (one JSON object), and our peer "
        "serves no event stream",
    ("tests/failover_util.py", "peer_json"):
        "our peer's --json result: the command's output (one JSON object)",
    ("tests/test_hostile_routes.py", "test_crash_leaves_only_our_rules_and_next_start_removes_"
                                     "them"):
        "a message to the operator about routing rules, not a cluster event",
    ("tests/test_hostile_routes.py", "test_a_table_in_use_is_refused_not_flushed"):
        "the one-line refusal of a start (the process exits: no stream), and the "
        "operator's rp_filter notice",
    ("tests/test_keylog_tshark.py", "test_tshark_decrypts_ike_auth_and_esp_with_our_key_files"):
        "the warning at start that save_keys writes secrets (a message to the operator)",
    ("tests/test_hostile_live.py", "test_members_survive_the_32_byte_ike_datagram_flood"):
        "no Python traceback in the log (log hygiene, not an event)",
    ("tests/test_control_api.py", "test_sigterm_deletes_every_ike_sa_first"):
        "the stop report: on SIGTERM the control socket closes first, what the process "
        "does on its way out is only in its log (the peer's side is checked by state)",
    ("tests/test_control_strongswan.py", "test_sigterm_is_a_delete_strongswan_sees_at_once"):
        "the stop report (as above); charon's side is checked by its state",
    ("tests/test_cluster.py", "test_sigterm_to_the_dispatcher_stops_every_member"):
        "the stop report of the dispatcher: its stream ends with it",
    ("tests/test_cluster.py",
     "test_a_stalled_member_is_declared_dead_and_rejoins_as_a_new_incarnation"):
        "the log's own manners: a stale incarnation's return is logged once, not once "
        "per heartbeat (its death is learnt from MEMBER_DEAD)",
    ("tests/test_dispatcher_restart.py", "_stop_and_check_clean"):
        "no Python traceback in the log after the stop (log hygiene, not an event; the "
        "processes are gone, so no stream or status can say it)",
    ("tests/test_supervisor_exit.py", "test_kill_9_is_seen_at_once_and_no_pidfd_is_left_over"):
        "no Python traceback in the supervisor's log (log hygiene, not an event)",
    ("tests/test_supervisor_exit.py", "test_without_pidfds_the_poll_sees_the_exit"):
        "the one notice that exits are polled (a message to the operator, said once) and "
        "no traceback (log hygiene); the exit itself is learnt from MEMBER_DEAD",
    ("tests/test_outbound_tuns.py", "test_a_tun_that_cannot_be_made_leaves_the_dispatcher_path"):
        "a fallback is logged once with its reason (a message to the operator; the path "
        "taken is learnt from the inner_relayed counter)",
    ("tests/test_dispatcher_failover_strongswan.py",
     "test_kill_9_of_the_dispatcher_with_strongswan"):
        "no Python traceback in the cluster's log (log hygiene, not an event)",
    ("tests/test_twohost_strongswan.py", "diag"):
        "strongSwan's own log, shown when a check fails (a diagnosis, not a cluster event)",
    ("tests/test_twohost_strongswan.py", "test_the_active_host_stopped_with_strongswan"):
        "no Python traceback in the new active dispatcher's log (log hygiene, not an event)",
    ("tests/test_cluster_multihost.py", "test_members_on_other_hosts_over_curve"):
        "the refusal's log line itself (logger ipsec_cluster.zap, level WARNING) after the "
        "refusal was learnt from its counter",
    ("tests/test_cluster_rejoin.py", "test_a_member_with_other_timing_keys_exits_2_with_one_line"):
        "the one line a refused member leaves for its operator (it exits 2: no stream), "
        "after the refusal was learnt from its counter",
}


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    line: int
    function: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} in {self.function}: {self.what}"


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _log_read(node: ast.expr, logs: dict[str, str]) -> str | None:
    """What log ``node`` is the text of (its receiver), None if it is not one."""
    if isinstance(node, ast.Name):
        return logs.get(node.id)
    if isinstance(node, ast.Subscript):
        return _log_read(node.value, logs)
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    if isinstance(f, ast.Attribute):
        receiver = ast.unparse(f.value)
        if f.attr in LOG_READS:
            return receiver
        if f.attr == "read_text" and "log" in receiver.lower():
            return receiver
        if f.attr in STR_SEARCHES | {"lower", "strip", "decode"}:
            return _log_read(f.value, logs)
    if isinstance(f, ast.Name) and f.id == "tail" and node.args:
        return ast.unparse(node.args[0])
    return None


class _Scan(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.found: list[Finding] = []
        self.scope: list[str] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        logs: dict[str, str] = {}
        for n in ast.walk(node):
            if isinstance(n, ast.Assign | ast.NamedExpr):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                if len(targets) == 1 and isinstance(targets[0], ast.Name):
                    got = _log_read(n.value, logs)
                    if got is not None:
                        logs[targets[0].id] = got
        for n in ast.walk(node):
            self._check(n, logs)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def _add(self, node: ast.AST, what: str, receiver: str | None = None) -> None:
        if receiver is not None and STRONGSWAN.search(receiver):
            return
        function = self.scope[-1] if self.scope else "<module>"
        f = Finding(self.path, getattr(node, "lineno", 0), function, what)
        if f not in self.found:
            self.found.append(f)

    def _check(self, n: ast.AST, logs: dict[str, str]) -> None:
        if isinstance(n, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn)
                                              for op in n.ops):
            for side in n.comparators:
                if (got := _log_read(side, logs)) is not None:
                    self._add(n, f"`in` over the log of {got}: {ast.unparse(n)[:80]}", got)
        elif isinstance(n, ast.Call):
            name = _name(n.func)
            if name == "wait_log":
                self._add(n, f"wait_log: {ast.unparse(n)[:80]}")
                return
            if isinstance(n.func, ast.Attribute):
                if name in RE_SEARCHES:
                    on_re = isinstance(n.func.value, ast.Name) and n.func.value.id == "re"
                    args = n.args[1:2] if on_re else n.args[:1]
                    for a in args:
                        if (got := _log_read(a, logs)) is not None:
                            self._add(n, f"a regex over the log of {got}: "
                                         f"{ast.unparse(n)[:80]}", got)
                if name in STR_SEARCHES and (got := _log_read(n.func.value, logs)) is not None:
                    self._add(n, f".{name}() over the log of {got}: {ast.unparse(n)[:80]}", got)
            if name != "tail":
                for a in [*n.args, *(k.value for k in n.keywords)]:
                    if isinstance(a, ast.Attribute) and a.attr == "log_path":
                        self._add(n, f"a log handed to {name}(): {ast.unparse(n)[:80]}")


def scan_source(text: str, path: str = "<source>") -> list[Finding]:
    """Every place of ``text`` that learns something from a log's text."""
    scan = _Scan(path)
    scan.visit(ast.parse(text))
    return scan.found


def allowed(f: Finding) -> bool:
    return (f.path, f.function) in ALLOWED or (f.path, "*") in ALLOWED


def scan_tree() -> list[Finding]:
    out: list[Finding] = []
    for top in SCANNED:
        for file in sorted((ROOT / top).rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            out += scan_source(file.read_text(), rel)
    return out


# -- the tree ----------------------------------------------------------------------------


def test_no_test_and_not_the_demo_learns_a_cluster_event_from_a_log() -> None:
    bad = [f for f in scan_tree() if not allowed(f)]
    assert not bad, ("learnt from log text (wait for an event: Proc.wait_event, "
                     "ControlClient.wait_event; or read a counter of status/stats):\n"
                     + "\n".join(map(str, bad)))


def test_every_allowed_place_still_reads_a_log() -> None:
    """An exception nobody needs any more goes (the list stays the truth)."""
    used = {(f.path, f.function) for f in scan_tree()}
    used |= {(f.path, "*") for f in scan_tree()}
    stale = sorted(k for k in ALLOWED if k not in used)
    assert not stale, stale


# -- the scanner can fail ---------------------------------------------------------------------

FLAGGED = {
    "wait_log": """
def test_x(gw):
    gw.wait_log("gateway listening")
""",
    "in over log_text": """
def test_x(gw):
    assert "member 2 declared dead" in gw.log_text()
""",
    "in over a name holding the log": """
def test_x(disp):
    text = disp.log_text()
    assert "rekeyed into" in text
""",
    "a polling loop over read_text": """
def test_x(tmp_path):
    log = tmp_path / "gw.log"
    while "gateway listening" not in log.read_text():
        pass
""",
    "re.findall over the log": """
import re
def test_x(rig):
    ids = re.findall(r"sender id (\\d+)", rig.dispatcher.log_text())
""",
    "a compiled pattern over the log": """
import re
PAT = re.compile(r"took over (\\d+)")
def test_x(rig):
    log = rig.dispatcher.log_text()
    return PAT.search(log)
""",
    "count over the log": """
def test_x(s):
    assert s.cluster.log_text().count("established with") == 20
""",
    "splitlines over tail()": """
def f(proc):
    return [ln for ln in tail(proc.log_path).splitlines() if "dead" in ln]
""",
    "a log reader": """
class Demo:
    def setup(self):
        self.watch = LogWatch(self.cluster.log_path)
""",
}

PASSING = {
    "strongSwan's log": """
def test_x(charon, s):
    assert "AUTHENTICATION_FAILED" in charon.log_text()
    theirs = charon.log_text()
    assert "received DELETE" in theirs
    assert s.charon.log_text().count("initiating IKE_SA") == 1
""",
    "a diagnostic": """
def test_x(gw, res):
    assert res.ok, f"ping failed: {gw.log_text()[-3000:]}"
    wait_for("x", lambda: True, diag=lambda: tail(gw.log_path))
""",
    "an event": """
def test_x(gw):
    gw.wait_event(event_is(EventType.IKE_REKEYED), what="IKE_REKEYED")
""",
}


@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_the_scanner_flags(name: str) -> None:
    found = scan_source(FLAGGED[name], "tests/test_synthetic.py")
    assert found, name
    assert all(not allowed(f) for f in found)


@pytest.mark.parametrize("name", sorted(PASSING))
def test_the_scanner_passes(name: str) -> None:
    assert scan_source(PASSING[name], "tests/test_synthetic.py") == []


def test_an_allowed_place_is_one_file_and_function() -> None:
    src = FLAGGED["in over log_text"]
    (f,) = scan_source(src, "tests/test_logs.py")
    assert allowed(f)
    (g,) = scan_source(src, "tests/test_cluster.py")
    assert not allowed(g)
