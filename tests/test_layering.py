"""The import layering of the project packages, checked statically with `ast` (nothing is imported).

Layers, lowest first; a module may import its own layer and those below, never one above:

    0  datamodules.utils            imports nothing of the project
    1  datamodules                  (the rest)
    2  lightning_modules            (except studies)
    3  callbacks
    4  lightning_modules.studies    may import anything; nothing outside studies imports it

Every import counts: module level or inside a function, `import a.b`, `from a import b` (an edge to
`a.b` when that is a module, else to `a`), relative imports (resolved against the file's package),
`importlib.import_module("a.b")` with a literal, and, in a file that calls `import_module` with a
computed name (the PEP 562 lazy `__getattr__` of a package), every string literal that names a
project module. Importing `a.b.c` also runs the `__init__` of `a` and `a.b`; those implicit
edges are not counted (the package `__init__`s stay light precisely so that they need not be).

Import cycles between project modules fail too, whatever their layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "callbacks")
LAYERS = (  # (module prefix, layer): the longest matching prefix wins
    ("datamodules.utils", 0),
    ("datamodules", 1),
    ("lightning_modules", 2),
    ("callbacks", 3),
    ("lightning_modules.studies", 4),
)
LAYER_NAMES = {0: "datamodules.utils", 1: "datamodules", 2: "lightning_modules", 3: "callbacks",
               4: "lightning_modules.studies"}


@dataclass(frozen=True)
class Edge:
    """`importer` (a file, at `line`) imports project module `imported`."""

    importer: str
    imported: str
    path: str
    line: int

    def __str__(self) -> str:
        return (f"{self.path}:{self.line} {self.importer} [{LAYER_NAMES[layer_of(self.importer)]}] -> "
                f"{self.imported} [{LAYER_NAMES[layer_of(self.imported)]}]")


def layer_of(module: str) -> int:
    """The layer of a dotted module name (see `LAYERS`)."""
    matches = [(len(prefix), layer) for prefix, layer in LAYERS
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise ValueError(f"{module} is in no layer")
    return max(matches)[1]


def module_files(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under the packages (`pkg/__init__.py` is `pkg`)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is a project module, else its longest prefix that is (a.b.attr → a.b); None if outside."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute module named by a `from ... import` (relative levels resolved against `module`).

    None for a relative import beyond the top-level package (an ImportError at run time).
    """
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]  # a module's package; a package's `.` is itself
    if len(base) < node.level:
        return None
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_import_module(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Name) and func.id == "import_module") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int, bool]]:
    """(dotted name, line, exact) of everything `tree` imports, before matching names to project modules.

    `exact`: the name must be a project module itself (a string literal in a lazy-import table),
    rather than a module or an attribute of one (`from a.b import name`).
    """
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, False
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(node, module, is_package)
            for alias in node.names if source else ():
                yield (f"{source}.{alias.name}" if alias.name != "*" else source), node.lineno, False
        elif isinstance(node, ast.Call) and _is_import_module(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value, node.lineno, False
            else:
                dynamic = True
    if dynamic:  # import_module(TABLE[name]): the module names in the file are what it may import
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield node.value, node.lineno, True


def collect_edges(root: Path, packages: Iterable[str] = PACKAGES) -> list[Edge]:
    """Every import arrow between project modules under `root` (see the module docstring for what counts)."""
    modules = module_files(root, packages)
    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line, exact in imported_names(tree, module, path.name == "__init__.py"):
            target = (name if name in modules else None) if exact else _nearest_module(name, modules)
            if target is not None and target != module and name.split(".")[0] in packages:
                edges.add(Edge(module, target, str(path.relative_to(root)), line))
    return sorted(edges, key=lambda e: (e.path, e.line, e.imported))


def upward_edges(edges: Iterable[Edge]) -> list[Edge]:
    """The arrows that point to a higher layer than their importer's."""
    return [e for e in edges if layer_of(e.imported) > layer_of(e.importer)]


def find_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """The shortest cycle (a → b → ... → a) of each strongly connected component of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, []).append(e.imported)
        graph.setdefault(e.imported, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, list[str]], component: set[str]) -> list[str]:
    """The shortest cycle (ties: the first by name) within a strongly connected component."""
    cycles = [_shortest_cycle_through(graph, component, start) for start in sorted(component)]
    return min(cycles, key=len)


def _shortest_cycle_through(graph: dict[str, list[str]], component: set[str], start: str) -> list[str]:
    """Breadth first from `start` back to it, within `component`: [start, ..., start]."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if succ in component and succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable in a component of size > 1


def layering_report(root: Path, packages: Iterable[str] = PACKAGES) -> str:
    """'' when the tree is layered and acyclic, else every upward arrow and every cycle, one per line."""
    edges = collect_edges(root, packages)
    lines = [f"upward import: {e}" for e in upward_edges(edges)]
    lines += ["import cycle: " + " -> ".join(cycle) for cycle in find_cycles(edges)]
    if not lines:
        return ""
    order = " < ".join(LAYER_NAMES[k] for k in sorted(LAYER_NAMES))
    return f"{len(lines)} layering problem(s) (allowed direction: {order}):\n" + "\n".join(lines)


# ---- the real tree -------------------------------------------------------------------------------


def test_project_imports_point_down_the_layers() -> None:
    edges = collect_edges(ROOT)
    assert len(edges) > 50  # the checker sees the tree (a broken parser would pass vacuously)
    bad = upward_edges(edges)
    assert not bad, layering_report(ROOT)


def test_project_has_no_import_cycles() -> None:
    cycles = find_cycles(collect_edges(ROOT))
    assert not cycles, layering_report(ROOT)


def test_lazy_imports_by_string_are_seen() -> None:
    """`datamodules/__init__` and `datamodules/synthetic/__init__` import via `import_module` strings."""
    arrows = {(e.importer, e.imported) for e in collect_edges(ROOT)}
    assert ("datamodules", "datamodules.preference") in arrows  # import_module(_CLASSES[name])
    assert ("datamodules.synthetic", "datamodules.synthetic.assets") in arrows  # import_module("...")
    assert ("datamodules.synthetic.__main__", "datamodules.synthetic.assets") in arrows  # inside a function


# ---- the checker itself, on synthetic trees ------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Create `files` (relative path → source) under `root`, with an empty `__init__.py` in every folder."""
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for folder in {p.parent for p in root.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return root


def test_checker_reports_every_upward_arrow(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "datamodules/utils/files.py": "import json\n",
        "datamodules/x.py": "from lightning_modules.dpo import DPOModule\n",
        "datamodules/utils/bad.py": "def f():\n    from ..x import thing\n",  # relative, inside a function
        "lightning_modules/dpo.py": "from datamodules.utils.files import write\nDPOModule = 1\n",
        "lightning_modules/y.py": "import callbacks\n",
        "lightning_modules/z.py": "import importlib\nimportlib.import_module('lightning_modules.studies.s')\n",
        "lightning_modules/studies/s.py": "import callbacks\nfrom lightning_modules import dpo\n",
        "callbacks/c.py": "from . import d\nfrom lightning_modules.dpo import DPOModule\n",
        "callbacks/d.py": "",
    })  # fmt: skip
    report = layering_report(root)
    print(report)
    arrows = {(e.path, e.line, e.importer, e.imported) for e in upward_edges(collect_edges(root))}
    assert arrows == {
        ("datamodules/x.py", 1, "datamodules.x", "lightning_modules.dpo"),
        ("datamodules/utils/bad.py", 2, "datamodules.utils.bad", "datamodules.x"),
        ("lightning_modules/y.py", 1, "lightning_modules.y", "callbacks"),
        ("lightning_modules/z.py", 2, "lightning_modules.z", "lightning_modules.studies.s"),
    }
    assert ("datamodules/x.py:1 datamodules.x [datamodules] -> lightning_modules.dpo [lightning_modules]"
            in report)
    assert "lightning_modules/y.py:1 lightning_modules.y [lightning_modules] -> callbacks [callbacks]" in report
    assert "import cycle: datamodules.x -> lightning_modules.dpo" not in report  # dpo imports utils only
    with pytest.raises(AssertionError, match=r"datamodules/x\.py:1 .* -> lightning_modules\.dpo"):
        assert not upward_edges(collect_edges(root)), report


def test_checker_reports_cycles(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "datamodules/a.py": "from datamodules.b import B\n",
        "datamodules/b.py": "def f():\n    from datamodules import c\nB = 1\n",
        "datamodules/c.py": "import datamodules.a\n",
        "callbacks/self_ok.py": "import callbacks.self_ok\n",  # a module importing itself is no cycle
    })  # fmt: skip
    assert find_cycles(collect_edges(root)) == [["datamodules.a", "datamodules.b", "datamodules.c", "datamodules.a"]]
    assert "import cycle: datamodules.a -> datamodules.b -> datamodules.c -> datamodules.a" in layering_report(root)


