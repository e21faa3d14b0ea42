"""The architecture as tests (docs/design.md "Module map").

The import graph of the project's own packages (common, member, dispatcher,
bench), computed from the source with ``ast``. Every import counts: at module
level, inside functions, under ``if TYPE_CHECKING:``, and
``importlib.import_module`` with a literal name. Each is a dependency a reader
has to follow; a function-level import that dodges a cycle at run time is still
the cycle. Relative imports are resolved against the importing module's
package, and ``from pkg import name`` means the module ``pkg.name`` when there
is one, else ``pkg`` itself. Importing ``a.b.c`` counts as a dependency on
``a.b.c`` only, not on the packages ``a`` and ``a.b`` that Python initialises
on the way (their ``__init__`` modules would otherwise be part of every cycle
through a package).

The rules: no cycle between modules; dependencies point one way, common <-
member <- dispatcher, with bench (the harness and the benchmarks) on top; the
product never imports the test suite.

And docs/ stands alone and tells the truth about the tree: docs/*.md and
README.md point nowhere outside the repository, every path they name exists,
and every ``docs/X.md "Section"`` that a file cites is a section of X.md.

Each checker also runs on synthetic trees in tmp_path, so each one can fail.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the project's packages, lowest layer first: a module may import its own
#: layer and the layers below it, never one above
LAYERS = ("common", "member", "dispatcher", "bench")
#: top-level names the product (every layer below bench) never imports
NEVER_IMPORTED = ("tests",)

MODULE, FUNCTION, TYPE_CHECKING_, DYNAMIC = "module", "function", "type-checking", "dynamic"


# -- the import graph -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement's dependency: ``src`` imports ``dst``.

    ``dst`` is a module of the project when it names one (resolved to the
    longest existing module), else the absolute name as written."""

    src: str
    dst: str
    path: str
    line: int
    where: str  # MODULE, FUNCTION, TYPE_CHECKING_ or DYNAMIC

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.src} -> {self.dst} ({self.where})"


def find_modules(root: Path, packages: Iterable[str] = LAYERS) -> dict[str, Path]:
    """Dotted module name -> file, for every .py (and stub-only .pyi, e.g. a C
    extension's) under the packages."""
    found: dict[str, Path] = {}
    for package in packages:
        base = root / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py*")):
            if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
                continue
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            if name not in found or found[name].suffix == ".pyi":
                found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Every import node of one module, with where it sits."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom | ast.Call, str]] = []
        self._scopes: list[str] = []

    @property
    def where(self) -> str:
        if TYPE_CHECKING_ in self._scopes:
            return TYPE_CHECKING_
        return FUNCTION if FUNCTION in self._scopes else MODULE

    def _inside(self, scope: str, nodes: Iterable[ast.AST]) -> None:
        self._scopes.append(scope)
        for node in nodes:
            self.visit(node)
        self._scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for sub in (*node.decorator_list, node.args):
            self.visit(sub)
        self._inside(FUNCTION, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._inside(TYPE_CHECKING_, node.body)
            for sub in node.orelse:
                self.visit(sub)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self.where))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self.where))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and not node.args[0].value.startswith("."):
            self.found.append((node, DYNAMIC))
        self.generic_visit(node)


def _known(name: str, modules: Mapping[str, Path], tops: set[str]) -> str:
    """The longest module of the project that ``name`` starts with; ``name``
    itself when it is not in the project."""
    parts = name.split(".")
    if parts[0] not in tops:
        return name
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if parts else name


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom | ast.Call,
             modules: Mapping[str, Path], tops: set[str]) -> list[str]:
    if isinstance(node, ast.Call):
        first = node.args[0]
        literal = first.value if isinstance(first, ast.Constant) else None
        return [_known(literal, modules, tops)] if isinstance(literal, str) else []
    if isinstance(node, ast.Import):
        return [_known(alias.name, modules, tops) for alias in node.names]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        if node.level - 1 >= len(package):
            return []  # beyond the top-level package: an ImportError, not a dependency
        base = package[:len(package) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = []
    for alias in node.names:
        submodule = f"{prefix}.{alias.name}"
        out.append(_known(submodule if submodule in modules else prefix, modules, tops))
    return out


def imports_of(root: Path, packages: Iterable[str] = LAYERS) -> list[Import]:
    """Every import of every module of the packages (self-imports left out)."""
    packages = tuple(packages)
    modules = find_modules(root, packages)
    tops = set(packages)
    found = []
    for module, path in modules.items():
        collector = _Collector()
        collector.visit(ast.parse(path.read_text(), str(path)))
        rel = str(path.relative_to(root))
        for node, where in collector.found:
            for dst in _targets(module, path.stem == "__init__", node, modules, tops):
                if dst and dst != module:
                    found.append(Import(module, dst, rel, node.lineno, where))
    return found


def graph_of(imports: Iterable[Import], modules: Iterable[str]) -> dict[str, dict[str, Import]]:
    """module -> {module it imports: the first import that says so}, between
    the project's modules only."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.dst in graph:
            graph[imp.src].setdefault(imp.dst, imp)
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on a deep graph):
    the components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def shortest_cycle(graph: Mapping[str, Iterable[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, closed:
    ``[a, b, ..., a]``."""
    start, inside = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ not in inside:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"no cycle through {start} in {component}")  # not strongly connected


