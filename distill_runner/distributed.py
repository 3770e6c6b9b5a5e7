"""More than one process: ``torchrun --nproc_per_node=N -m distill_runner <overrides>``.

torchrun starts N copies of the runner and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Each
process trains every stage with ``DistributedDataParallel`` on its part of each epoch (the
loaders' ``shard``, like ``DistributedSampler``); losses and validation accuracy are summed over
the processes. Rank 0 alone writes: the run folder, logs, checkpoints, TensorBoard, the caches and
the report. ``dataset.batch_size`` is per process, so the effective batch is N times larger (as
in torchvision's reference scripts; scale the learning rate if you want the same schedule).

Backend: NCCL when each process has a GPU (``cuda:LOCAL_RANK``), gloo on CPUs. Without torchrun
(no ``WORLD_SIZE``, or 1) everything here is a no-op and the runner is a plain single process.

Docs: docs/guide/scaling-out.md
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Rank 0 may compute teacher outputs or evaluate while the others wait in a collective.
TIMEOUT = datetime.timedelta(hours=6)


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank from torchrun's environment (readable before ``init``)."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up; return this process's device (``cuda:LOCAL_RANK``
    when ``device`` is CUDA)."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    log.info(
        "distributed: rank %d of %d, backend %s, device %s", dist.get_rank(), dist.get_world_size(), backend, device
    )
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: object) -> object:
    """Rank 0's ``obj`` on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all processes (float64 on the collective's device)."""
    if not active():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = values.detach().to(device, torch.float64)
    dist.all_reduce(total)
    return total.to(values.device)


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when there are several processes and it has
    trainable parameters; else ``module`` itself."""
    if not active() or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    if (
        device.type == "cpu"
    ):  # CPU kernels return 1x1-conv weight gradients in NHWC strides: one extra copy, nothing wrong
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no copy, less memory)
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
    )
