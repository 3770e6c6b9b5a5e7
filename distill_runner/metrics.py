"""Model measurements: size and inference speed."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from distill_runner.engine import Precision


@torch.inference_mode()
def throughput(
    model: nn.Module,
    batch_size: int,
    image_shape: tuple[int, int, int],
    device: torch.device,
    precision: Precision,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 20,
    budget_s: float = 2.0,
) -> float:
    """Inference images/s at ``batch_size``: the median of timed batches after warm-up.

    Times at least ``min_repeats`` batches and stops after ``max_repeats`` or once ``budget_s``
    seconds were spent timing, so a slow teacher on a CPU does not dominate the run.
    """
    model = model.to(device).eval()
    x = torch.randn(batch_size, *image_shape, device=device)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with precision.autocast():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        timed()
    times: list[float] = []
    while len(times) < min_repeats or (len(times) < max_repeats and sum(times) < budget_s):
        times.append(timed())
    return batch_size / statistics.median(times)
