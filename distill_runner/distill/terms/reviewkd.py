"""Knowledge review (Chen, Liu, Zhao, Jia; CVPR 2021), as the authors' code (github.com/dvlab-research/ReviewKD,
CIFAR-100/model/reviewkd.py) and mdistiller's ``ReviewKD`` (the same ABF and ``hcl``).

The student's stage outputs, deepest first, pass through attention-based fusion (ABF) modules: each maps its stage
to a middle width (1x1 conv + BN), fuses it with the deeper stage's fused map (nearest-upsampled; per-pixel
weights from a 1x1 conv + sigmoid over both), and outputs a map of the paired teacher stage's channels and size
(3x3 conv + BN). The hierarchical context loss compares each output with its teacher map at full size and
average-pooled to 4x4, 2x2 and 1x1 (those smaller than the map), weights 1, 1/2, 1/4, 1/8, normalized::

    hcl = sum_i (mse(f_i, t_i) + sum_l 2^-l mse(pool_l f_i, pool_l t_i)) / (1 + sum_l 2^-l)

Layers pair shallow to deep; the last pair is usually the pooled features (a 2-D ``[B, C]`` output counts as
``[B, C, 1, 1]``). Sizes and channels of the ABFs come from the models (the official per-architecture shapes).
The teacher's maps are replayed as they are; the ABFs run online.

Docs: docs/methods/crd-vid-reviewkd.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.terms.features import LayerPairs
from distill_runner.errors import ConfigError
from distill_runner.models.features import feature_shapes


def as_map(x: torch.Tensor) -> torch.Tensor:
    """A feature as a 4-D map: pooled ``[B, C]`` features become ``[B, C, 1, 1]``."""
    return x.view(*x.shape, 1, 1) if x.dim() == 2 else x


def hcl_loss(student_maps, teacher_maps) -> torch.Tensor:
    """The official ``hcl``: per pair, MSE at full size and pooled to 4, 2, 1 (sizes below the map's height)."""
    total = 0.0
    for fs, ft in zip(student_maps, teacher_maps):
        loss, weight, norm = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)) * weight
            norm += weight
        total = total + loss / norm
    return total


class ABF(nn.Module):
    """Attention-based fusion, as the official ``ABF`` (its layers and initialization)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channels * 2, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, deeper=None, out_size=None):
        """``(output at out_size, fused map)``; ``deeper``: the deeper stage's fused map (None for the deepest)."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, deeper], 1))
            x = x * z[:, 0].view(n, 1, h, w) + deeper * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def review(abfs, student_maps, out_sizes) -> list[torch.Tensor]:
    """The ABF outputs, shallow to deep, of the student maps (shallow to deep); ``abfs`` deepest first."""
    maps, sizes = student_maps[::-1], out_sizes[::-1]
    out, fused = abfs[0](maps[0], out_size=sizes[0])
    results = [out]
    for x, abf, size in zip(maps[1:], abfs[1:], sizes[1:]):
        out, fused = abf(x, fused, size)
        results.insert(0, out)
    return results


class ReviewKD(LayerPairs):
    """ReviewKD over layer pairs, shallow to deep: ``[features.0:layer2, features.1:layer3, classifier.2:avgpool]``.
    ``max_mid_channel`` 512: the ABFs' middle width is ``min(512, channels of the deepest student layer)``."""

    def __init__(self, pairs, max_mid_channel: int = 512):
        super().__init__(pairs)
        if not isinstance(max_mid_channel, int) or isinstance(max_mid_channel, bool) or max_mid_channel < 1:
            raise ConfigError("max_mid_channel", max_mid_channel, "use a whole number >= 1 (the official 512)")
        self.max_mid_channel = max_mid_channel
        self.out_sizes: list[tuple[int, int]] = []
        self.abfs = nn.ModuleList()

    def bind(self, student, teacher, data, key):
        super().bind(student, teacher, data, key)  # the pairs, checked against both models
        s_shapes = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)
        t_shapes = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)
        as_chw = lambda shape: tuple(shape) + (1, 1) if len(shape) == 1 else tuple(shape)
        s_chw, t_chw = [as_chw(s_shapes[s]) for s, _, _ in self.pairs], [as_chw(t_shapes[t]) for _, t, _ in self.pairs]
        for i, shape in enumerate(s_chw + t_chw):
            if len(shape) != 3:
                layer = self.student_layers + self.teacher_layers
                fix = f"ReviewKD needs 4-D maps or pooled [B, C] features, got {list(shape)}"
                raise ConfigError(f"{key}.pairs.{i % len(self.pairs)}", layer[i], fix)
        self.build([c for c, _, _ in s_chw], [c for c, _, _ in t_chw], [(h, w) for _, h, w in t_chw])

    def build(self, in_channels: list[int], out_channels: list[int], out_sizes: list[tuple[int, int]]) -> None:
        """ABFs as the official ``ReviewKD.__init__`` (kept deepest first), out_sizes: the teacher maps' sizes."""
        mid = min(self.max_mid_channel, in_channels[-1])
        last = len(in_channels) - 1
        abfs = [ABF(c_in, mid, c_out, i < last) for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels))]
        self.abfs = nn.ModuleList(abfs[::-1])
        self.out_sizes = [tuple(size) for size in out_sizes]

    def forward(self, batch, student, teacher, state):
        maps = [as_map(student["features"][s].float()) for s in self.student_layers]
        outputs = review(self.abfs, maps, self.out_sizes)
        targets = [as_map(teacher["features"][t].float()) for t in self.teacher_layers]
        weights = [w for _, _, w in self.pairs]
        if all(w == 1.0 for w in weights):
            return hcl_loss(outputs, targets)
        return sum(w * hcl_loss([o], [t]) for w, o, t in zip(weights, outputs, targets))
