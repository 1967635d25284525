"""The shape of the code: no import cycle among the project's modules, counting the imports inside functions too
(a lazy import hides a cycle, it does not remove one); data flows api → services ← workers, never back."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "services", "workers")


def modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in it ("from a import b" counts a.b when b is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import services.method.models` also names its module, not only `services`
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_and_a_lazy_import(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import b\n")
    b.write_text("def f():\n    from a import x\n")
    known = {"a": a, "b": b}
    edges = {n: imports(p, n, known) for n, p in known.items()}
    assert edges == {"a": {"b"}, "b": {"a"}}
    assert cycles(edges) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_project_modules():
    edges = graph()
    assert cycles(edges) == []


def test_services_import_neither_the_api_nor_the_workers():
    """Save the command line's, which start them (`ladder serve`, `ladder worker`) and so sit above all three."""
    edges = graph()
    wrong = {m: sorted(t for t in ts if t.split(".")[0] in ("api", "workers"))
             for m, ts in edges.items() if m.startswith("services")}
    assert wrong.pop("services.admin") == ["api.app", "workers.celery_app"]
    assert {m: ts for m, ts in wrong.items() if ts} == {}


def test_the_method_core_touches_no_http_database_queue_or_file_store():
    edges = graph()
    method = {m: ts for m, ts in edges.items() if m.startswith("services.method")}
    outside = {m: sorted(t for t in ts if not t.startswith("services.method") and t != "services")
               for m, ts in method.items()}
    assert {m: ts for m, ts in outside.items() if ts} == {}


def test_no_module_of_the_service_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
