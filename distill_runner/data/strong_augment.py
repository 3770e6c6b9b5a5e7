"""The strong view: a second, RandAugment-style augmentation of every training image, for terms that ask for it.

A term with ``views = ("weak", "strong")`` (CRLD) gets, besides ``batch["image"]`` (the data set's own
augmentation, the "weak" view), ``batch["image_strong"]``: the same image augmented again with fresh draws
of the data set's augmentation (crop, flip), then :class:`StrongAugment`'s ops, as CRLD's official
``get_cifar100_train_transform_strong`` (RandomCrop + flip + ``RandAugment(2, 10)``, github ZaberKo/CRLD,
mdistiller/dataset/cifar100.py): ``ops`` operations drawn uniformly with replacement from the 14 below, each
with a magnitude uniform in its range (the official ``RandAugment`` ignores its ``m`` argument), then Cutout
of a square of side uniform in [0, ``cutout``] x width, filled with gray (125, 123, 114).

The ops run per image on uint8 tensors with torchvision.transforms.v2.functional (PIL's in the official
code): autocontrast, brightness, color (saturation), contrast, equalize, identity, posterize, rotate,
sharpness, shear x/y, solarize, translate x/y. Where the tensor op differs from PIL: shears turn about the
image centre (PIL: the top-left corner). Every parameter is drawn from the generator passed in, for the whole
batch in a fixed order, so a strong view is reproducible from (seed, epoch) like the weak one; the loaders
draw it from a generator of its own, so the weak view is the same with or without a strong one.

Docs: docs/methods/recent-crld.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from distill_runner.errors import ConfigError
from distill_runner.schema import is_number

STRONG_STREAM = 0x5EED_5EED  # the strong view's seed offset, in the low 32 bits (all torch's CPU generator keeps)
GRAY = (125, 123, 114)  # the official Cutout fill
GRAY_1 = 121  # one channel: their mean


def _shear(x: torch.Tensor, v: float, axis: int) -> torch.Tensor:
    degrees = math.degrees(math.atan(v))
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[degrees, 0.0] if axis == 0 else [0.0, degrees])


def _translate(x: torch.Tensor, v: float, axis: int) -> torch.Tensor:
    shift = -v * x.shape[-1 - axis]  # PIL's (1, 0, v*w, ...) samples x + v*w: the content moves by -v*w
    return TF.affine(x, angle=0.0, translate=[shift, 0.0] if axis == 0 else [0.0, shift], scale=1.0, shear=[0.0, 0.0])


# name, magnitude range, op(uint8 image [C,H,W], magnitude): the official augment_list, in its order
OPS = (
    ("autocontrast", 0.0, 1.0, lambda x, v: TF.autocontrast(x)),
    ("brightness", 0.05, 0.95, TF.adjust_brightness),
    ("color", 0.05, 0.95, TF.adjust_saturation),
    ("contrast", 0.05, 0.95, TF.adjust_contrast),
    ("equalize", 0.0, 1.0, lambda x, v: TF.equalize(x)),
    ("identity", 0.0, 1.0, lambda x, v: x),
    ("posterize", 4.0, 8.0, lambda x, v: TF.posterize(x, max(1, int(v)))),
    ("rotate", -30.0, 30.0, lambda x, v: TF.rotate(x, v)),
    ("sharpness", 0.05, 0.95, TF.adjust_sharpness),
    ("shear_x", -0.3, 0.3, lambda x, v: _shear(x, v, 0)),
    ("shear_y", -0.3, 0.3, lambda x, v: _shear(x, v, 1)),
    ("solarize", 0.0, 256.0, lambda x, v: x if v > 255 else TF.solarize(x, v)),
    ("translate_x", -0.3, 0.3, lambda x, v: _translate(x, v, 0)),
    ("translate_y", -0.3, 0.3, lambda x, v: _translate(x, v, 1)),
)


@dataclass(frozen=True)
class StrongAugment:
    """``ops`` random operations per image, then Cutout up to ``cutout`` of the width (official: 2, 0.5)."""

    ops: int = 2
    cutout: float = 0.5

    def __post_init__(self):
        if not isinstance(self.ops, int) or isinstance(self.ops, bool) or not 0 <= self.ops <= 8:
            raise ConfigError("strong.ops", self.ops, "use a whole number of operations per image in 0..8, e.g. 2")
        if not is_number(self.cutout) or not 0 <= self.cutout <= 1:
            raise ConfigError(
                "strong.cutout", self.cutout, "use the largest Cutout side as a fraction in [0, 1], e.g. 0.5"
            )

    def spec(self) -> dict:
        """What the strong view depends on (the replayed teacher outputs' cache key holds it)."""
        return {"ops": self.ops, "cutout": float(self.cutout), "version": 1}

    def __call__(self, images: torch.Tensor, gen: torch.Generator, base=None) -> torch.Tensor:
        """uint8 ``images`` [B,C,H,W] augmented by ``base`` (the loader's Augment, or None) with ``gen``'s next
        draws, rounded to uint8, then the random ops and Cutout: uint8 [B,C,H,W] on the images' device."""
        if base is not None:
            images = base(images, gen)
        images = images.float().round().clamp(0, 255).to(torch.uint8) if images.dtype != torch.uint8 else images
        b, w = images.shape[0], images.shape[-1]
        which = torch.randint(0, len(OPS), (b, self.ops), generator=gen)
        magnitude = torch.rand(b, self.ops, generator=gen, dtype=torch.float64)
        side = torch.rand(b, generator=gen, dtype=torch.float64) * self.cutout
        corner = torch.rand(b, 2, generator=gen, dtype=torch.float64)
        out = []
        for i in range(b):
            x = images[i]
            for k in range(self.ops):
                _, lo, hi, op = OPS[int(which[i, k])]
                x = op(x, lo + (hi - lo) * float(magnitude[i, k]))
            out.append(cutout(x, float(side[i]) * w, float(corner[i, 0]), float(corner[i, 1])))
        return torch.stack(out)


def parse_strong(spec) -> StrongAugment:
    """A term's ``strong`` setting: null (the official ops 2, cutout 0.5), ``{ops, cutout}`` or a StrongAugment."""
    if spec is None or isinstance(spec, StrongAugment):
        return spec or StrongAugment()
    if not isinstance(spec, dict) or not set(spec) <= {"ops", "cutout"}:
        raise ConfigError(
            "strong", spec, "give {ops: 2, cutout: 0.5} (official: RandAugment(2, 10) + Cutout up to 0.5)"
        )
    return StrongAugment(**spec)


def cutout(x: torch.Tensor, side: float, u: float, v: float) -> torch.Tensor:
    """The official CutoutAbs: a gray square of ``side`` pixels centred at (u*w, v*h), clipped to the image."""
    if side <= 0:
        return x
    h, w = x.shape[-2:]
    x0, y0 = int(max(0.0, u * w - side / 2)), int(max(0.0, v * h - side / 2))
    x1, y1 = min(w, int(x0 + side) + 1), min(h, int(y0 + side) + 1)  # PIL's rectangle includes its far corner
    x = x.clone()
    fill = torch.tensor(GRAY if x.shape[0] == 3 else [GRAY_1] * x.shape[0], dtype=x.dtype, device=x.device)
    x[:, y0:y1, x0:x1] = fill[:, None, None]
    return x


def strong_generator(seed: int, epoch: int) -> torch.Generator:
    """The strong view's draws for (seed, epoch): a stream apart from the weak view's (``seed * 100_003 + epoch``)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + STRONG_STREAM)
