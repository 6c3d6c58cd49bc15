"""The package layout keeps itself: no import cycles, imports run with the data flow, modules fit in one head.

The import graph is read with ``ast`` from the source (every ``import``/``from`` statement, including the
lazy ones inside functions: a cycle hidden behind a function-level import is still a cycle in the design).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "islkeras"

MAX_LINES = 450
#: module -> why it may be longer than MAX_LINES (keep this empty unless a split would cut one idea in two)
LONG_MODULES: dict[str, str] = {}

#: the steps a field takes, in order; a step may import the steps before it, never one after it
STEPS = ["data", "models", "training", "export", "inference", "segmentation", "evaluation", "serving",
         "napari"]
#: top-level modules every step may import (they import no step, except as listed in FOUNDATION_EXCEPTIONS)
FOUNDATION = {"islkeras", "islkeras._env", "islkeras.errors", "islkeras.utils", "islkeras.config",
              "islkeras.config.parse", "islkeras.config.sections", "islkeras.config.validate"}
#: top-level entry points: they may import anything, nothing imports them (but each other)
ENTRY = {"islkeras.cli", "islkeras.demo"}
#: (importer, imported) -> reason
FOUNDATION_EXCEPTIONS = {
    ("islkeras.config.validate", "islkeras.data.normalize"):
        "validating pipeline.percentiles against the percentiles stored at conversion; "
        "data.normalize imports nothing of islkeras",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports_of(path: Path, known: set[str], package: Path = PACKAGE) -> set[str]:
    """The islkeras modules ``path`` imports (``from islkeras.x import y`` counts ``islkeras.x.y`` when that
    is a module, else ``islkeras.x``)."""
    me = module_name(path, package)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("islkeras"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("islkeras")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports (islkeras....), not relative ones")
    return found - {me}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def step_of(module: str):
    if module in FOUNDATION:
        return None
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STEPS) else None


def layering_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, deps in g.items():
        for dst in deps:
            if dst in ENTRY and src not in ENTRY:
                bad.append(f"{src} imports the entry point {dst}")
            elif src in FOUNDATION and dst not in FOUNDATION and (src, dst) not in FOUNDATION_EXCEPTIONS:
                bad.append(f"{src} (foundation) imports {dst}")
            elif step_of(src) and step_of(dst) and STEPS.index(step_of(dst)) > STEPS.index(step_of(src)):
                bad.append(f"{src} ({step_of(src)}) imports the later step {dst} ({step_of(dst)})")
    return sorted(bad)


def test_every_module_is_placed():
    """Each module is a step's, a foundation module or an entry point: no new flat room at the top."""
    stray = [m for m in modules() if step_of(m) is None and m not in FOUNDATION | ENTRY]
    assert stray == [], f"top-level modules outside the layout (move them into a step folder): {stray}"


def test_no_import_cycles():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_imports_follow_the_flow():
    assert layering_violations(graph()) == []


def test_modules_fit_in_one_head():
    long = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    long = {m: n for m, n in long.items() if n > MAX_LINES and m not in LONG_MODULES}
    assert long == {}, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_subpackages_say_what_they_are_for():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init}: the docstring says what the folder is for and what it may import"


# the checks above must be able to fail: they are run here on small graphs with known defects
def test_cycle_finder_finds_a_cycle():
    g = {"islkeras.evaluation.evaluate": {"islkeras.evaluation.report"},
         "islkeras.evaluation.report": {"islkeras.evaluation.evaluate"}}
    assert find_cycle(g) == ["islkeras.evaluation.evaluate", "islkeras.evaluation.report",
                             "islkeras.evaluation.evaluate"]
    assert find_cycle({"islkeras.a.x": {"islkeras.a.y"}, "islkeras.a.y": set()}) is None


@pytest.mark.parametrize("src,dst", [
    ("islkeras.data.records", "islkeras.training.fit"),       # an earlier step importing a later one
    ("islkeras.errors", "islkeras.data.records"),             # foundation importing a step
    ("islkeras.inference.predict", "islkeras.cli"),           # a step importing the entry point
])
def test_layering_check_flags(src, dst):
    assert layering_violations({src: {dst}})


def test_imports_of_sees_lazy_imports(tmp_path):
    pkg = tmp_path / "islkeras"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from islkeras.data import b\n    import islkeras.errors\n")
    (pkg / "data" / "b.py").write_text("")
    known = set(modules(pkg))
    assert known == {"islkeras", "islkeras.data", "islkeras.data.a", "islkeras.data.b"}
    assert imports_of(pkg / "data" / "a.py", known, pkg) == {"islkeras.data.b", "islkeras.errors"}
