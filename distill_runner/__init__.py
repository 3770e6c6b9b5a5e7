"""distill-runner: config-driven knowledge-distillation experiments for image classification.

Docs: docs/index.md
"""

__version__ = "0.1.0"
