"""Training images/s per speed configuration: precision x channels_last x torch.compile.

Part of ``scripts/bench.py``: on a CUDA machine it adds a ``speed`` section to its JSON (on a CPU,
``python scripts/bench.py --only speed`` runs it, fp32/bf16 only). Each configuration trains the same
models with the runner's loop (``engine.fit``) on synthetic 224 px images held on the device, so
the figure is the model step, not the data path (that is the ``data`` section):

    student  tiny_cnn   (~100k parameters, 2 classes), cross-entropy
    teacher  resnet18   (11.2M parameters, 2 classes), cross-entropy (the fine-tuning step)

One warm-up epoch (it includes compilation), then the median of ``repeats`` timed epochs.
"""

from __future__ import annotations

import copy
import itertools
import time
from functools import partial

import torch

from distill_runner.data.bundle import TensorBatches
from distill_runner.distill.recipe import Recipe
from distill_runner.models.factories import tiny_cnn, torchvision_model
from distill_runner.train import engine


def _epoch_seconds(model_init, train, device, precision, speed, repeats: int) -> float:
    model = copy.deepcopy(model_init)
    stage = engine.Stage(
        "bench",
        model,
        Recipe.cross_entropy(),
        repeats + 1,
        partial(torch.optim.AdamW, lr=1e-3),
        partial(engine.constant_lr),
    )
    history = engine.fit(stage, train, [], device, precision, progress=False, speed=speed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = sorted(h["epoch_time_s"] for h in history[1:])  # epoch 1 warms up (and compiles)
    return times[len(times) // 2]


def speed_section(
    device: torch.device,
    images: int,
    repeats: int,
    compile_too: bool = True,
    image_size: int = 224,
    precisions: list[str] | None = None,
) -> dict:
    """``image_size``: 224 as documented; ``precisions``: all the device has by default (tests: a few pixels, fp32)."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, 2, (images,), generator=gen)
    train = TensorBatches(pixels, targets, 64, [0.5] * 3, [0.25] * 3, shuffle=True).place(device, resident=True)
    torch.manual_seed(0)
    models = {
        "student": tiny_cnn(num_classes=2),
        "teacher": torchvision_model("resnet18", num_classes=2, image_size=image_size),
    }
    precisions = precisions or ["32", "bf16-mixed"] + (["16-mixed"] if device.type == "cuda" else [])
    results = {}
    print(
        f"training images/s at {image_size} px, batch 64, {images} images on {device} (median of {repeats} epochs "
        "after a warm-up epoch)"
    )
    for precision_name, channels_last, compiled in itertools.product(
        precisions, (False, True), (False, True) if compile_too else (False,)
    ):
        precision = engine.resolve_precision(precision_name, device, str(device))
        speed = engine.Speed(channels_last=channels_last, compile=compiled)
        name = f"{precision_name}{' channels_last' if channels_last else ''}{' compile' if compiled else ''}"
        row = {}
        for role, model in models.items():
            torch.compiler.reset()
            row[f"{role}_images_per_s"] = images / _epoch_seconds(model, train, device, precision, speed, repeats)
        results[name] = row
        print(
            f"  {name:<34} student {row['student_images_per_s']:9.0f}  teacher {row['teacher_images_per_s']:8.0f} "
            "images/s",
            flush=True,
        )
    return results


if __name__ == "__main__":
    start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    speed_section(dev, images=128, repeats=1, compile_too=dev.type == "cuda")
    print(f"{time.perf_counter() - start:.0f}s")
