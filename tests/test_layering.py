"""Imports point one way (DESIGN.md): the control plane on top, the workers below it, the engine and
the transfer engine below the workers, one shared package at the bottom. Read from the source (no
import is executed):

- every top-level package has a layer, and imports only packages of lower layers (never its own
  layer's others, never a higher one): an upward or sideways edge fails, and so any cycle;
- inside a package, the modules imported at load time form no cycle, and neither do its first-level
  subpackages and modules taken as units (engine.loader, engine.tokenizer, ...); lazy imports inside
  functions and `if TYPE_CHECKING:` imports are not load-time edges;
- no code outside engine/ reaches a private member of the engine (its thread is entered through
  AsyncEngine's typed methods only).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# lower number = lower layer; packages of one layer must not import each other
LAYERS: dict[str, int] = {
    "tandem": 0,  # generated protos (tandem/v1)
    "common": 1,  # settings, etcd, TLS and key files, wire helpers, process lifecycle
    "engine": 2,
    "kv_transfer": 3,
    "worker_runtime": 4,  # what both worker roles share
    "prefill_worker": 5,
    "decode_worker": 5,
    "kv_store": 5,
    "cluster": 6,  # router, discovery, planner, launchers, CLI
    "bench": 7,
    # tools on top: they may import anything, nothing may import them
    "tests": 8,
    "deploy": 8,
    "proto": 8,
}
IGNORED = {".venv", ".git", "docs", "scripts"}  # no Python of the project's own
PRODUCT = sorted(p for p, layer in LAYERS.items() if 0 < layer < LAYERS["tests"])  # hand-written, shipped


def top_packages() -> list[str]:
    """Every top-level folder holding Python, package or not (a namespace package imports too)."""
    return sorted(p.name for p in REPO.iterdir() if p.is_dir() and p.name not in IGNORED
                  and not p.name.startswith(".") and any(p.rglob("*.py")))


def sources(package: str) -> Iterator[pathlib.Path]:
    for path in sorted((REPO / package).rglob("*.py")):
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            yield path


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dynamic_import(node: ast.AST) -> str | None:
    """The module of `importlib.import_module("x")` or `__import__("x")` with a literal name."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    name = node.args[0].value
    return name if called in ("import_module", "__import__") and isinstance(name, str) else None


def imports(tree: ast.Module, load_time_only: bool) -> Iterator[str]:
    """Absolute module names imported; with `load_time_only`, only those run when the module loads
    (not inside a function, not under `if TYPE_CHECKING:`, not `import_module` calls)."""
    def visit(node: ast.AST) -> Iterator[str]:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if not load_time_only:
                for child in ast.iter_child_nodes(node):
                    yield from visit(child)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body if not load_time_only else []:
                yield from visit(child)
            for child in node.orelse:  # runs when the module loads
                yield from visit(child)
        else:
            name = _dynamic_import(node)
            if name is not None and not load_time_only:
                yield name
            for child in ast.iter_child_nodes(node):  # every block: with, async with, for, try, match, ...
                yield from visit(child)
    yield from visit(tree)


def package_edges() -> dict[tuple[str, str], str]:
    """(importer, imported) top-level packages → one place where it happens."""
    known = set(top_packages())
    edges: dict[tuple[str, str], str] = {}
    for package in known:
        for path in sources(package):
            for name in imports(ast.parse(path.read_text()), load_time_only=False):
                target = name.split(".")[0]
                if target in known and target != package:
                    edges.setdefault((package, target), f"{path.relative_to(REPO)} imports {name}")
    return edges


def upward_edges(edges: dict[tuple[str, str], str]) -> list[str]:
    return [f"{a} (layer {LAYERS[a]}) -> {b} (layer {LAYERS[b]}): {where}"
            for (a, b), where in sorted(edges.items()) if LAYERS[a] <= LAYERS[b]]


def load_time_cycles(package: str, units: int | None = None) -> list[list[str]]:
    """Strongly connected groups (size > 1) of the package's modules under load-time imports; with
    `units=2`, of its first-level subpackages and modules (names cut to two parts)."""
    modules = {module_name(p): p for p in sources(package)}

    def unit(name: str) -> str:
        return ".".join(name.split(".")[:units]) if units else name
    graph: dict[str, set[str]] = {unit(m): set() for m in modules}
    for module, path in modules.items():
        for name in imports(ast.parse(path.read_text()), load_time_only=True):
            while name and name not in modules:  # `from engine.x import y`: y may be a name, not a module
                name = name.rpartition(".")[0]
            if name and unit(name) != unit(module) and name != package:
                graph[unit(module)].add(unit(name))
    return [sorted(group) for group in _strongly_connected(graph) if len(group) > 1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_every_top_level_package_has_a_layer() -> None:
    assert set(top_packages()) == set(LAYERS), "give a new top-level package its layer in LAYERS"


def test_imports_between_packages_point_down() -> None:
    assert upward_edges(package_edges()) == []


def test_the_check_sees_an_upward_edge() -> None:
    """A reintroduced worker → cluster import (the old cycle) would be reported."""
    edges = {**package_edges(), ("decode_worker", "cluster"): "decode_worker/x.py imports cluster.cli"}
    assert upward_edges(edges) == [
        "decode_worker (layer 5) -> cluster (layer 6): decode_worker/x.py imports cluster.cli"]
    sideways = {("prefill_worker", "decode_worker"): "prefill_worker/x.py imports decode_worker.servicer"}
    assert len(upward_edges(sideways)) == 1
    assert len(upward_edges({("engine", "tests"): "engine/x.py imports tests.support"})) == 1


def test_imports_are_found_in_every_kind_of_block() -> None:
    source = """
import a1
if TYPE_CHECKING:
    import a2
else:
    import a3
async def f():
    async with x:
        for y in z:
            import a4
    importlib.import_module("a5")
try:
    import a6
except ImportError:
    import a7
match v:
    case 1:
        import a8
"""
    tree = ast.parse(source)
    assert set(imports(tree, load_time_only=False)) == {f"a{i}" for i in range(1, 9)}
    assert set(imports(tree, load_time_only=True)) == {"a1", "a3", "a6", "a7", "a8"}


@pytest.mark.parametrize("package", PRODUCT)
def test_no_load_time_import_cycle_inside(package: str) -> None:
    assert load_time_cycles(package) == []
    assert load_time_cycles(package, units=2) == []


def _engine_private_names() -> set[str]:
    names: set[str] = set()
    for path in sources("engine"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
                names.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                  and isinstance(node.ctx, ast.Store) and node.attr.startswith("_")):
                names.add(node.attr)
    return {n for n in names if not n.startswith("__")}


def test_nothing_outside_the_engine_reaches_its_private_members() -> None:
    private = _engine_private_names()
    assert {"_call", "_llm"} <= private  # what the old decode worker reached for
    found = []
    for package in set(PRODUCT) - {"engine"}:
        for path in sources(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr in private
                        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_environment_variables_are_read_in_one_module() -> None:
    """common/settings.py reads every variable (flags' TANDEM_* and the rest); nothing else touches os.environ."""
    found = []
    for package in PRODUCT:
        for path in sources(package):
            if path == REPO / "common" / "settings.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") and isinstance(
                        node.value, ast.Name) and node.value.id == "os":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []
