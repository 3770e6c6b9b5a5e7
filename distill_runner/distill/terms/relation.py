"""Relations between the samples of a batch: RKD, PKT, SP and CC, each on one student/teacher layer pair.

Each term compares how the samples of a batch relate to each other (distances, angles, cosine
similarities, Gram matrices) in the student's and the teacher's representation, so the two may have
different widths. A layer is a module path (``avgpool``, ``classifier.2``); its output is flattened per
sample, or first averaged over space with ``pool: true`` (a 4-D map to its pooled embedding).

The teacher side reads only the frozen teacher's per-sample features: ``teacher_summary`` keeps the
flattened (pooled) feature per sample, which replay stores; the batch relation is then formed from
the replayed rows exactly as from the online ones. The loss math is also a plain function of tensors
(``rkd_loss``, ``pkt_loss``, ``sp_loss``, ``cc_loss``, ``cc_gaussian_loss``).

Docs: docs/methods/relation.md
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import Term
from distill_runner.errors import ConfigError
from distill_runner.models.features import check_layer, feature_shapes


def embedding(x: torch.Tensor, pool: bool = False) -> torch.Tensor:
    """A feature as one row per sample [B, D]: a 4-D map averaged over space first when ``pool``."""
    if pool and x.dim() == 4:
        x = x.mean((2, 3))
    return x.flatten(1).float()


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows [B, B], from the Gram matrix (clamped at ``eps`` before the root,
    as the RKD authors' ``pdist``), zero on the diagonal (without a gradient there)."""
    squared = e.pow(2).sum(1)
    d = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=d.dtype))


def rkd_distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the pairwise distances, each divided by its mean over the nonzero distances."""
    with torch.no_grad():
        td = pairwise_distances(t)
        td = td / td[td > 0].mean()
    d = pairwise_distances(s)
    return F.smooth_l1_loss(d / d[d > 0].mean(), td)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at every sample j between every i and k: <e_i - e_j, e_k - e_j> normalized [B*B*B]."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ta = triplet_angles(t)
    return F.smooth_l1_loss(triplet_angles(s), ta)


def rkd_loss(s: torch.Tensor, t: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0) -> torch.Tensor:
    """RKD (Park et al., CVPR 2019): ``w_d * distance + w_a * angle`` on embeddings [B, D_s], [B, D_t]."""
    loss = s.new_zeros(())
    if w_d:
        loss = loss + w_d * rkd_distance_loss(s, t)
    if w_a:
        loss = loss + w_a * rkd_angle_loss(s, t)
    return loss


def _cosine_probabilities(e: torch.Tensor, eps: float) -> torch.Tensor:
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    e = torch.where(e.isnan(), torch.zeros_like(e), e)
    similarity = (e @ e.t() + 1.0) / 2.0  # cosine similarity in [0, 1]
    return similarity / similarity.sum(1, keepdim=True)


def pkt_loss(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT (Passalis & Tefas, ECCV 2018): KL between the rows' cosine-similarity distributions, as the
    author's code: ``mean(p_t * log((p_t + eps) / (p_s + eps)))``."""
    ps, pt = _cosine_probabilities(s, eps), _cosine_probabilities(t, eps)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def similarity_matrix(e: torch.Tensor, row_norm: str = "l2") -> torch.Tensor:
    """The batch's Gram matrix with each row normalized (L2 as RepDistiller; L1 as torchdistill)."""
    return F.normalize(e @ e.t(), p=2.0 if row_norm == "l2" else 1.0, dim=1)


def sp_loss(s: torch.Tensor, t: torch.Tensor, row_norm: str = "l2") -> torch.Tensor:
    """SP (Tung & Mori, ICCV 2019): ``||G_t - G_s||_F^2 / B^2`` of the row-normalized Gram matrices."""
    diff = similarity_matrix(t, row_norm) - similarity_matrix(s, row_norm)
    return diff.pow(2).sum() / len(s) ** 2


def cc_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CC as the authors' code in RepDistiller: with ``d = |s - t|``, mean over consecutive samples of
    ``sum_k d_i,k * d_i+1,k`` (embeddings of one width)."""
    delta = (s - t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


def gaussian_correlation(e: torch.Tensor, gamma: float, max_p: int) -> torch.Tensor:
    """torchdistill's CCKD kernel: exp(-2 gamma) * sum_{p<=max_p} (2 gamma)^p / p! * (e e^T)^p (Taylor terms)."""
    gram = e @ e.t()
    kernel = torch.ones_like(gram)
    for p in range(1, max_p + 1):
        kernel = kernel + (2 * gamma) ** p / math.factorial(p) * gram.pow(p)
    return kernel * math.exp(-2 * gamma)


def cc_gaussian_loss(s: torch.Tensor, t: torch.Tensor, gamma: float = 0.4, max_p: int = 2) -> torch.Tensor:
    """torchdistill's CCKDLoss (gaussian kernel, batchmean): ``||C_s - C_t||_F / B^2``."""
    diff = gaussian_correlation(s, gamma, max_p) - gaussian_correlation(t, gamma, max_p)
    return diff.norm() / len(s) ** 2


class _BatchRelation(Term):
    """One student layer against one teacher layer, each read as per-sample rows (see the module doc)."""

    def __init__(self, student: str, teacher: str, pool: bool = False):
        super().__init__()
        if not isinstance(pool, bool):
            raise ConfigError("pool", pool, "use true (average a 4-D map over space first) or false (flatten it)")
        self.student, self.teacher, self.pool = student, teacher, pool

    def bind(self, student, teacher, data, key):
        check_layer(student, self.student, f"{key}.student", "student")
        check_layer(teacher, self.teacher, f"{key}.teacher", "teacher")
        self.student_layers, self.teacher_layers = (self.student,), (self.teacher,)

    def teacher_summary(self, layer, feature):
        """The teacher's per-sample row (pooled when ``pool``): what replay stores for this term."""
        return embedding(feature, self.pool)

    def rows(self, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        return embedding(student["features"][self.student], self.pool), teacher["features"][self.teacher].float()


class RKD(_BatchRelation):
    """RKD (Park, Kim, Lu, Cho; CVPR 2019): ``w_d * distance loss + w_a * angle loss`` (authors': 25, 50)."""

    def __init__(self, student: str, teacher: str, pool: bool = False, w_d: float = 25.0, w_a: float = 50.0):
        super().__init__(student, teacher, pool)
        for key, value in (("w_d", w_d), ("w_a", w_a)):
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(key, value, "use a weight >= 0 (the authors use w_d=25, w_a=50)")
        self.w_d, self.w_a = float(w_d), float(w_a)

    def forward(self, batch, student, teacher, state):
        return rkd_loss(*self.rows(student, teacher), self.w_d, self.w_a)


class PKT(_BatchRelation):
    """PKT (Passalis & Tefas, ECCV 2018): probabilistic knowledge transfer with cosine kernels."""

    def forward(self, batch, student, teacher, state):
        return pkt_loss(*self.rows(student, teacher))


class SimilarityPreserving(_BatchRelation):
    """SP (Tung & Mori, ICCV 2019); ``row_norm: l2`` as RepDistiller (default), ``l1`` as torchdistill."""

    def __init__(self, student: str, teacher: str, pool: bool = False, row_norm: str = "l2"):
        super().__init__(student, teacher, pool)
        if row_norm not in ("l2", "l1"):
            raise ConfigError("row_norm", row_norm, "use l2 (RepDistiller, the default) or l1 (torchdistill)")
        self.row_norm = row_norm

    def forward(self, batch, student, teacher, state):
        return sp_loss(*self.rows(student, teacher), self.row_norm)


class CorrelationCongruence(_BatchRelation):
    """CC (Peng et al., ICCV 2019). As RepDistiller's train_student.py: both rows go through a linear
    embedding to ``embed_dim`` (128; trained with the student, applied to the replayed teacher rows too),
    then ``cc_loss``. ``embed_dim: null`` compares the rows as they are (equal widths needed).
    ``kernel: gaussian`` is torchdistill's CCKDLoss (Taylor-expanded RBF, ``gamma``, ``max_p``)."""

    def __init__(self, student: str, teacher: str, pool: bool = False, embed_dim: int | None = 128,
                 kernel: str = "repdistiller", gamma: float = 0.4, max_p: int = 2):  # fmt: skip
        super().__init__(student, teacher, pool)
        if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim < 1):
            raise ConfigError("embed_dim", embed_dim, "use a width >= 1 (RepDistiller's feat_dim: 128) or null")
        if kernel not in ("repdistiller", "gaussian"):
            raise ConfigError("kernel", kernel, "use repdistiller (the default) or gaussian (torchdistill's CCKD)")
        if not isinstance(max_p, int) or max_p < 1:
            raise ConfigError("max_p", max_p, "use an integer >= 1 (torchdistill's example: 2)")
        self.embed_dim, self.kernel, self.gamma, self.max_p = embed_dim, kernel, float(gamma), max_p
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()

    def bind(self, student, teacher, data, key):
        super().bind(student, teacher, data, key)
        ds, dt = row_width(student, self.student, data, self.pool), row_width(teacher, self.teacher, data, self.pool)
        if self.embed_dim is None:
            if ds != dt:
                raise ConfigError(f"{key}.embed_dim", None, f"student rows have {ds} values, teacher rows {dt}: "
                                  "set embed_dim (e.g. 128) or pick layers of one width")  # fmt: skip
            return
        self.embed_s, self.embed_t = nn.Linear(ds, self.embed_dim), nn.Linear(dt, self.embed_dim)

    def forward(self, batch, student, teacher, state):
        s, t = self.rows(student, teacher)
        s, t = self.embed_s(s), self.embed_t(t)
        if self.kernel == "gaussian":
            return cc_gaussian_loss(s, t, self.gamma, self.max_p)
        return cc_loss(s, t)


def row_width(model: nn.Module, layer: str, data, pool: bool) -> int:
    """How many values ``embedding`` gives per sample for ``layer``: a pooled 4-D map keeps its channels."""
    shape = feature_shapes(model, [layer], data.in_channels, data.image_size)[layer]
    return shape[0] if pool and len(shape) == 3 else math.prod(shape)
