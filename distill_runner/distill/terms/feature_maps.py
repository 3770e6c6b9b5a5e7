"""Relations inside feature maps: NST, FSP, KDSVD and ICKD, on student/teacher layer pairs.

Pairs are named as for FitNets hints (``{student: features.1, teacher: layer3}``, checked at bind).
NST compares the distributions of the channels' spatial activation patterns, ICKD the channels'
correlations; FSP and KDSVD relate consecutive pairs to each other (the "flow" between two layers),
so they need at least two pairs, each with equal student and teacher channels.

What replay stores: NST, FSP and ICKD keep the teacher's feature maps (their relations depend on the
student's spatial size or are formed per pair of layers); KDSVD keeps only the teacher's leading
right-singular vectors and singular values per sample (``teacher_summary``), all a function of the
frozen teacher alone. The loss math is also a plain function of tensors (``nst_loss``, ``fsp_loss``,
``kdsvd_loss``, ``ickd_loss``).

Docs: docs/methods/relation.md
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.terms.features import LayerPairs
from distill_runner.errors import ConfigError
from distill_runner.models.features import Adapter, feature_shapes


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor, mode: str = "avg") -> tuple[torch.Tensor, torch.Tensor]:
    """Two maps at the smaller one's spatial size (adaptive average pooling; ``max`` as torchdistill's FSP)."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    pool = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    return (pool(a, size) if a.shape[2:] != size else a), (pool(b, size) if b.shape[2:] != size else b)


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """NST (Huang & Wang, 2017): squared MMD with the polynomial kernel ``k(x, y) = (x.y)^2`` between the
    channels' L2-normalized spatial patterns, the larger map pooled to the smaller's size."""
    s, t = pool_to_smaller(s.float(), t.float())
    s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
    return _poly_kernel_mean(t, t).detach() + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


def fsp_matrix(first: torch.Tensor, second: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
    """The FSP matrix [B, C_first, C_second]: spatial mean of the channel products of two maps."""
    first, second = pool_to_smaller(first.float(), second.float(), pooling)
    return first.flatten(2) @ second.flatten(2).transpose(1, 2) / first[0, 0].numel()


def fsp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], style: str = "repdistiller") -> torch.Tensor:
    """FSP (Yim et al., CVPR 2017) over consecutive maps. ``repdistiller``: sum over pairs of the mean squared
    difference (average pooling); ``torchdistill``: sum of column L2 norms / B (max pooling)."""
    pooling = "avg" if style == "repdistiller" else "max"
    total = student[0].new_zeros((), dtype=torch.float32)
    for i in range(len(student) - 1):
        diff = fsp_matrix(student[i], student[i + 1], pooling) - fsp_matrix(teacher[i], teacher[i + 1], pooling)
        total = total + (diff.pow(2).mean() if style == "repdistiller" else diff.norm(dim=1).sum() / len(diff))
    return total


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def right_singular(feature: torch.Tensor, n: int, reshape: str = "repdistiller"):
    """The leading ``n`` right-singular vectors [B, D, n] and singular values [B, n] of a map, each
    L2-normalized. ``repdistiller``: the map as [B, H*W, C] (vectors over channels, as the TF original);
    ``mdistiller``: viewed as [B, C*H, W] (vectors over columns)."""
    b, c, h, w = feature.shape
    x = feature.reshape(b, c, h * w).transpose(1, 2) if reshape == "repdistiller" else feature.reshape(b, c * h, w)
    x = x.float()
    if x.requires_grad:  # the SVD's backward is undefined at repeated singular values (dead channels of a
        x.register_hook(_finite)  # small map, all zero): those entries get no gradient rather than NaN
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = _finite(vh.transpose(1, 2))
    return F.normalize(v[:, :, :n], dim=1), F.normalize(_finite(s)[:, :n], dim=1)


def align_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each of ``b``'s vectors, ``a``'s most (absolutely) cosine-similar one, sign-flipped to agree."""
    cosine = a.transpose(1, 2) @ b
    best = cosine.abs().amax(1, keepdim=True)
    return a @ torch.where(best == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))


def kdsvd_teacher(feature: torch.Tensor, k: int, reshape: str = "repdistiller") -> torch.Tensor:
    """The teacher's side of KDSVD for one map: ``[v; s]`` [B, D + 1, k] (what replay stores)."""
    v, s = right_singular(feature, k, reshape)
    return torch.cat([v, s.unsqueeze(1)], 1)


