"""Training: the one fit loop every stage uses, its checkpoints and its health checks.

Docs: docs/architecture.md
"""