def cycle_reports(imports: list[Import], modules: Iterable[str]) -> list[str]:
    """One line per cycle: its modules in order, and the import of each step."""
    graph = graph_of(imports, modules)
    reports = []
    for component in strongly_connected(graph):
        cycle = shortest_cycle(graph, component)
        steps = "; ".join(str(graph[a][b]) for a, b in itertools.pairwise(cycle))
        more = f" (the strongly connected set: {', '.join(component)})" \
            if len(component) > len(cycle) - 1 else ""
        reports.append(f"cycle {' -> '.join(cycle)}{more}: {steps}")
    return reports


def layer_violations(imports: Iterable[Import]) -> list[str]:
    """Imports against common <- member <- dispatcher <- bench, and of what the
    product must never import."""
    rank = {package: i for i, package in enumerate(LAYERS)}
    found = []
    for imp in imports:
        src, dst = imp.src.split(".")[0], imp.dst.split(".")[0]
        if dst in NEVER_IMPORTED and src in rank and rank[src] < rank["bench"]:
            found.append(f"{imp}: {src} must not import {dst}")
        elif src in rank and dst in rank and rank[dst] > rank[src]:
            found.append(f"{imp}: {src} must not import {dst}")
    return found


# -- the project's own tree -------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> tuple[list[Import], dict[str, Path]]:
    return imports_of(ROOT), find_modules(ROOT)


def test_the_graph_covers_every_package(project: tuple[list[Import], dict[str, Path]]) -> None:
    """The checks below walk a real graph (an empty one would pass by itself)."""
    imports, modules = project
    for package in LAYERS:
        assert sum(m.startswith(f"{package}.") for m in modules) >= 5, package
    edges = {(i.src, i.dst) for i in imports}
    assert ("dispatcher.gateway", "member.worker") in edges
    assert ("common.cluster.snapshot", "common.cluster.sync") in edges
    assert any(i.dst == "common.esp._esp_fast" for i in imports)  # a stub-only module
    assert {i.where for i in imports} >= {MODULE, FUNCTION}


def test_no_import_cycles(project: tuple[list[Import], dict[str, Path]]) -> None:
    imports, modules = project
    cycles = cycle_reports(imports, modules)
    assert not cycles, "\n".join(cycles)


def test_dependencies_point_one_way(project: tuple[list[Import], dict[str, Path]]) -> None:
    """common <- member <- dispatcher; bench on top; the product imports no tests."""
    imports, _ = project
    violations = layer_violations(imports)
    assert not violations, "\n".join(violations)


# -- the checker on synthetic trees ----------------------------------------------------


