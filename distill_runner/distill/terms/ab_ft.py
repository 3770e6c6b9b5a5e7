"""Two methods with a stage before the student's training (:meth:`Term.prepare`), as RepDistiller
(github:HobbitLong/RepDistiller: distiller_zoo/AB.py, distiller_zoo/FT.py, models/util.py, helper/pretrain.py).

AB, activation boundaries (Heo et al., AAAI 2019): before training, the student's feature layers and
connectors learn to put their pre-ReLU responses on the teacher's side of zero with a margin
(``ab_loss``); then the student trains as usual (RepDistiller's training adds no AB loss: the recipe's
weight 0; give it a weight to keep it). The teacher side is the sign of its pre-ReLU maps (replayed).

FT, factor transfer (Kim et al., NeurIPS 2018): before training, a paraphraser (conv auto-encoder) learns
to reconstruct the teacher's last stage output; then a translator on the student's last stage is pulled
towards the paraphraser's factors (``ft_loss``). The teacher's features replay; the paraphraser is
trained in the run, so its factors are computed online from them.

Docs: docs/methods/feature-maps.md
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import Term
from distill_runner.distill.terms.ofd import stage_pairs
from distill_runner.errors import ConfigError
from distill_runner.models.features import FeatureTap, feature_shapes

AB_SCALE = 3 / 1000  # RepDistiller's ABLoss: each stage's loss / batch / 1000 * 3


def ab_stage_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """``criterion_alternative_l2``: squared distance of the student's pre-ReLU response to ``-margin``
    where the teacher's is off (<= 0) and the student's above ``-margin``; to ``+margin`` where the
    teacher's is on and the student's below ``margin``; summed."""
    off, on = target <= 0, target > 0
    loss = (source + margin).pow(2) * ((source > -margin) & off) + (source - margin).pow(2) * ((source <= margin) & on)
    return loss.sum()


def ab_loss(sources, targets, margin: float = 1.0) -> torch.Tensor:
    """RepDistiller's ABLoss summed over stages: stage ``i`` of ``n`` weighted ``2^(i-n+1)``, / batch * 3/1000."""
    n, batch = len(sources), sources[0].shape[0]
    return sum(2.0 ** (i - n + 1) * ab_stage_loss(s, t, margin) for i, (s, t) in enumerate(zip(sources, targets))) * (
        AB_SCALE / batch
    )


def factor(f: torch.Tensor, p1: float = 2) -> torch.Tensor:
    """RepDistiller's ``FactorTransfer.factor``: ``normalize(mean_c(f^p1))`` flattened."""
    return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p1: float = 2, p2: int = 1) -> torch.Tensor:
    """RepDistiller's ``factor_loss``: the larger map average-pooled to the smaller's size, then the mean
    absolute (``p2`` = 1) or ``p2``-th power difference of the two ``factor`` maps."""
    s_h, t_h = factor_s.shape[2], factor_t.shape[2]
    if s_h > t_h:
        factor_s = F.adaptive_avg_pool2d(factor_s, (t_h, t_h))
    elif s_h < t_h:
        factor_t = F.adaptive_avg_pool2d(factor_t, (s_h, s_h))
    diff = factor(factor_s, p1) - factor(factor_t, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


def conv_reg(s_shape, t_shape) -> nn.Module:
    """RepDistiller's Connector entry: identity when channels and size agree, else its ``ConvReg`` without
    ReLU: a conv that maps the size (stride-2 3x3 halving, 4x4 transposed doubling, or a valid conv) + BN."""
    (cs, hs, _), (ct, ht, _) = s_shape, t_shape
    if cs == ct and hs == ht:
        return nn.Identity()
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif hs * 2 == ht:
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht:
        conv = nn.Conv2d(cs, ct, 1 + hs - ht)
    else:
        raise ConfigError(
            "pairs", f"{hs}px->{ht}px", "AB's connector cannot enlarge a map but by 2x: pair other stages"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(ct))


def _sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class _Prepared(Term):
    """Prepare-stage settings, RepDistiller's defaults: 30 epochs of SGD (momentum 0.9, weight decay 5e-4)."""

    def __init__(self, prepare_epochs: int, prepare_lr: float, momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__()
        if not isinstance(prepare_epochs, int) or prepare_epochs < 0:
            raise ConfigError("prepare_epochs", prepare_epochs, "use a whole number >= 0 (the official 30)")
        if not prepare_lr > 0:
            raise ConfigError("prepare_lr", prepare_lr, "use a learning rate > 0 (the official 0.05)")
        self.prepare_epochs, self.prepare_lr = prepare_epochs, float(prepare_lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)

    def _train(self, params, batches, step) -> list[float]:
        """``prepare_epochs`` epochs of SGD on ``step(batch, teacher) -> loss``; each epoch's mean loss."""
        optimizer, means = _sgd(params, self.prepare_lr, self.momentum, self.weight_decay), []
        for epoch in range(self.prepare_epochs):
            total, count = 0.0, 0
            for batch, teacher in batches(epoch):
                loss = step(batch, teacher)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, count = total + loss.item(), count + 1
            means.append(total / max(count, 1))
        return means


class ActivationBoundaries(_Prepared):
    """AB: connectors per stage pair (``pairs: stages`` or named stage outputs; pre-ReLU maps of both), an
    initialisation stage of ``prepare_epochs`` training them with the student's feature layers on
    ``ab_loss``; in training the same loss (RepDistiller: weight 0)."""

    def __init__(self, pairs="stages", margin: float = 1.0, prepare_epochs: int = 30, prepare_lr: float = 0.05, **sgd):
        super().__init__(prepare_epochs, prepare_lr, **sgd)
        if not margin > 0:
            raise ConfigError("margin", margin, "use a margin > 0 (the official 1.0)")
        self._pairs_cfg, self.margin = pairs, float(margin)
        self.connectors = nn.ModuleList()

    def bind(self, student, teacher, data, key):
        chosen = stage_pairs(student, teacher, self._pairs_cfg, key, need_pre_relu=True)
        self.student_layers = tuple(s.pre_relu for s, _ in chosen)
        self.teacher_layers = tuple(t.pre_relu for _, t in chosen)
        s_shapes = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)
        t_shapes = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)
        try:
            pairs = zip(self.student_layers, self.teacher_layers)
            self.connectors = nn.ModuleList(conv_reg(s_shapes[s], t_shapes[t]) for s, t in pairs)
        except ConfigError as exc:
            raise exc.under(key) from None

    def teacher_summary(self, layer, feature):
        """The sign of the teacher's pre-ReLU map (1: on, 0: off): all the loss reads of it."""
        return (feature > 0).to(feature.dtype)

    def _loss(self, student_features, teacher) -> torch.Tensor:
        sources = [c(student_features[s].float()) for s, c in zip(self.student_layers, self.connectors)]
        return ab_loss(sources, [teacher["features"][t].float() for t in self.teacher_layers], self.margin)

    def prepare(self, student, batches, device):
        """RepDistiller's init(): the student's layers and the connectors on ``ab_loss`` (the student's head,
        which the loss does not reach, is untouched)."""
        tap, was_training = FeatureTap(student, self.student_layers), student.training
        student.train()
        self.connectors.train()
        try:
            params = [*student.parameters(), *self.connectors.parameters()]
            return self._train(
                params, batches, lambda batch, teacher: self._loss(tap(batch["image"])["features"], teacher)
            )
        finally:
            tap.remove()
            student.train(was_training)

    def forward(self, batch, student, teacher, state):
        return self._loss(student["features"], teacher)