def _rbf(v: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    return torch.exp(-(v.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / 8)


def kdsvd_loss(student: list[torch.Tensor], teacher_vs: list[torch.Tensor], k: int = 1,
               reshape: str = "repdistiller", weights: list[float] | None = None) -> torch.Tensor:  # fmt: skip
    """KDSVD (Lee et al., ECCV 2018): between consecutive layers, squared difference of the RBF relations of
    the singular-value-scaled right-singular vectors (student's k + 3 aligned to the teacher's k), / B.
    ``teacher_vs``: ``kdsvd_teacher`` of each teacher map."""
    total, previous = student[0].new_zeros((), dtype=torch.float32), None
    for i, (feature, vt_st) in enumerate(zip(student, teacher_vs, strict=True)):
        v_t, s_t = vt_st[:, :-1].float(), vt_st[:, -1:].float()
        v_s = align_signs(right_singular(feature, k + 3, reshape)[0], v_t) * s_t
        v_t = v_t * s_t
        if previous is not None:
            diff = (_rbf(v_s, previous[0]) - _rbf(v_t, previous[1])).pow(2)
            total = total + (1.0 if weights is None else weights[i]) * _finite(diff).sum()
        previous = (v_s, v_t)
    return total / len(student[0])


def ickd_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ICKD (Liu et al., ICCV 2021): squared difference of the row-normalized channel Gram matrices
    [B, C, C], summed, / (C * B). ``s``: the student map embedded to the teacher's channels."""
    b, c = t.shape[:2]
    gram = lambda x: F.normalize(torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2)), dim=2)
    return (gram(s.float()) - gram(t.float())).pow(2).sum() / (c * b)


class NST(LayerPairs):
    """NST (Huang & Wang, 2017): ``sum_i w_i * nst_loss(s_i, t_i)``; channels and sizes may differ."""

    def forward(self, batch, student, teacher, state):
        return sum(w * nst_loss(student["features"][s], teacher["features"][t]) for s, t, w in self.pairs)


class _Flow(LayerPairs):
    """Consecutive pairs related to each other: at least two, each with equal student/teacher channels."""

    def bind(self, student, teacher, data, key):
        super().bind(student, teacher, data, key)
        if len(self.pairs) < 2:
            raise ConfigError(f"{key}.pairs", self._pairs_cfg, "name at least two layer pairs (relations between them)")
        s_shapes = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)
        t_shapes = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)
        for i, (s, t, _) in enumerate(self.pairs):
            cs, ct = s_shapes[s], t_shapes[t]
            if len(cs) != 3 or len(ct) != 3 or cs[0] != ct[0]:
                raise ConfigError(f"{key}.pairs.{i}", f"{s}:{t}", f"{type(self).__name__} needs 4-D maps with equal "
                                  f"channels, got {list(cs)} and {list(ct)}: pick layers of equal widths")  # fmt: skip


class FSP(_Flow):
    """FSP (Yim et al., CVPR 2017) between consecutive pairs. ``style: repdistiller`` (default; the paper
    has no official code) or ``torchdistill``. Pair weights are not used (the official code has none)."""

    def __init__(self, pairs, style: str = "repdistiller"):
        super().__init__(pairs)
        if style not in ("repdistiller", "torchdistill"):
            raise ConfigError("style", style, "use repdistiller (the default) or torchdistill")
        self.style = style

    def forward(self, batch, student, teacher, state):
        s = [student["features"][name] for name in self.student_layers]
        return fsp_loss(s, [teacher["features"][name] for name in self.teacher_layers], self.style)


class KDSVD(_Flow):
    """KDSVD (Lee, Kim, Song; ECCV 2018), as RepDistiller's port of the authors' TF code (``reshape:
    repdistiller``, default) or mdistiller's (``reshape: mdistiller``). Pair i's weight weighs its relation
    to pair i - 1. The teacher side is its singular vectors and values (``teacher_summary``)."""

    def __init__(self, pairs, k: int = 1, reshape: str = "repdistiller"):
        super().__init__(pairs)
        if not isinstance(k, int) or k < 1:
            raise ConfigError("k", k, "use an integer >= 1 (the official k: 1)")
        if reshape not in ("repdistiller", "mdistiller"):
            raise ConfigError("reshape", reshape, "use repdistiller (the default, as the TF original) or mdistiller")
        self.k, self.reshape = k, reshape

    def teacher_summary(self, layer, feature):
        """``[v; s]`` of the teacher map [B, D + 1, k]: its leading right-singular vectors and values."""
        return kdsvd_teacher(feature, self.k, self.reshape)

    def forward(self, batch, student, teacher, state):
        s = [student["features"][name] for name in self.student_layers]
        t = [teacher["features"][name] for name in self.teacher_layers]
        return kdsvd_loss(s, t, self.k, self.reshape, [w for _, _, w in self.pairs])


class ICKD(LayerPairs):
    """ICKD (Liu et al., ICCV 2021): per pair, the student map through a 1x1 conv + BatchNorm to the teacher's
    channels (the official ``embed_s``, trained with the student), then ``ickd_loss``; ``sum_i w_i * loss_i``."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.adapters = nn.ModuleDict()

    def bind(self, student, teacher, data, key):
        super().bind(student, teacher, data, key)
        s_shapes = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)
        t_shapes = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)
        for i, (s, t, _) in enumerate(self.pairs):
            if len(s_shapes[s]) != 3 or len(t_shapes[t]) != 3:
                raise ConfigError(f"{key}.pairs.{i}", f"{s}:{t}", f"ICKD needs 4-D maps, got {list(s_shapes[s])} "
                                  f"and {list(t_shapes[t])}")  # fmt: skip
            self.adapters[str(i)] = Adapter(s_shapes[s][0], t_shapes[t][0])

    def forward(self, batch, student, teacher, state):
        total = 0.0
        for i, (s, t, w) in enumerate(self.pairs):
            x = student["features"][s].float().contiguous()
            total = total + w * ickd_loss(self.adapters[str(i)](x), teacher["features"][t])
        return total
