"""Write docs/ike-states.md from the IKE core's tables (h11's
``docs/source/make-state-diagrams.py`` is the model).

    python docs/make_state_diagrams.py           # regenerate
    python docs/make_state_diagrams.py --check   # exit 1 if the file is stale

Three tables, one section each, each as a Mermaid ``stateDiagram-v2`` and as a
plain Markdown table:
- ``common.ike.context.IKE_TRANSITIONS``: (IkeState, IkeInput) -> IkeState
- ``common.ike.context.CHILD_TRANSITIONS``: (ChildState, ChildInput) -> ChildState
- ``common.ike.exchanges.dispatch.REQUEST_HANDLERS``: (IkeState, RequestKind) -> handler

Nothing here is written by hand except the entry points (where an SA starts
life, which is code in the exchanges, not a table row) and one line of prose
per section. If Debian's graphviz ``dot`` is on the PATH, PNG renderings are
written beside the Markdown as well (not in ``--check`` mode, never required).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUTPUT = DOCS / "ike-states.md"

if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from common.ike.child import ChildSa  # noqa: E402
from common.ike.context import (  # noqa: E402
    CHILD_TRANSITIONS,
    IKE_TRANSITIONS,
    TERMINAL,
    ChildInput,
    ChildState,
    IkeInput,
    IkeState,
)
from common.ike.exchanges.dispatch import REQUEST_HANDLERS  # noqa: E402

#: (state, input) -> state; the key is invariant, so Any stands for each enum.
Transitions = Mapping[tuple[Any, Any], Enum]

#: Where an IKE SA starts, and what creates it in that state.
IKE_ENTRIES: dict[Enum, str] = {
    IkeState.INIT_SENT: "engine.initiate()",
    IkeState.HALF_OPEN: "IKE_SA_INIT request answered",
    IkeState.ESTABLISHED: "new SA of an IKE rekey",
}

#: The state a ChildSa is created in (the dataclass default, read from the code).
CHILD_INITIAL = ChildState(ChildSa.__dataclass_fields__["state"].default)


@dataclass(frozen=True)
class Machine:
    """One table, ready to print: edges in table order, labels merged per
    (source, target) pair."""

    title: str
    slug: str
    intro: str
    states: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], str]
    edges: dict[tuple[str, str], list[str]]
    entries: dict[str, str]
    terminals: list[str]
    node_labels: dict[str, str]
    column_title: str = "input"


def _edges(rows: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for source, label, target in rows:
        edges.setdefault((source, target), []).append(label)
    return edges


def _state_machine(title: str, slug: str, intro: str, table: Transitions,
                   states: Iterable[Enum], inputs: Iterable[Enum], entries: dict[Enum, str],
                   terminals: Iterable[Enum]) -> Machine:
    rows = [(s.name, i.name, t.name) for (s, i), t in table.items()]
    return Machine(
        title, slug, intro, [s.name for s in states], [i.name for i in inputs],
        {(s, i): t for s, i, t in rows}, _edges(rows),
        {s.name: label for s, label in entries.items()}, [s.name for s in terminals], {})


def _handler_name(handler: Callable[..., object]) -> str:
    return f"{handler.__module__.rsplit('.', 1)[-1]}.{handler.__name__}"


def _node_id(name: str) -> str:
    return "h_" + name.replace(".", "_")


REFUSED = "refused"


def _dispatch_machine() -> Machine:
    table = {(state.name, kind.value): h for (state, kind), h in REQUEST_HANDLERS.items()}
    kinds = list(dict.fromkeys(kind for _state, kind in table))
    rows = [(state, kind, _node_id(_handler_name(h))) for (state, kind), h in table.items()]
    labels = {_node_id(_handler_name(h)): _handler_name(h) for h in table.values()}
    labels[REFUSED] = "refused: UnexpectedExchange, N(INVALID_SYNTAX)"
    used = {state for state, _kind in table}
    rows += [(s.name, "anything else" if s.name in used else "any request", REFUSED)
             for s in IkeState if s not in TERMINAL]
    cells = {(state, kind): _handler_name(h) for (state, kind), h in table.items()}
    intro = ("Requests from the peer on an existing IKE SA, keyed by the SA's state and "
             "the kind of request (`classify()` in `common/ike/exchanges/dispatch.py`). "
             "A pair that is not in the table raises `UnexpectedExchange`, answered with "
             "N(INVALID_SYNTAX); so does the kind `other` (any exchange type that is not "
             "IKE_AUTH, CREATE_CHILD_SA or INFORMATIONAL). A first IKE_SA_INIT (responder "
             "SPI zero) never reaches this table: the engine hands it to "
             "`ike_init.handle_init_request`. Retransmitted requests never reach it either: "
             "the message-ID manager answers them with the cached response. Datagrams for an "
             "SA in a terminal state are dropped by the engine (counted as `unknown_spi`).")
    return Machine("Request dispatch table", "dispatch", intro, [s.name for s in IkeState],
                   kinds, cells, _edges(rows), {}, [], labels, "request kind")


def machines() -> list[Machine]:
    child_terminals = [s for s in ChildState if not any(k[0] is s for k in CHILD_TRANSITIONS)]
    return [
        _state_machine(
            "IKE SA states", "ike", "`IKE_TRANSITIONS` in `common/ike/context.py`. `IkeSa.apply()` "
            "looks the pair up; a pair that is not in the table moves the SA to FAILED and "
            "raises `LocalProtocolError` (a bug in the core, not a peer error).",
            IKE_TRANSITIONS, IkeState, IkeInput, IKE_ENTRIES,
            [s for s in IkeState if s in TERMINAL]),
        _state_machine(
            "Child SA states", "child", "`CHILD_TRANSITIONS` in `common/ike/context.py`. "
            "`ChildSa.apply()` looks the pair up; a pair that is not in the table raises "
            "`LocalProtocolError` and leaves the state unchanged.",
            CHILD_TRANSITIONS, ChildState, ChildInput,
            {CHILD_INITIAL: "child SA installed"}, child_terminals),
        _dispatch_machine(),
    ]


# -- Markdown -----------------------------------------------------------------------


def _mermaid(m: Machine) -> list[str]:
    out = ["```mermaid", "stateDiagram-v2"]
    for node, label in m.node_labels.items():
        out.append(f'    state "{label}" as {node}')
    for state in m.states:
        out.append(f"    {state}")
    for state, label in m.entries.items():
        out.append(f"    [*] --> {state} : {label}")
    for (source, target), labels in m.edges.items():
        out.append(f"    {source} --> {target} : {', '.join(labels)}")
    for state in m.terminals:
        out.append(f"    {state} --> [*]")
    out.append("```")
    return out


def _matrix(m: Machine) -> list[str]:
    head = f"| state \\ {m.column_title} | " + " | ".join(f"`{c}`" for c in m.columns) + " |"
    out = [head, "|---" * (len(m.columns) + 1) + "|"]
    for state in m.states:
        cells = [m.cells.get((state, c), "") for c in m.columns]
        out.append(f"| **{state}** | " + " | ".join(f"{c}" if c else "·" for c in cells) + " |")
    return out


def render() -> str:
    lines = [
        "<!-- Generated by docs/make_state_diagrams.py from the tables in common/ike/.",
        "     Do not edit: run `python docs/make_state_diagrams.py`. -->",
        "# IKE state machines",
        "",
        "Generated from the code; the design around them is in [ike.md](ike.md).",
        "Each section has a Mermaid diagram and the same table as a plain matrix",
        "(`·` = no entry). If graphviz `dot` was installed when this was generated,",
        "PNG renderings `ike-states-*.png` sit beside this file.",
    ]
    for m in machines():
        lines += ["", f"## {m.title}", "", m.intro, "", *_mermaid(m), "", *_matrix(m)]
        if m.entries:
            lines += ["", "Entry points: " + "; ".join(
                f"{s} ({label})" for s, label in m.entries.items()) + "."]
        if m.terminals:
            lines += ["Terminal states: " + ", ".join(m.terminals) + "."]
    return "\n".join(lines) + "\n"


# -- graphviz (optional) --------------------------------------------------------------


def _dot(m: Machine) -> str:
    out = ["digraph {", "  rankdir=LR;", '  node [shape=box, style=rounded, fontname="Helvetica"];',
           '  edge [fontname="Helvetica", fontsize=10];', '  start [shape=point];']
    for node, label in m.node_labels.items():
        out.append(f'  {node} [label="{label}", shape=note];')
    for state in m.states:
        shape = ', peripheries=2' if state in m.terminals else ""
        out.append(f'  {state} [label="{state}"{shape}];')
    for state, label in m.entries.items():
        out.append(f'  start -> {state} [label="{label}", style=dashed];')
    for (source, target), labels in m.edges.items():
        out.append(f'  {source} -> {target} [label="{chr(10).join(labels)}"];')
    out.append("}")
    return "\n".join(out) + "\n"


def render_pngs(dot: str) -> list[Path]:
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in machines():
            src = Path(tmp) / f"{m.slug}.dot"
            src.write_text(_dot(m))
            png = DOCS / f"ike-states-{m.slug}.png"
            subprocess.run([dot, "-Tpng", str(src), "-o", str(png)], check=True)
            written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if {OUTPUT.name} differs from the tables")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(),
                                    str(OUTPUT), "generated", lineterm="")
        print("\n".join(list(diff)[:60]))
        print(f"{OUTPUT} is out of date: run python docs/make_state_diagrams.py",
              file=sys.stderr)
        return 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    dot = shutil.which("dot")
    if dot is not None:
        for png in render_pngs(dot):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
