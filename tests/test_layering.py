"""tdc_core is a plain library: it never imports prefect or mlflow (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import tdc_core

CORE = Path(tdc_core.__file__).parent
FORBIDDEN = {"prefect", "mlflow"}


def test_no_forbidden_import_statements():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_importing_every_core_module_loads_neither_prefect_nor_mlflow():
    modules = [m.name for m in pkgutil.walk_packages([str(CORE)], prefix="tdc_core.")]
    assert len(modules) >= 30
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _core_import_graph() -> dict[str, set[str]]:
    """Module -> the tdc_core modules it imports, anywhere in the file (a function-level import
    counts: a lazy import must not hide a cycle)."""
    graph: dict[str, set[str]] = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(path.relative_to(CORE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tdc_core":
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from tdc_core import x`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "tdc_core")
        graph[name] = deps
    known = set(graph)
    return {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_tdc_core():
    graph = _core_import_graph()
    assert len(graph) >= 20 and "tdc_core.config" in graph
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    # The test above must be able to fail: a cycle closed only by a lazy import is found.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_config_is_a_leaf():
    """The config imports no model code: it is read by every command and by the UNet."""
    assert _core_import_graph()["tdc_core.config"] <= {"tdc_core.errors", "tdc_core.atomic"}
    atomic = _core_import_graph()["tdc_core.atomic"]
    assert atomic <= {"tdc_core.errors"}, atomic


def test_no_lazy_import_of_core_modules():
    """Imports of tdc_core modules sit at the top of each file: a function-level import is how a
    cycle gets hidden, and the cycle test above already forbids the cycle itself."""
    lazy = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tdc_core") \
                    and id(node) not in top:
                # `if TYPE_CHECKING:` blocks are for annotations only and never run.
                lazy.append(f"{path.relative_to(CORE)}:{node.lineno} {node.module}")
    allowed_type_checking = {f for f in lazy if _under_type_checking(f)}
    assert sorted(set(lazy) - allowed_type_checking) == []


def _under_type_checking(entry: str) -> bool:
    rel, _, rest = entry.partition(":")
    lineno = int(rest.split()[0])
    tree = ast.parse((CORE / rel).read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            if node.lineno <= lineno <= (node.end_lineno or node.lineno):
                return True
    return False


def test_core_folders_name_the_method():
    """`git ls-files tdc_core` reads as the method's table of contents: every module but a few
    foundations lives in a subpackage named for a part of the method."""
    parts = {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"model", "diffusion", "training", "method", "evaluation", "run"} <= parts
    top = {p.stem for p in CORE.glob("*.py")} - {"__init__"}
    assert top <= {"config", "errors", "atomic", "hashing", "records", "reporter"}, top


def test_mlflow_is_called_only_from_the_tracking_modules():
    """Every MLflow call goes through tasks/tracking.py (and its light pre-check): one place to
    change when the tracking API does."""
    repo = CORE.parent
    users = set()
    for folder in ("tasks", "flows", "tdc_core"):
        for path in (repo / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(m.split(".")[0] == "mlflow" for m in mods):
                    users.add(str(path.relative_to(repo)))
    assert users == {"tasks/tracking.py", "tasks/tracking_check.py"}, users