def test_checker_resolves_names_and_lazy_tables(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "datamodules/__init__.py": ("from importlib import import_module\n"
                                    "_CLASSES = {'Thing': 'datamodules.impl'}\n"
                                    "def __getattr__(name):\n    return import_module(_CLASSES[name])\n"),
        "datamodules/impl.py": "from .sub.deep import value as v\nimport os.path\n",
        "datamodules/sub/deep.py": "from ... import lightning_modules\nvalue = 1\n",  # beyond the root: ignored
        "lightning_modules/m.py": "from datamodules import Thing\nfrom datamodules.sub import deep\n",
    })  # fmt: skip
    arrows = {(e.importer, e.imported) for e in collect_edges(root)}
    assert arrows == {("datamodules", "datamodules.impl"), ("datamodules.impl", "datamodules.sub.deep"),
                      ("lightning_modules.m", "datamodules"), ("lightning_modules.m", "datamodules.sub.deep")}
    assert layer_of("datamodules.utils.files") == 0 and layer_of("datamodules") == 1
    assert layer_of("lightning_modules.studies") == 4 and layer_of("lightning_modules.studiesx") == 2


# ---- one definition per shared name --------------------------------------------------------------

SINGLE_DEFINITIONS = {  # name → the one module that defines it (assignment, def or class)
    "IGNORE_INDEX": "datamodules.tokenize",
    "ROLES": "datamodules.chat",
    "as_messages": "datamodules.chat",
    "render_prompt": "datamodules.templates",
    "ensure_pad_token": "datamodules.tokenize",
    "write_checksummed": "datamodules.utils.cache",
    "read_checksummed": "datamodules.utils.cache",
}


def defined_names(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(name, line) of every module-level or nested def, class and plain assignment target in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        yield leaf.id, node.lineno


def test_shared_names_have_one_definition() -> None:
    """The ignore index, the chat roles, prompt rendering and the pad fix-up are defined once and imported."""
    where: dict[str, list[str]] = {name: [] for name in SINGLE_DEFINITIONS}
    for module, path in module_files(ROOT).items():
        for name, line in defined_names(ast.parse(path.read_text(encoding="utf-8"))):
            if name in where:
                where[name].append(f"{module}:{line}")
    wrong = {name: places for name, places in where.items()
             if [p.split(":")[0] for p in places] != [SINGLE_DEFINITIONS[name]]}
    assert not wrong, f"defined elsewhere or more than once: {wrong}"
