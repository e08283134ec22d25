"""The package's structure: every module imports, and no two modules import each other
(directly or through others), lazy imports inside functions included."""
import ast
import importlib
import pkgutil
from pathlib import Path

import fairseq_kd

PACKAGE_DIR = Path(fairseq_kd.__file__).parent


def all_modules():
    """{module name: source file} of every module of the package."""
    modules = {"fairseq_kd": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="fairseq_kd."):
        rel = info.name.split(".")[1:]
        path = PACKAGE_DIR.joinpath(*rel)
        modules[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return modules


def imported_modules(name, path, known):
    """The package's modules that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            # "from pkg import mod" imports the module pkg.mod, "from mod import f" mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_every_module_imports():
    for name in all_modules():
        if not name.endswith(".__main__"):  # runs the command
            importlib.import_module(name)


def test_import_graph_has_no_cycle():
    modules = all_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    # the graph is real: the task reaches the teacher, the criterions the contract
    assert "fairseq_kd.teacher" in graph["fairseq_kd.tasks.translation_kd"]
    assert "fairseq_kd.contract" in graph["fairseq_kd.criterions.kd_base"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_benchmarks_do_not_import_the_tests():
    """Benchmarks use library code only (tests/ is not a library)."""
    test_modules = {p.stem for p in (PACKAGE_DIR.parent / "tests").glob("*.py")}
    for script in sorted((PACKAGE_DIR.parent / "benchmarks").glob("*.py")):
        source = script.read_text(encoding="utf-8")
        assert '"tests"' not in source and "'tests'" not in source, script.name
        for node in ast.walk(ast.parse(source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in test_modules], script.name
