"""The package's shape (docs/architecture.md): no import cycle among lorax modules, lazy
imports included; a thin lorax/train.py; modules and functions of a readable size."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lorax"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Functions allowed to be longer, with the reason (README "Layout" says the same).
LONG_FUNCTIONS = {
    # the one host loop: resume, step, drain, log, eval, checkpoint, final eval in one place,
    # so single runs and multi-adapter jobs cannot drift apart again
    "lorax.loop.run",
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """Every lorax module ``name`` imports, at the top or inside a function."""

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            m = resolve(t) if t.startswith("lorax") else None
            # a package's __init__ re-exporting its own submodules is not a cycle
            if m and m != name and not (path.name == "__init__.py" and m.startswith(name + ".")):
                found.add(m)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_lorax_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["lorax.train"] >= {"lorax.loop", "lorax.setup"}  # the walk sees imports
    assert "lorax.nn" not in graph["lorax.kernels"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_train_py_is_thin_and_modules_and_functions_stay_small():
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= 300
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_FUNCTIONS:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert not too_long, too_long
