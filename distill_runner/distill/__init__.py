"""Distillation: loss terms, the recipe that weighs them, schedules and teacher signals.

Docs: docs/guide/recipes.md
"""

from distill_runner.distill.recipe import Recipe

__all__ = ["Recipe"]
