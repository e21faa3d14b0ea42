"""common/ is pure logic: no I/O, no clock, no global randomness
(docs/design.md "Code conventions")."""

from __future__ import annotations

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parent.parent / "common"
FORBIDDEN = {"socket", "asyncio", "uvloop", "zmq", "time", "select", "selectors",
             "subprocess", "threading", "random", "secrets"}


def _violations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "os":
                names += [f"os.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in FORBIDDEN or name == "os.urandom":
                found.append(f"{path}:{node.lineno} imports {name}")
        if isinstance(node, ast.Attribute) and node.attr == "urandom":
            found.append(f"{path}:{node.lineno} uses .urandom")
        if isinstance(node, ast.Name) and node.id == "urandom":
            found.append(f"{path}:{node.lineno} uses urandom")
    return found


def test_common_has_its_subpackages() -> None:
    """The checks below walk these (an empty walk would pass by itself)."""
    for sub in ("ike", "esp", "cluster"):
        assert (COMMON / sub / "__init__.py").exists()
    assert (COMMON / "esp" / "transforms.py").exists()


def test_common_imports_no_io_clock_or_randomness() -> None:
    violations = [v for path in sorted(COMMON.rglob("*.py")) for v in _violations(path)]
    assert violations == []


def test_checker_catches_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom asyncio import sleep\nimport os\nos.urandom(4)\n"
                   "from os import urandom\nimport zmq.asyncio\n")
    found = "\n".join(_violations(bad))
    for culprit in ("imports time", "imports asyncio", "uses .urandom", "imports os.urandom",
                    "imports zmq.asyncio"):
        assert culprit in found