def _tree(root: Path, files: Mapping[str, str]) -> Path:
    """Write a tree of packages (every folder gets an __init__.py)."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in path.relative_to(root).parents:
            if folder != Path("."):
                (root / folder / "__init__.py").touch()
        path.write_text(text)
    return root


def _edges(root: Path) -> set[tuple[str, str, str]]:
    return {(i.src, i.dst, i.where) for i in imports_of(root)}


def _cycles(root: Path) -> list[str]:
    return cycle_reports(imports_of(root), find_modules(root))


def test_relative_imports_and_from_package_import_module_resolve(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "common/ike/sa.py": "from . import keys\nfrom .msgid import MessageIds\n"
                            "from .. import buffer\nfrom ..cluster import spi\n"
                            "from ..cluster.sync import State\n",
        "common/ike/keys.py": "",
        "common/ike/msgid.py": "",
        "common/ike/__init__.py": "from .keys import derive\nfrom . import msgid\n",
        "common/buffer.py": "from common.ike import sa, NAME\nimport common.cluster.sync as s\n",
        "common/cluster/spi.py": "import os\nfrom typing import Any\n",
        "common/cluster/sync.py": "from common import buffer\n",
    })
    assert _edges(root) == {
        ("common.ike.sa", "common.ike.keys", MODULE),
        ("common.ike.sa", "common.ike.msgid", MODULE),
        ("common.ike.sa", "common.buffer", MODULE),
        ("common.ike.sa", "common.cluster.spi", MODULE),
        ("common.ike.sa", "common.cluster.sync", MODULE),
        ("common.ike", "common.ike.keys", MODULE),
        ("common.ike", "common.ike.msgid", MODULE),
        ("common.buffer", "common.ike.sa", MODULE),
        ("common.buffer", "common.ike", MODULE),      # NAME is not a module: the package
        ("common.buffer", "common.cluster.sync", MODULE),
        ("common.cluster.spi", "os", MODULE),
        ("common.cluster.spi", "typing", MODULE),
        ("common.cluster.sync", "common.buffer", MODULE),
    }


def test_function_level_type_checking_and_dynamic_imports_are_seen(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "member/a.py": "from typing import TYPE_CHECKING\n"
                       "import typing\n"
                       "if TYPE_CHECKING:\n    from member import b\n"
                       "else:\n    from member import c\n"
                       "if typing.TYPE_CHECKING:\n    import member.d\n"
                       "def f():\n    from member import e\n"
                       "    if TYPE_CHECKING:\n        import member.b\n"
                       "class K:\n    async def g(self):\n        import member.c\n"
                       "    def h(self):\n        return importlib.import_module('member.e')\n",
        "member/b.py": "", "member/c.py": "", "member/d.py": "", "member/e.py": "",
    })
    assert {e for e in _edges(root) if e[1].startswith("member.")} == {
        ("member.a", "member.b", TYPE_CHECKING_),
        ("member.a", "member.c", MODULE),
        ("member.a", "member.d", TYPE_CHECKING_),
        ("member.a", "member.e", FUNCTION),
        ("member.a", "member.c", FUNCTION),
        ("member.a", "member.e", DYNAMIC),
    }


@pytest.mark.parametrize("where, text", [
    (MODULE, "from common.ike import b\n"),
    (FUNCTION, "def f():\n    from common.ike import b\n"),
    (TYPE_CHECKING_, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"),
])
def test_a_cycle_is_caught_and_its_modules_named(tmp_path: Path, where: str, text: str) -> None:
    root = _tree(tmp_path, {
        "common/ike/a.py": text,
        "common/ike/b.py": "from common.ike.c import X\n",
        "common/ike/c.py": "import common.ike.a\n",
        "common/ike/leaf.py": "from common.ike import a, b, c\n",
    })
    reports = _cycles(root)
    assert len(reports) == 1, reports
    assert reports[0].startswith("cycle common.ike.a -> common.ike.b -> common.ike.c -> "
                                 "common.ike.a: ")
    assert f"common/ike/a.py:{text.count(chr(10))} common.ike.a -> common.ike.b ({where})" \
        in reports[0]
    assert "common.ike.leaf" not in reports[0]


def test_every_cycle_is_reported_once_with_a_shortest_path(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "dispatcher/gateway.py": "from dispatcher import metrics\n",
        "dispatcher/metrics.py": "def f():\n    from dispatcher.gateway import Gateway\n",
        "common/x.py": "from common import y, z\n",
        "common/y.py": "from common import x\n",
        "common/z.py": "from common import w\n",
        "common/w.py": "from common import x\n",
        "common/ok.py": "from common import x\n",
    })
    reports = _cycles(root)
    assert len(reports) == 2, reports
    assert reports[0].startswith("cycle common.w -> common.x -> common.z -> common.w "
                                 "(the strongly connected set: common.w, common.x, "
                                 "common.y, common.z)")
    assert reports[1].startswith("cycle dispatcher.gateway -> dispatcher.metrics -> "
                                 "dispatcher.gateway: ")
    assert "(function)" in reports[1]


def test_a_tree_without_cycles_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "common/a.py": "from common import b, c\n",
        "common/b.py": "from common import c\n",
        "common/c.py": "import common\n",
        "member/m.py": "from common import a\nfrom . import n\n",
        "member/n.py": "",
    })
    assert _cycles(root) == []


@pytest.mark.parametrize("src, text, culprit", [
    ("member/x.py", "from dispatcher.gateway import Gateway\n",
     "member must not import dispatcher"),
    ("member/x.py", "def f():\n    import dispatcher.cli\n", "member must not import dispatcher"),
    ("common/x.py", "import dispatcher\n", "common must not import dispatcher"),
    ("common/x.py", "from member import worker\n", "common must not import member"),
    ("common/ike/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from member.worker import Member\n", "common must not import member"),
    ("common/x.py", "from bench import demo\n", "common must not import bench"),
    ("member/x.py", "import bench.harness\n", "member must not import bench"),
    ("dispatcher/x.py", "def f():\n    from bench.demo import main\n",
     "dispatcher must not import bench"),
    ("dispatcher/x.py", "from tests.cluster_util import Procs\n",
     "dispatcher must not import tests"),
])
def test_each_kind_of_layer_violation_is_caught(tmp_path: Path, src: str, text: str,
                                                culprit: str) -> None:
    root = _tree(tmp_path, {
        src: text,
        "dispatcher/gateway.py": "", "dispatcher/cli.py": "", "member/worker.py": "",
        "bench/demo.py": "", "bench/harness/procs.py": "",
    })
    found = layer_violations(imports_of(root))
    assert len(found) == 1, found
    assert found[0].startswith(f"{src}:{text.count(chr(10))} ")
    assert found[0].endswith(culprit)


def test_imports_down_the_layers_are_allowed(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "common/c.py": "import os\nfrom common import d\n", "common/d.py": "",
        "member/m.py": "from common import c\nimport zmq\n",
        "dispatcher/d.py": "from member import m\nfrom common.c import X\n",
        "bench/b.py": "from dispatcher import d\nfrom member import m\nimport common\n"
                      "from tests.cluster_util import ROOT\n",
    })
    assert layer_violations(imports_of(root)) == []


# -- docs/ stands alone and tells the truth about the tree -----------------------------


def _docs() -> list[Path]:
    return [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


#: what points outside the repository: the design notes and style guide the
#: project grew from, the shared folder beside it, the machine's work paths
OUTSIDE = re.compile(r"\b(?:DESIGN|STYLE)\.md\b|\.\./shared\b|/work/|\bseed/rfc")


def outside_references(text: str) -> list[str]:
    return [m.group(0) for m in OUTSIDE.finditer(text)]


def test_docs_point_nowhere_outside_the_repository() -> None:
    found = [f"{path.relative_to(ROOT)}: {ref}" for path in _docs()
             for ref in outside_references(path.read_text())]
    assert not found, "\n".join(found)


def test_code_points_nowhere_outside_the_repository() -> None:
    here = Path(__file__).resolve()
    found = []
    for folder in (*LAYERS, "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() != here:
                found += [f"{path.relative_to(ROOT)}: {ref}"
                          for ref in outside_references(path.read_text())]
    assert not found, "\n".join(found)


def test_outside_references_are_caught() -> None:
    assert outside_references("see DESIGN.md and ../shared/STYLE.md, or "
                              "/work/shared/seed/rfc6027.txt") == \
        ["DESIGN.md", "../shared", "STYLE.md", "/work/", "seed/rfc"]
    assert outside_references("docs/design.md, RFC 6027 §3.9, /dev/net/tun") == []


#: a path in the tree: starts at one of the repository's top-level folders
_TOP = r"(?:common|member|dispatcher|bench|tests|docs|examples|scripts|\.ci)"
#: in a code span or a link target: any such path; in prose: one with a file
#: suffix or a closing slash (prose says "the dispatcher/member wire")
_IN_CODE = re.compile(rf"`({_TOP}/[^`\s:]*)|\]\(({_TOP}/[^)\s#]*)")
_SUFFIX = r"\.(?:py|pyi|c|md|toml|json|png|service|sh)"
_IN_PROSE = re.compile(rf"(?<![\w/.-])({_TOP}/[\w*./-]*(?:{_SUFFIX}|/))(?![\w/-])")


def named_paths(text: str) -> set[str]:
    """Every repository path a Markdown text names (``*`` as a glob)."""
    found = {a or b for a, b in _IN_CODE.findall(text)} | set(_IN_PROSE.findall(text))
    return {p.rstrip(".,;)") for p in found if p.rstrip(".,;)/")}


def missing_paths(root: Path, paths: Iterable[str]) -> list[str]:
    missing = []
    for path in sorted(paths):
        if "*" in path:
            if not any(root.glob(path.rstrip("/"))):
                missing.append(path)
        elif not (root / path).exists():
            missing.append(path)
    return missing


def test_every_path_the_docs_name_exists() -> None:
    found = [f"{path.relative_to(ROOT)}: {name}" for path in _docs()
             for name in missing_paths(ROOT, named_paths(path.read_text()))]
    assert not found, "\n".join(found)


#: a Markdown link: its target file (empty: this page) and anchor; not web addresses
_LINK = re.compile(r"\]\((?!https?:|mailto:)([^)\s#]*)(?:#([^)\s]*))?\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces
    to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def broken_links(path: Path, root: Path) -> list[str]:
    """The relative links of a Markdown file whose file or heading is missing
    (or that leave the repository)."""
    broken = []
    for target, fragment in _LINK.findall(path.read_text()):
        dest = (path.parent / target).resolve() if target else path
        if not dest.is_relative_to(root.resolve()) or not dest.exists():
            broken.append(target)
        elif fragment and dest.suffix == ".md" \
                and fragment not in {anchor(h) for h in _headings(dest.read_text())}:
            broken.append(f"{target}#{fragment}")
    return broken


def test_every_relative_link_in_the_docs_resolves() -> None:
    found = [f"{path.relative_to(ROOT)}: {link}" for path in _docs()
             for link in broken_links(path, ROOT)]
    assert not found, "\n".join(found)


def test_broken_links_are_caught(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "docs/a.md": "# A\n\n## Engine, IKE SA, tasks\n\n## `[pools.NAME]`: pools\n",
        "docs/b.md": "# B\n\n[a](a.md) [t](a.md#engine-ike-sa-tasks) [p](a.md#poolsname-pools) "
                     "[gone](gone.md) [x](a.md#gone) [self](#b) [s2](#nope) "
                     "[out](../../x.md) [web](https://example.org/#x)\n"})
    assert broken_links(tmp_path / "docs" / "b.md", tmp_path) == [
        "gone.md", "a.md#gone", "#nope", "../../x.md"]


def test_the_docs_name_the_main_modules() -> None:
    """The path check above walks real names (none found would pass by itself)."""
    named = set().union(*(named_paths(path.read_text()) for path in _docs()))
    for path in ("common/esp/iv.py", "common/cluster/spi.py", "member/replication.py",
                 "dispatcher/cli.py", "bench/demo/scenario.py"):
        assert path in named


def test_missing_paths_are_caught(tmp_path: Path) -> None:
    _tree(tmp_path, {"common/esp/iv.py": "", "tests/test_iv.py": ""})
    text = ("`common/esp/iv.py`, `common/esp/ivs.py`, [x](common/esp/gone.py), "
            "`tests/test_i*.py`, `tests/test_x*.py`, member/old.py. The dispatcher/member "
            "wire, `common/esp/iv.py::IvGenerator`, `common/esp/`, bench/harness/.")
    assert named_paths(text) == {"common/esp/iv.py", "common/esp/ivs.py", "common/esp/gone.py",
                                 "tests/test_i*.py", "tests/test_x*.py", "member/old.py",
                                 "common/esp/", "bench/harness/"}
    assert missing_paths(tmp_path, named_paths(text)) == [
        "bench/harness/", "common/esp/gone.py", "common/esp/ivs.py", "member/old.py",
        "tests/test_x*.py"]


def _headings(markdown: str) -> list[str]:
    """The headings of a Markdown text (not the comments of its code blocks)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*$", line)):
            out.append(m.group(1).replace("`", ""))
    return out


