"""Loss terms that recipes combine: the math (functions) and the configurable terms (modules).

Every function computes in float32 (safe under autocast). Per-sample losses (KD, DKD) return one
value per sample so a recipe can weight samples (class balance, teacher confidence) before the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.losses import CrossEntropy
from distill_runner.errors import ConfigError
from distill_runner.models.features import Adapter, check_layer, feature_shapes, resize_to

# ----------------------------------------------------------------------------------------- math


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD per sample: ``T^2 * KL(softmax(t/T) || softmax(s/T))``; its mean is ``kd_divergence``."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * (t * t)


def dkd_per_sample(
    student_logits, teacher_logits, target, alpha: float, beta: float, temperature: float
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022) per sample: ``alpha * TCKD + beta * NCKD``, times T^2.

    TCKD is the KL between the binary (target, non-target) distributions of teacher and student;
    NCKD the KL between their distributions over the non-target classes. The mean over the batch
    equals mdistiller's ``dkd_loss`` (computed here in log space instead of log(softmax), and with
    the target class masked out exactly instead of by subtracting 1000 from its logit).
    """
    t = temperature
    s, tt = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(target, s.shape[1]).bool()

    # binary distributions: log p(target), log p(non-target)
    def binary(z):
        log_all = torch.logsumexp(z, 1)
        log_gt = z.masked_fill(~gt, float("-inf")).logsumexp(1) - log_all
        log_other = z.masked_fill(gt, float("-inf")).logsumexp(1) - log_all
        return torch.stack([log_gt, log_other], 1)

    b_s, b_t = binary(s), binary(tt)
    tckd = (b_t.exp() * (b_t - b_s)).sum(1)
    log_q_s = F.log_softmax(s.masked_fill(gt, float("-inf")), 1)
    log_q_t = F.log_softmax(tt.masked_fill(gt, float("-inf")), 1)
    nckd = torch.where(gt, 0.0, log_q_t.exp() * (log_q_t - log_q_s)).sum(1)
    return (alpha * tckd + beta * nckd) * (t * t)


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis (ICLR 2017) spatial attention: ``normalize(mean_c(x^p))`` flattened [B, H*W]."""
    return F.normalize(x.float().pow(p).mean(1).view(x.size(0), -1))


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The authors' ``at_loss``: mean squared difference of the normalized attention maps."""
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


BALANCE_METHODS = ("inverse_frequency", "effective_number")


def class_balance_weights(counts: Sequence[int], method: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class weights from training class counts, normalized to sum to the number of classes.

    ``inverse_frequency``: w_c ~ 1 / n_c. ``effective_number`` (Cui et al., CVPR 2019):
    w_c ~ (1 - beta) / (1 - beta^n_c). Classes with no training samples get weight 0.
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    present = n > 0
    if method == "inverse_frequency":
        w = torch.where(present, 1.0 / n.clamp_min(1), 0.0)
    elif method == "effective_number":
        w = torch.where(present, (1 - beta) / (1 - beta ** n.clamp_min(1)), 0.0)
    else:
        raise ConfigError("class_balance", method, f"use null, {' or '.join(BALANCE_METHODS)}")
    return (w * present.sum() / w.sum()).float()


def teacher_confidence_weights(teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample weights: the teacher's probability of the true class (T=1), scaled to mean 1."""
    conf = F.softmax(teacher_logits.float(), 1).gather(1, target[:, None]).squeeze(1)
    return conf / conf.mean().clamp_min(1e-12)


# ---------------------------------------------------------------------------------------- terms


class Term(nn.Module):
    """One loss term: ``forward(batch, student, teacher, state) -> unweighted scalar``.

    ``state`` holds the recipe's current ``temperature``, ``alpha``, ``beta`` and per-sample
    ``sample_weights`` (or None). ``bind`` sees the models before training (checks layer names,
    builds adapters/heads).
    """

    needs_teacher = True
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()

    def bind(self, student: nn.Module, teacher: nn.Module | None, data, key: str) -> None:
        pass


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.mean() if weights is None else (values * weights).mean()


class CETerm(Term):
    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0, class_weights=None):
        super().__init__()
        self.ce = CrossEntropy(label_smoothing, class_weights)

    def forward(self, batch, student, teacher, state):
        return self.ce(batch, student)["ce"]


class KDTerm(Term):
    """Hinton KD at the recipe's temperature, per-sample weighted when the recipe says so."""

    def forward(self, batch, student, teacher, state):
        values = kd_per_sample(student["logits"], teacher["logits"], state["temperature"])
        return _weighted_mean(values, state["sample_weights"])


class DKDTerm(Term):
    """Decoupled KD with the recipe's alpha (TCKD), beta (NCKD) and temperature."""

    def forward(self, batch, student, teacher, state):
        values = dkd_per_sample(
            student["logits"], teacher["logits"], batch["target"], state["alpha"], state["beta"], state["temperature"]
        )
        return _weighted_mean(values, state["sample_weights"])


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


class _PairTerm(Term):
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


class FeatureTerm(_PairTerm):
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
            if str(i) in self.adapters:
                x = self.adapters[str(i)](x)
            y = teacher["features"][t].float()
            total = total + w * F.mse_loss(resize_to(x.float(), y), y)
            norm += w
        return total / norm


class AttentionTerm(_PairTerm):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): ``sum_i w_i * at_loss(s_i, t_i)``.

    The student map is resized to the teacher's spatial size when they differ; channels may differ.
    """

    def __init__(self, pairs, p: float = 2.0):
        super().__init__(pairs)
        if not p > 0:
            raise ConfigError("p", p, "use a power > 0 (the paper uses 2)")
        self.p = float(p)

    def forward(self, batch, student, teacher, state):
        total = 0.0
        for s, t, w in self.pairs:
            y = teacher["features"][t]
            total = total + w * at_loss(resize_to(student["features"][s].float(), y), y, self.p)
        return total


class AuxHead(nn.Module):
    """1x1 conv + BN + ReLU bottleneck, global average pooling, linear classifier."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        z = self.bottleneck(x.float()).mean((2, 3))
        return z, self.fc(z)


