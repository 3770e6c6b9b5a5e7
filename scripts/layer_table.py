"""Write docs/reference/layers.md: every shipped model's stage outputs, pre-ReLU taps and BatchNorms.

    python scripts/layer_table.py [--check]

One row per stage of each model under conf/teacher and conf/student (built for 100 classes, RGB, 32 px:
torchvision and timm models with their small-image stem where they have one), from
:func:`distill_runner.models.stages.stages`. ``--check`` exits 1 when the file is not current (a test runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distill_runner.errors import instantiate
from distill_runner.models.features import feature_shapes
from distill_runner.models.stages import stages

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference" / "layers.md"
IMAGE_SIZE = 32
HEADER = f"""# Stage outputs per model

Written by `scripts/layer_table.py` (do not edit; a test checks it is current). Multi-level feature
recipes (OFD, AB, FT, hints) name a model's stages by their **output** module path, or take them all
with `layers: stages`. The **pre-ReLU** tap is what OFD and AB read (`PATH:input` is the input of the
module at PATH: a stage's last ReLU); the **BatchNorm** is the one whose output that pre-ReLU map is,
OFD's margins come from it ("none": OFD cannot use this model as its teacher). Shapes `C×H×W` at
{IMAGE_SIZE} px input.

| config | model | stage output | shape | pre-ReLU tap | shape | BatchNorm |
|---|---|---|---|---|---|---|
"""


def shipped_models() -> dict[str, torch.nn.Module]:
    """config name -> model, each model config once (teacher and student configs of one model agree)."""
    models = {}
    for role in ("teacher", "student"):
        for path in sorted((ROOT / "conf" / role).glob("*.yaml")):
            node = OmegaConf.load(path)
            if node.name in {m for m, _ in models.values()}:
                continue
            torch.manual_seed(0)
            model = instantiate(node.model, f"{role}.model", num_classes=100, in_channels=3, image_size=IMAGE_SIZE)
            models[f"{role}={path.stem}"] = (node.name, model)
    return models


def _shape(shape) -> str:
    return "×".join(map(str, shape))


def rows(config: str, name: str, model: torch.nn.Module) -> list[str]:
    found = stages(model)
    taps = [s.output for s in found] + [s.pre_relu for s in found if s.pre_relu]
    shapes = feature_shapes(model, taps, 3, IMAGE_SIZE)
    out = []
    for s in found:
        pre = f"`{s.pre_relu}` | {_shape(shapes[s.pre_relu])}" if s.pre_relu else "none | "
        bn = f"`{s.bn}`" if s.bn else "none"
        out.append(f"| {config} | {name} | `{s.output}` | {_shape(shapes[s.output])} | {pre} | {bn} |")
    return out


def table() -> str:
    lines = [row for config, (name, model) in shipped_models().items() for row in rows(config, name, model)]
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is not current")
    args = parser.parse_args(argv)
    text = table()
    if args.check:
        current = OUT.is_file() and OUT.read_text() == text
        print(f"{OUT.relative_to(ROOT)} is {'current' if current else 'stale: run python scripts/layer_table.py'}")
        return 0 if current else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
