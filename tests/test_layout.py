"""The package's shape: no import cycle, the data layer apart from training, modules a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill_runner"
MAX_LINES = 420  # "about 400"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Package modules ``path`` imports, at any depth (lazy imports in functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill_runner"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycle():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n not in g or n.startswith(m + ".") or m.startswith(n + "."):  # a package and its own modules
                continue
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_the_data_layer_does_not_import_training_distillation_or_reporting():
    banned = ("distill_runner.train", "distill_runner.distill", "distill_runner.runner", "distill_runner.build",
              "distill_runner.evaluation", "distill_runner.reporting")  # fmt: skip
    for name, deps in graph().items():
        if name.startswith("distill_runner.data"):
            assert not [d for d in deps if d.startswith(banned)], (name, deps)


def test_no_module_is_over_about_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_capability_probing_outside_the_contract():
    """The recipe and teacher-signal interface is read directly (distill.contract), never guessed."""
    probes = ("needs_teacher", "student_layers", "teacher_layers", "set_epoch", "bind")
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "getattr"):
                args = node.args[1:2]
                if args and isinstance(args[0], ast.Constant) and args[0].value in probes:
                    offenders.append(f"{name}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_every_package_ships_in_a_wheel():
    """pyproject lists packages explicitly (the config tree is mapped in), so a new subpackage must be added there
    or a non-editable install lacks it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