#: ``docs/X.md "Section"`` (or ``X.md, "Section"``), across line breaks and
#: comment markers (the whitespace is normalised first)
_CITATION = re.compile(r"(?<![\w/])((?:docs/)?[\w-]+\.md),?\s+\"([^\"]+)\"")


def cited_sections(text: str) -> list[tuple[str, str]]:
    """(file, section) pairs cited in a text, its line breaks, comment markers
    and docstring indentation folded to single spaces."""
    flat = re.sub(r"\s*\n\s*(?:#+\s*)?", " ", text)
    return [(doc if doc.startswith("docs/") or doc == "README.md" else f"docs/{doc}", section)
            for doc, section in _CITATION.findall(flat)]


def section_exists(root: Path, doc: str, section: str) -> bool:
    """A heading of the file that is the section's name or starts with it
    (a heading may go on: "Selector checks (RFC 4301 §5.2, both directions)")."""
    path = root / doc
    if not path.exists():
        return False
    want = section.lower()
    return any(h == want or h.startswith((f"{want} (", f"{want}:", f"{want},"))
               for h in (h.lower() for h in _headings(path.read_text())))


def test_every_cited_docs_section_exists() -> None:
    files = [p for folder in (*LAYERS, "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    files += [*_docs(), ROOT / "Makefile", ROOT / "pyproject.toml"]
    here = Path(__file__).resolve()
    cited = [(path, doc, section) for path in files if path.resolve() != here
             for doc, section in cited_sections(path.read_text())]
    assert len(cited) >= 10  # the check walks real citations
    missing = [f"{path.relative_to(ROOT)}: {doc} \"{section}\"" for path, doc, section in cited
               if not section_exists(ROOT, doc, section)]
    assert not missing, "\n".join(missing)


def test_missing_sections_are_caught(tmp_path: Path) -> None:
    _tree(tmp_path, {"docs/design.md": "# Design\n\n## Code conventions\n\n"
                                       "### Selector checks (RFC 4301)\n"})
    text = ('"""The one place (docs/design.md "Code\n    conventions").\n'
            '# see docs/design.md "Selector checks" and docs/design.md\n'
            '# "Trust model", design.md, "Selector", docs/gone.md "Code conventions"\n')
    cited = cited_sections(text)
    assert cited == [("docs/design.md", "Code conventions"), ("docs/design.md", "Selector checks"),
                     ("docs/design.md", "Trust model"), ("docs/design.md", "Selector"),
                     ("docs/gone.md", "Code conventions")]
    assert [section_exists(tmp_path, d, s) for d, s in cited] == [True, True, False, False, False]


#: RFC 6027's problems (§3.1-3.9) and its security considerations (§4), each of
#: which docs/failover.md maps to a module
RFC_6027_PROBLEMS = ("§3.1", "§3.2", "§3.3", "§3.4", "§3.5", "§3.6", "§3.7", "§3.7.1", "§3.8",
                     "§3.9", "§4")


def rfc_6027_map(markdown: str) -> dict[str, list[list[str]]]:
    """docs/failover.md's map: section -> for each row, the paths of its
    "solved in" column."""
    body = markdown.split("## The map", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[list[str]]] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("§"):
            rows.setdefault(cells[0], []).append(re.findall(r"`([\w/.]+\.py)`", cells[2]))
    return rows


def test_every_rfc_6027_problem_points_to_one_module() -> None:
    rows = rfc_6027_map((ROOT / "docs" / "failover.md").read_text())
    assert sorted(rows) == sorted(RFC_6027_PROBLEMS)
    for section, solved_in in rows.items():
        for paths in solved_in:
            assert len(paths) == 1, (section, paths)
            assert (ROOT / paths[0]).is_file(), (section, paths[0])


def test_the_rfc_6027_map_check_can_fail() -> None:
    text = ("## The map\n\n| RFC 6027 | problem | solved in | with |\n|---|---|---|---|\n"
            "| §3.7.1 | IVs | `common/esp/iv.py` (x) | `a/b.py` |\n"
            "| §3.9 | SPIs | `common/cluster/spi.py`, `member/worker.py` | |\n"
            "| — | leases | `common/cluster/pools.py` | |\n\n## Section by section\n"
            "| §3.1 | not in the map | `x.py` | |\n")
    assert rfc_6027_map(text) == {"§3.7.1": [["common/esp/iv.py"]],
                                  "§3.9": [["common/cluster/spi.py", "member/worker.py"]]}
