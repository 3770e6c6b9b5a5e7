"""The recipes of conf/distill, as the benchmark scripts see them: every YAML there is a recipe (a new one joins
the tables without an edit here), its one-line summary (the YAML's first comment line) and the overrides it needs
on the quickstart, read from a comment line in the YAML itself:

    # quickstart overrides: student.model.channels=[64,128]

(FSP and KDSVD pair maps of equal channels: the quickstart's tiny_cnn needs resnet18's widths.)
"""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[1] / "conf" / "distill"
QUICKSTART_MARK = "# quickstart overrides:"


def all_recipes() -> list[str]:
    """Every recipe of conf/distill, by name (the YAML's stem), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def comment_lines(recipe: str) -> list[str]:
    return [line.strip() for line in (RECIPES_DIR / f"{recipe}.yaml").read_text().splitlines() if line.startswith("#")]


def quickstart_overrides(recipe: str) -> list[str]:
    """The Hydra overrides the recipe's YAML names for the quickstart pair (none for most)."""
    found = [line[len(QUICKSTART_MARK) :].split() for line in comment_lines(recipe) if line.startswith(QUICKSTART_MARK)]
    return [override for line in found for override in line]


def summary(recipe: str) -> str:
    """The YAML's first comment line (what the recipe is, its paper), without the ``#``; "" if none."""
    lines = comment_lines(recipe)
    return lines[0].lstrip("# ").rstrip(":") if lines else ""
