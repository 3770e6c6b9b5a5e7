"""distill-runner: config-driven knowledge-distillation experiments for image classification."""

__version__ = "0.1.0"