class SelfTerm(Term):
    """Self-distillation (Zhang et al., "Be Your Own Teacher", ICCV 2019), no separate teacher.

    Each named shallow student layer gets an auxiliary head (trained with the student, not
    shipped). Per head: ``(1 - alpha) * CE(head, y) + alpha * KD(head || final logits, T)`` with
    the final logits detached, plus ``hint_weight * MSE(head bottleneck, pooled deepest features)``
    when ``deepest`` names a student layer. Averaged over heads.
    """

    needs_teacher = False

    def __init__(self, heads: Sequence[str], deepest: str | None = None, width: int = 64, hint_weight: float = 0.0):
        super().__init__()
        self._heads_cfg, self.deepest, self.width, self.hint_weight = heads, deepest, int(width), float(hint_weight)
        self.heads = nn.ModuleDict()
        self.names: list[str] = []

    def bind(self, student, teacher, data, key):
        if not self._heads_cfg:
            raise ConfigError(
                f"{key}.heads", self._heads_cfg, "name at least one shallow student layer, e.g. [features.0]"
            )
        self.names = list(self._heads_cfg)
        for i, name in enumerate(self.names):
            check_layer(student, name, f"{key}.heads.{i}", "student")
        if self.deepest is not None:
            check_layer(student, self.deepest, f"{key}.deepest", "student")
        layers = self.names + ([self.deepest] if self.deepest else [])
        shapes = feature_shapes(student, layers, data.in_channels, data.image_size)
        width = shapes[self.deepest][0] if self.deepest else self.width
        for i, name in enumerate(self.names):
            self.heads[str(i)] = AuxHead(shapes[name][0], width, data.num_classes)
        self.student_layers = tuple(layers)

    def forward(self, batch, student, teacher, state):
        alpha, temp = state["alpha"], state["temperature"]
        final = student["logits"].detach()
        deep = student["features"][self.deepest].detach().float().mean((2, 3)) if self.deepest else None
        total = 0.0
        for i, name in enumerate(self.names):
            z, logits = self.heads[str(i)](student["features"][name])
            loss = (1 - alpha) * F.cross_entropy(logits, batch["target"]) + alpha * kd_per_sample(
                logits, final, temp
            ).mean()
            if deep is not None and self.hint_weight:
                loss = loss + self.hint_weight * F.mse_loss(z, deep)
            total = total + loss
        return total / len(self.names)


TERM_TYPES = {
    "ce": CETerm,
    "kd": KDTerm,
    "dkd": DKDTerm,
    "feature": FeatureTerm,
    "attention": AttentionTerm,
    "self": SelfTerm,
}
