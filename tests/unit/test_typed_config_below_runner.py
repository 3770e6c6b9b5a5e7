"""Nothing below the runner reads a DictConfig (issue 27, point 1): the composed config is read once, against the
schema, into a typed RunSpec that the runner passes down. A package module that imports omegaconf (at any depth,
lazy imports in functions too) fails this test unless it is one of the few that stand at the config's edge."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distill_runner"

ALLOWED = {
    # the config's edge: Hydra composes, the schema reads the composed config once, the runner validates
    "cli.py",
    "config.py",
    "runner.py",
    "schema.py",
    "search_spec.py",  # the schema of distill-search's keys
    # Hydra's side: the callbacks that check the output folders before Hydra makes them (before validation)
    # and write a sweep's summary
    "callbacks.py",
    # hydra.utils.instantiate of a `_target_` node: its failure names the node's target (errors.instantiate), and a
    # recipe built with _recursive_=False receives its terms' nodes as DictConfig (distill/recipe.py)
    "errors.py",
    "distill/recipe.py",
    # distill-export's own entry point: reads a finished run folder's saved .hydra files
    "evaluation/export.py",
    # distill-search stands above the runner, as the CLI does: it composes each trial's config and hands it to
    # runner.session, which validates it (every module below reads the typed spec)
    "search/*",
}


def omegaconf_importers(package: Path = PACKAGE) -> set[str]:
    """Module paths (relative to ``package``) that import omegaconf anywhere in their code."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "omegaconf" or n.startswith("omegaconf.") for n in names):
                found.add(path.relative_to(package).as_posix())
    return found


def allowed(module: str) -> bool:
    return module in ALLOWED or any(a.endswith("/*") and module.startswith(a[:-1]) for a in ALLOWED)


def test_no_module_below_the_runner_imports_omegaconf():
    below = sorted(m for m in omegaconf_importers() if not allowed(m))
    assert not below, f"these read the raw config; pass them the typed RunSpec (or its section) instead: {below}"


def test_every_allowed_module_still_needs_it():
    found = omegaconf_importers()
    stale = sorted(a for a in ALLOWED if not a.endswith("/*") and a not in found)
    assert not stale, f"no longer import omegaconf: remove them from ALLOWED: {stale}"


def test_the_check_finds_a_lazy_import(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "factory.py").write_text("def f(cfg):\n    from omegaconf import OmegaConf\n    return 1\n")
    (tmp_path / "clean.py").write_text("import torch\n")
    assert omegaconf_importers(tmp_path) == {"data/factory.py"}
    assert not allowed("data/factory.py") and allowed("search/driver.py")
