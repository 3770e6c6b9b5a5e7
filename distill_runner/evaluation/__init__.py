"""Evaluation: quality, size, cost and speed of each model; export to ONNX and TorchScript.

Docs: docs/guide/evaluation-and-export.md
"""
