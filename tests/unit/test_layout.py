"""The package's shape: its layers (no import runs upward or in a cycle), the data layer apart from training,
modules a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distill_runner"
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


# The package's layers, bottom first: a module imports from its own layer or below, never above. A name covers
# its sub-modules (distill_runner.data: every data module); distill_runner itself (the empty package) is on top.
LAYERS = {
    "errors and the typed config schema": ("errors", "distributed", "precision", "schema", "spec", "search_spec"),
    "io: files, folders and locks, keyed stores, the run folder": ("io",),
    "data and models": ("data", "models"),
    "distill: terms, recipe, teacher signals": ("distill",),
    "train: the loop, the stages, building their pieces": ("train", "build"),
    "evaluation and reporting": ("evaluation", "reporting"),
    "runner: validate, build, stages, evaluate, report": ("runner", "config"),
    "cli and search": ("cli", "__main__", "search", ""),
}
# Upward imports kept on purpose, each with what would remove it (a design decision left to its owner).
UPWARD_EXCEPTIONS = {
    # StageResult, the results types every stage fills, live in reporting/results.py; moving them below train
    # (a results module the loop, the report, the sweep and export all read) removes this.
    ("distill_runner.train.stages", "distill_runner.reporting.results"),
}


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the most specific name covering ``module``."""
    covering = []
    for i, names in enumerate(LAYERS.values()):
        for full in (f"distill_runner.{n}".rstrip(".") for n in names):
            if module == full or module.startswith(full + "."):
                covering.append((len(full), i))
    assert covering, f"{module} is in no layer: add it to LAYERS in tests/unit/test_layout.py"
    return max(covering)[1]


def upward_imports(g: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, d) for m, deps in g.items() for d in deps if layer_of(d) > layer_of(m)}


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_runs_up_the_layers():
    names, found = list(LAYERS), upward_imports(graph())
    upward = [
        f"{m} ({names[layer_of(m)]}) imports {d} ({names[layer_of(d)]})" for m, d in sorted(found - UPWARD_EXCEPTIONS)
    ]
    assert not upward, upward
    assert found >= UPWARD_EXCEPTIONS, f"no longer upward, remove from UPWARD_EXCEPTIONS: {UPWARD_EXCEPTIONS - found}"


def test_the_layer_check_sees_an_upward_import():
    """The check itself: signals.py importing train.engine (as it did for Precision) is refused; the CLI may."""
    g = graph()
    g["distill_runner.distill.signals"] = g["distill_runner.distill.signals"] | {"distill_runner.train.engine"}
    assert ("distill_runner.distill.signals", "distill_runner.train.engine") in upward_imports(g)
    assert layer_of("distill_runner.cli") > layer_of("distill_runner.runner") > layer_of("distill_runner.train.engine")
    assert (
        layer_of("distill_runner.data.bundle")
        == layer_of("distill_runner.models.factories")
        > layer_of("distill_runner.io.storage")
    )


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