def _leaky_convs(channels, transposed: bool = False, bn: bool = False) -> nn.Sequential:
    """3x3 (transposed) convs through ``channels``, each followed by (BN and) LeakyReLU(0.1)."""
    layers = []
    for c_in, c_out in pairwise(channels):
        layers.append((nn.ConvTranspose2d if transposed else nn.Conv2d)(c_in, c_out, 3, 1, 1))
        layers += [nn.BatchNorm2d(c_out)] if bn else []
        layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


class FactorTransfer(_Prepared):
    """FT on one stage pair (``pairs: stages``: the last stage of each; or one named pair; their outputs,
    after the ReLU). The paraphraser (rate ``k`` = 0.5, no BN) is trained for ``prepare_epochs`` to
    reconstruct the teacher's map (MSE) and then frozen; the translator (with BN) trains with the student."""

    def __init__(self, pairs="stages", k: float = 0.5, p1: float = 2, p2: int = 1, prepare_epochs: int = 30,
                 prepare_lr: float = 0.05, **sgd):  # fmt: skip
        super().__init__(prepare_epochs, prepare_lr, **sgd)
        if not 0 < k <= 1:
            raise ConfigError("k", k, "use a paraphrase rate in (0, 1] (the official 0.5)")
        self._pairs_cfg, self.k, self.p1, self.p2 = pairs, float(k), p1, p2
        self.encoder, self.decoder, self.translator = nn.Sequential(), nn.Sequential(), nn.Sequential()

    def bind(self, student, teacher, data, key):
        chosen = stage_pairs(student, teacher, self._pairs_cfg, key, need_pre_relu=False)
        if len(chosen) != 1 and self._pairs_cfg not in ("stages", "auto"):
            raise ConfigError(f"{key}.pairs", self._pairs_cfg, "FT transfers one stage: name one pair")
        s, t = chosen[-1]
        self.student_layers, self.teacher_layers = (s.output,), (t.output,)
        cs = feature_shapes(student, self.student_layers, data.in_channels, data.image_size)[s.output][0]
        ct = feature_shapes(teacher, self.teacher_layers, data.in_channels, data.image_size)[t.output][0]
        factor_channels = int(ct * self.k)
        self.encoder = _leaky_convs([ct, ct, factor_channels, factor_channels])
        self.decoder = _leaky_convs([factor_channels, factor_channels, ct, ct], transposed=True)
        self.translator = _leaky_convs([cs, cs, factor_channels, factor_channels], bn=True)

    def prepare(self, student, batches, device):
        """RepDistiller's init() for FT: the paraphraser reconstructs the teacher's map; then frozen."""
        (t,) = self.teacher_layers
        paraphraser = [*self.encoder.parameters(), *self.decoder.parameters()]
        reconstruct = lambda batch, teacher: F.mse_loss(
            self.decoder(self.encoder(teacher["features"][t])), teacher["features"][t]
        )
        for p in paraphraser:  # trainable again when prepared a second time (a new stage with this recipe)
            p.requires_grad_(True)
        losses = self._train(paraphraser, batches, reconstruct) if self.prepare_epochs else []
        for p in paraphraser:  # frozen: no gradient, so the student's optimizer leaves it as it is
            p.requires_grad_(False)
        return losses

    def forward(self, batch, student, teacher, state):
        (s,), (t,) = self.student_layers, self.teacher_layers
        with torch.no_grad():
            factor_t = self.encoder(teacher["features"][t].float())
        return ft_loss(self.translator(student["features"][s].float()), factor_t, self.p1, self.p2)
