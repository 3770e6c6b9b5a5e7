"""Training augmentation on whole batches of image tensors, with parameters drawn from a seed.

Every random parameter of a batch is drawn from a CPU ``torch.Generator`` that the loader seeds
with (seed, epoch) (:class:`distill_runner.data.bundle.TensorBatches`), in a fixed order, so an epoch
replays exactly whatever device the images are on: the teacher-output cache relies on that. The
pixel work runs where the images are (CPU or GPU), as a few batched ops.

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect-ratio range
ATTEMPTS = 10  # crop draws per image before the center-crop fallback, as in torchvision


@dataclass
class Augment:
    """Batch augmentation, applied in this order (each step only when configured):

    - ``crop_padding=p``: zero-pad by ``p`` pixels and crop back to the original size at a uniform
      random offset in [0, 2p] per axis (a random translation by -p..p pixels). Exact, uint8.
    - ``resized_crop_scale=(lo, hi)``: torchvision ``RandomResizedCrop`` semantics, resized back
      to the input size: a crop whose area is a uniform fraction in [lo, hi] of the image and
      whose aspect ratio (width/height) is log-uniform in ``resized_crop_ratio`` (default
      [3/4, 4/3]); width and height are rounded to whole pixels and must fit in the image, else
      the draw is repeated (10 attempts), then the fallback is the largest centered crop with the
      ratio clamped into range (the whole image for a square one). The position is uniform over
      the crops that fit. Resampling is bilinear (``grid_sample``, align_corners=False, edge
      pixels repeated); no antialiasing, which is right because a crop is never larger than the
      output, so this only enlarges. The output is float (0..255 range, not rounded).
    - ``hflip``: mirror left-right with probability 0.5 per image (exact; folded into the
      resized crop's sampling grid when there is one).

    Parameters come from the generator passed in; the same generator state gives the same batch.
    """

    crop_padding: int = 0
    hflip: bool = False
    resized_crop_scale: Sequence[float] | None = None
    resized_crop_ratio: Sequence[float] = RATIO

    def __post_init__(self):
        if self.resized_crop_scale is not None:
            lo, hi = (float(v) for v in self.resized_crop_scale)
            if not 0 < lo <= hi <= 1:
                raise ValueError(
                    f"resized_crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.resized_crop_scale)}"
                )
            self.resized_crop_scale = (lo, hi)
        r0, r1 = (float(v) for v in self.resized_crop_ratio)
        if not 0 < r0 <= r1:
            raise ValueError(
                f"resized_crop_ratio must be [lo, hi] with 0 < lo <= hi, got {list(self.resized_crop_ratio)}"
            )
        self.resized_crop_ratio = (r0, r1)

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.hflip and self.resized_crop_scale is None

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        device = images.device
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(images, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(device)
            rows = (dy[:, None] + torch.arange(h, device=device))[:, :, None]  # [B,H,1]
            cols = (dx[:, None] + torch.arange(w, device=device))[:, None, :]  # [B,1,W]
            images = padded[torch.arange(b, device=device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        if self.resized_crop_scale is not None:
            top, left, ch, cw = self.crop_boxes(b, h, w, gen)
            flip = torch.rand(b, generator=gen) < 0.5 if self.hflip else torch.zeros(b, dtype=torch.bool)
            return resample(images, top, left, ch, cw, flip)
        if self.hflip:
            flip = (torch.rand(b, generator=gen) < 0.5).to(device)
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images

    def crop_boxes(self, b: int, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(top, left, height, width) of one random resized crop per image, as int64 [B] tensors
        (torchvision ``RandomResizedCrop.get_params``, drawn for the whole batch at once)."""
        lo, hi = self.resized_crop_scale
        r0, r1 = self.resized_crop_ratio
        area = torch.empty(b, ATTEMPTS, dtype=torch.float64).uniform_(lo, hi, generator=gen) * (h * w)
        ratio = torch.exp(
            torch.empty(b, ATTEMPTS, dtype=torch.float64).uniform_(math.log(r0), math.log(r1), generator=gen)
        )
        cw, ch = torch.sqrt(area * ratio).round().long(), torch.sqrt(area / ratio).round().long()
        fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits
        cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
        if w / h < r0:  # fallback: the largest centered crop with the ratio clamped into range
            fw, fh = w, round(w / r0)
        elif w / h > r1:
            fw, fh = round(h * r1), h
        else:
            fw, fh = w, h
        found = fits.any(1)
        cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
        u = torch.rand(b, 2, generator=gen, dtype=torch.float64)
        top = torch.where(found, (u[:, 0] * (h - ch + 1)).long(), (h - fh) // 2)
        left = torch.where(found, (u[:, 1] * (w - cw + 1)).long(), (w - fw) // 2)
        return top, left, ch, cw


def resample(images: torch.Tensor, top, left, ch, cw, flip: torch.Tensor) -> torch.Tensor:
    """Each image's crop box resized (bilinear) to the full image size, mirrored where ``flip``:
    one ``grid_sample`` for the batch. The sampling grid is axis-aligned, so it is built from one
    row of x and one column of y coordinates per image (cheaper than ``affine_grid``)."""
    b, _, h, w = images.shape
    device = images.device

    def axis(start, length, size, mirror=None):  # normalized sample positions [B, size]
        scale = length.double() / size
        center = (2 * start.double() + length.double()) / size - 1
        if mirror is not None:
            scale = torch.where(mirror, -scale, scale)
        base = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1  # output pixel centers
        return (center[:, None] + scale[:, None] * base).float().to(device)

    gx, gy = axis(left, cw, w, flip), axis(top, ch, h)
    grid = torch.empty(b, h, w, 2, device=device)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
