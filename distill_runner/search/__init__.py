"""distill-search: a multi-objective Optuna search over students, recipes and their hyperparameters.

Docs: docs/guide/search.md
"""
