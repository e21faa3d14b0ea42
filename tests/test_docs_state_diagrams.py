"""docs/ike-states.md is generated from the IKE core's tables and can never
drift from them (the generator runs here in ``--check`` mode)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import ModuleType

import pytest

from common.ike.context import ChildInput, ChildState, IkeInput, IkeState
from common.ike.exchanges.dispatch import REQUEST_HANDLERS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "make_state_diagrams.py"
DOC = ROOT / "docs" / "ike-states.md"


def _table() -> dict[tuple[str, str], Callable[..., object]]:
    """The dispatch table by state name and request kind, as the doc shows it."""
    return {(state.name, kind.value): h for (state, kind), h in REQUEST_HANDLERS.items()}


def _load_generator(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_state_diagrams", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _section(title: str) -> str:
    """The text of one ``## title`` section of the generated doc."""
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_generated_doc_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (
        "docs/ike-states.md is stale; run `python docs/make_state_diagrams.py`\n"
        + result.stdout + result.stderr)


def test_check_mode_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _load_generator(monkeypatch)
    stale = tmp_path / "ike-states.md"
    stale.write_text(gen.render().replace("REKEY_STARTED", "REKEY_BEGUN", 1))
    monkeypatch.setattr(gen, "OUTPUT", stale)
    assert gen.main(["--check"]) == 1
    stale.write_text(gen.render())
    assert gen.main(["--check"]) == 0


@pytest.mark.parametrize(("title", "enums"), [
    ("IKE SA states", (IkeState, IkeInput)),
    ("Child SA states", (ChildState, ChildInput)),
    ("Request dispatch table", (IkeState,)),
])
def test_every_state_and_input_is_in_its_section(title: str, enums: tuple[type[Enum], ...]) -> None:
    section = _section(title)
    assert "```mermaid\nstateDiagram-v2\n" in section
    for enum in enums:
        for member in enum:
            assert f"| **{member.name}** |" in section or f"`{member.name}`" in section, (
                f"{enum.__name__}.{member.name} missing from '{title}'")


def test_every_state_has_a_matrix_row() -> None:
    for title, states in (("IKE SA states", IkeState), ("Child SA states", ChildState),
                          ("Request dispatch table", IkeState)):
        section = _section(title)
        for state in states:
            assert f"| **{state.name}** |" in section, f"{state.name} has no row in '{title}'"


def test_dispatch_table_names_real_states() -> None:
    # The dispatch table is keyed by state *names*: a typo would make a
    # handler unreachable without any error.
    names = {s.name for s in IkeState}
    assert {state for state, _kind in _table()} <= names


def test_every_dispatch_entry_is_drawn() -> None:
    section = _section("Request dispatch table")
    for (state, kind), handler in _table().items():
        name = f"{handler.__module__.rsplit('.', 1)[-1]}.{handler.__name__}"
        node = "h_" + name.replace(".", "_")
        edges = [line for line in section.splitlines()
                 if line.strip().startswith(f"{state} --> {node} : ")]
        assert len(edges) == 1 and kind in edges[0].split(" : ", 1)[1].split(", ")
