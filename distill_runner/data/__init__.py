"""Data sets: factories that return a DataBundle whose loaders meet the Batches protocol.

Docs: docs/guide/datasets.md
"""
