"""How forward passes run: the device and the autocast precision (``trainer.device``, ``trainer.precision``).

Below both the training loop (:mod:`distill_runner.train.engine`) and the teacher signals
(:mod:`distill_runner.distill.signals`), which both run forward passes under it.

Docs: docs/guide/gpu.md
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from distill_runner.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("32", "16-mixed", "bf16-mixed")


@dataclass(frozen=True)
class Precision:
    """How to run forward passes: autocast dtype (None = fp32) and whether to scale gradients."""

    name: str
    dtype: torch.dtype | None
    device_type: str

    @property
    def use_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` (its spelling checked by the schema) on this machine: auto picks CUDA when there is one."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device", name, "CUDA is not available on this machine; use trainer.device=cpu or auto"
        )
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, device_requested: str = "auto") -> Precision:
    """``trainer.precision`` (one of :data:`PRECISIONS`: the schema checked it) on ``device``."""
    name = str(name)
    if name == "16-mixed" and device.type != "cuda":
        if str(device_requested) == "auto":
            log.warning(
                "trainer.precision=16-mixed needs CUDA and none is available: falling back to 32 (fp32). Use "
                "bf16-mixed for mixed precision on CPU."
            )
            return Precision("32", None, device.type)
        raise ConfigError(
            "trainer.precision", name, f"fp16 autocast needs CUDA, the device is {device}; use 32 or bf16-mixed"
        )
    dtype = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}[name]
    return Precision(name, dtype, device.type)
