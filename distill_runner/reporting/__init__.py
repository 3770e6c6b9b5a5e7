"""Reporting: the typed metrics.json, report.md, plots, TensorBoard and the sweep summary.

Docs: docs/guide/evaluation-and-export.md
"""
