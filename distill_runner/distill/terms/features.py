"""Terms on intermediate features: FitNets hints and attention transfer.

Both pair student layers with teacher layers by module path (``features.1``, ``layer3``); the
names are checked against the models at bind, before any training. FitNets reads the teacher's
features themselves; attention transfer only their attention maps (its ``teacher_summary``: what
replay stores for it, about 1/C of the feature).

Docs: docs/methods/feature.md
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import Term
from distill_runner.errors import ConfigError
from distill_runner.models.features import Adapter, check_layer, feature_shapes, resize_to


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis (ICLR 2017) spatial attention: ``normalize(mean_c(x^p))`` flattened [B, H*W]."""
    return F.normalize(x.float().pow(p).mean(1).view(x.size(0), -1))


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The authors' ``at_loss``: mean squared difference of the normalized attention maps."""
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


def same_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` (no gradient) in ``x``'s memory layout, values unchanged (an MSE across layouts is slower)."""
    return y if y.stride() == x.stride() else torch.empty_like(x).copy_(y)


def parse_pairs(pairs, key: str) -> list[tuple[str, str, float]]:
    """``[{student: features.1, teacher: layer3, weight: 1.0}, "features.0:layer2", ...]``."""
    if not pairs:
        raise ConfigError(key, pairs, "name at least one layer pair, e.g. [{student: features.1, teacher: layer3}]")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) and ":" in pair:
            s, t = pair.split(":", 1)
            out.append((s.strip(), t.strip(), 1.0))
        elif isinstance(pair, Mapping) and "student" in pair and "teacher" in pair:
            out.append((pair["student"], pair["teacher"], float(pair.get("weight", 1.0))))
        else:
            raise ConfigError(
                f"{key}.{i}",
                pair,
                "use {student: <module path>, teacher: <module path>, weight: 1.0} or 'student_path:teacher_path'",
            )
    return out


class LayerPairs(Term):
    def __init__(self, pairs):
        super().__init__()
        self._pairs_cfg = pairs
        self.pairs: list[tuple[str, str, float]] = []

    def bind(self, student, teacher, data, key):
        self.pairs = parse_pairs(self._pairs_cfg, f"{key}.pairs")
        for i, (s, t, _) in enumerate(self.pairs):
            check_layer(student, s, f"{key}.pairs.{i}.student", "student")
            check_layer(teacher, t, f"{key}.pairs.{i}.teacher", "teacher")
        self.student_layers = tuple(s for s, _, _ in self.pairs)
        self.teacher_layers = tuple(t for _, t, _ in self.pairs)


class FeatureHints(LayerPairs):
    """FitNets hints (Romero et al., ICLR 2015): MSE between teacher maps and adapted student maps.

    Per pair: a 1x1 conv + BatchNorm adapter when channels differ (``adapter: always`` to force
    one), bilinear resize of the student map when spatial sizes differ; pair losses are averaged
    with their weights: ``sum(w_i * mse_i) / sum(w_i)``.
    """

    def __init__(self, pairs, adapter: str = "auto"):
        super().__init__(pairs)
        if adapter not in ("auto", "always"):
            raise ConfigError("adapter", adapter, "use auto (only when channels differ) or always")
        self.adapter_mode = adapter
        self.adapters = nn.ModuleDict()

    def bind(self, student, teacher, data, key):
        super().bind(student, teacher, data, key)
        s_shapes = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)
        t_shapes = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)
        for i, (s, t, _) in enumerate(self.pairs):
            if len(s_shapes[s]) != 3 or len(t_shapes[t]) != 3:
                raise ConfigError(
                    f"{key}.pairs.{i}",
                    f"{s}:{t}",
                    f"feature hints need 4-D feature maps, got {list(s_shapes[s])} and {list(t_shapes[t])}",
                )
            cs, ct = s_shapes[s][0], t_shapes[t][0]
            if cs != ct or self.adapter_mode == "always":
                self.adapters[str(i)] = Adapter(cs, ct)

    def forward(self, batch, student, teacher, state):
        total, norm = 0.0, 0.0
        for i, (s, t, w) in enumerate(self.pairs):
            x = student["features"][s]
            if x.device.type == "cpu":  # the shift augmentation yields channels_last images, hence maps, on which
                x = x.contiguous()  # a CPU's 1x1 conv + BatchNorm backward (the adapter) runs about 4x slower
            if str(i) in self.adapters:
                x = self.adapters[str(i)](x)
            y = teacher["features"][t].float()
            x = resize_to(x.float(), y)
            total = total + w * F.mse_loss(x, same_layout(y, x))
            norm += w
        return total / norm


class AttentionTransfer(LayerPairs):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): ``sum_i w_i * at_loss(s_i, t_i)``.

    The student map is resized to the teacher's spatial size when they differ; channels may differ.
    Of the teacher it reads only the attention maps (``teacher_summary``), given as ``[B, H, W]``.
    """

    def __init__(self, pairs, p: float = 2.0):
        super().__init__(pairs)
        if not p > 0:
            raise ConfigError("p", p, "use a power > 0 (the paper uses 2)")
        self.p = float(p)

    def teacher_summary(self, layer, feature):
        """The teacher's normalized attention map, ``attention_map`` shaped [B, H, W] (not flattened:
        the student map is resized to its H x W)."""
        return attention_map(feature, self.p).view(feature.shape[0], *feature.shape[2:])

    def forward(self, batch, student, teacher, state):
        total = 0.0
        for s, t, w in self.pairs:
            y = teacher["features"][t]  # the teacher's attention map (teacher_summary)
            x = attention_map(resize_to(student["features"][s].float(), y), self.p)
            total = total + w * (x - y.float().flatten(1)).pow(2).mean()  # at_loss, the teacher's map given
        return total
