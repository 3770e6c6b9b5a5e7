"""Contrastive representation distillation (Tian, Krishnan, Isola; ICLR 2020), as RepDistiller's ``CRDLoss``.

Each side's penultimate feature is embedded (linear + L2 normalization) into ``feat_dim`` dimensions; a
memory bank per side holds one embedding per training image (``batch["index"]``). With the teacher's
embedding as anchor, the positive is the student bank's row of the same image and ``nce_k`` negatives are
rows of images of other classes (the official ``mode=exact`` sampling), and symmetrically::

    loss = NCE(exp(<bank_t[idx], v_s> / T) / Z_s) + NCE(exp(<bank_s[idx], v_t> / T) / Z_t)

``Z`` is fixed from the first batch (``mean * N``), and after each step the banks move towards the batch's
embeddings with momentum ``nce_m`` (rows re-normalized). The banks, ``Z`` and the sampler's generator are
part of the recipe's state, so a resumed stage continues exactly. Replay stores the teacher's penultimate
feature (the frozen teacher's alone); the teacher's embedding head and the banks run online.

Docs: docs/methods/crd-vid-reviewkd.md
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from distill_runner.distill.contract import Term
from distill_runner.errors import ConfigError
from distill_runner.models.features import check_layer, feature_shapes

log = logging.getLogger(__name__)
EPS = 1e-7  # the official ContrastLoss's


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """The official ``Normalize(2)``: rows divided by their L2 norm (no epsilon)."""
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def contrast_scores(bank: torch.Tensor, anchor: torch.Tensor, contrast_index: torch.Tensor, nce_t: float):
    """``exp(<bank[contrast_index], anchor> / T)``, [B, K+1]: column 0 the positive, the rest negatives.

    With no more images than contrasts (K+1 >= N, as 16,384 negatives over a small data set) every bank row is
    scored once and the scores picked by index: the same dot products without gathering B x (K+1) rows."""
    bank = bank.detach()
    if bank.shape[0] <= contrast_index.shape[1]:
        scores = (anchor @ bank.clone().T).gather(1, contrast_index)  # a copy: the bank moves after this step
    else:
        rows = bank.index_select(0, contrast_index.reshape(-1)).view(*contrast_index.shape, -1)
        scores = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(scores / nce_t)


def nce_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """The official ``ContrastLoss`` (the paper's Eq. 18) on normalized scores ``p`` [B, K+1]."""
    m, noise = p.shape[1] - 1, 1.0 / n_data
    log_positive = torch.log(p[:, 0] / (p[:, 0] + m * noise + EPS))
    log_negative = torch.log((m * noise) / (p[:, 1:] + m * noise + EPS))
    return -(log_positive.sum() + log_negative.sum()) / p.shape[0]


def crd_loss(v_s, v_t, bank_s, bank_t, contrast_index, nce_t: float, z_s: float, z_t: float, n_data: int):
    """CRD's loss on embeddings ``v_s``, ``v_t`` [B, D] (normalized) and the banks [N, D] before this step:
    the student anchored against the teacher's bank, plus the teacher anchored against the student's."""
    scores_s = contrast_scores(bank_t, v_s, contrast_index, nce_t) / z_s
    scores_t = contrast_scores(bank_s, v_t, contrast_index, nce_t) / z_t
    return nce_loss(scores_s, n_data) + nce_loss(scores_t, n_data)


@torch.no_grad()
def momentum_update(bank: torch.Tensor, v: torch.Tensor, index: torch.Tensor, momentum: float) -> None:
    """The official update: ``bank[i] = normalize(m * bank[i] + (1 - m) * v)`` for the batch's images."""
    rows = bank.index_select(0, index) * momentum + v.detach().to(bank.dtype) * (1 - momentum)
    bank.index_copy_(0, index, l2_normalize(rows))


def available_bytes() -> int | None:
    """Memory free for the banks: the host's MemAvailable, and a GPU's free memory when there is one."""
    free = []
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) * 1024)
    if torch.cuda.is_available():
        free.append(torch.cuda.mem_get_info()[0])
    return min(free) if free else None


def training_labels(train) -> torch.Tensor | None:
    """Each training image's label by its index, when the loader holds them (in-memory and folder data)."""
    targets = getattr(train, "targets", None)
    if targets is None:
        targets = getattr(getattr(train, "dataset", None), "targets", None)
    return None if targets is None else torch.as_tensor(targets, dtype=torch.long).cpu()


class CRD(Term):
    """CRD on one student layer and one teacher layer (their penultimate features, flattened).

    ``feat_dim``, ``nce_k``, ``nce_t``, ``nce_m``: RepDistiller's defaults (128, 16384, 0.07, 0.5);
    ``seed``: the sampler's and the banks' initialization (the run's seed in conf/distill/crd.yaml).
    """

    def __init__(
        self, student_layer: str, teacher_layer: str, feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5, seed=0
    ):
        super().__init__()
        for key, value, official in (("feat_dim", feat_dim, 128), ("nce_k", nce_k, 16384)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(key, value, f"use a whole number >= 1 (RepDistiller: {official})")
        if not isinstance(nce_t, (int, float)) or not nce_t > 0:
            raise ConfigError("nce_t", nce_t, "use a temperature > 0 (RepDistiller: 0.07)")
        if not isinstance(nce_m, (int, float)) or not 0 <= nce_m < 1:
            raise ConfigError("nce_m", nce_m, "use a momentum in [0, 1) (RepDistiller: 0.5)")
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, float(nce_t), float(nce_m)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.n_data = 0

    def bind(self, student, teacher, data, key):
        (s,), (t,) = self.student_layers, self.teacher_layers
        check_layer(student, s, f"{key}.student_layer", "student")
        check_layer(teacher, t, f"{key}.teacher_layer", "teacher")
        n_data = data.train.num_samples
        self.check_memory(n_data, key)
        s_dim = math.prod(feature_shapes(student, (s,), data.in_channels, data.image_size)[s])
        t_dim = math.prod(feature_shapes(teacher, (t,), data.in_channels, data.image_size)[t])
        self.build(s_dim, t_dim, n_data, training_labels(data.train))

    def check_memory(self, n_data: int, key: str) -> None:
        """One log line with the banks' size; one error line before training when they cannot fit."""
        need = 2 * n_data * self.feat_dim * 4
        log.info("CRD memory bank (%s): 2 x %d images x %d dims x 4 bytes = %.2f MB", key, n_data, self.feat_dim,
                 need / 2**20)  # fmt: skip
        free = available_bytes()
        if free is not None and need > free:
            size = f"2 x {n_data} images x {self.feat_dim} x 4 bytes = {need / 2**20:.1f} MB"
            fix = f"the CRD memory bank needs {size}, but {free / 2**20:.1f} MB is free; "
            fix += f"set {key}.feat_dim=64 or lower, or train on fewer images"
            raise ConfigError(f"{key}.feat_dim", self.feat_dim, fix)

    def build(self, s_dim: int, t_dim: int, n_data: int, labels: torch.Tensor | None = None) -> None:
        """The embedding heads and the banks (uniform in +-1/sqrt(feat_dim/3), as the official init)."""
        self.n_data = n_data
        self.embed_s, self.embed_t = nn.Linear(s_dim, self.feat_dim), nn.Linear(t_dim, self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(n_data, self.feat_dim, generator=self.generator) * (2 * stdv) - stdv
            self.register_buffer(name, bank)
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t: set from the first batch
        self.register_buffer("labels", labels, persistent=False)
        if labels is None:
            log.info("CRD: the training loader holds no labels; negatives are drawn from all images")

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def contrast_index(self, index: torch.Tensor) -> torch.Tensor:
        """[B, 1 + nce_k]: the image itself, then ``nce_k`` images of other classes drawn without replacement
        (with it where a class has fewer; ``CIFAR100InstanceSample``, mode exact), from the seeded generator."""
        index = index.cpu()
        if self.labels is None:
            negatives = torch.randint(0, self.n_data, (len(index), self.nce_k), generator=self.generator)
        else:
            labels = self.labels.cpu()
            allowed = (labels[None, :] != labels[index][:, None]).float()
            replace = allowed.sum(1) < self.nce_k
            negatives = torch.empty(len(index), self.nce_k, dtype=torch.long)
            for rows in (replace, ~replace):
                if rows.any():
                    draw = torch.multinomial(allowed[rows], self.nce_k, bool(rows is replace), generator=self.generator)
                    negatives[rows] = draw
        return torch.cat([index[:, None], negatives], 1)

    def forward(self, batch, student, teacher, state):
        (s,), (t,) = self.student_layers, self.teacher_layers
        with torch.autocast(self.memory_s.device.type, enabled=False):  # exp(score / 0.07) overflows float16
            return self.contrast(batch["index"], student["features"][s], teacher["features"][t])

    def contrast(self, index: torch.Tensor, feature_s: torch.Tensor, feature_t: torch.Tensor) -> torch.Tensor:
        """The loss of one batch, then the banks' momentum update (float32)."""
        v_s = l2_normalize(self.embed_s(feature_s.float().flatten(1)))
        v_t = l2_normalize(self.embed_t(feature_t.float().flatten(1)))
        index = index.to(self.memory_s.device)
        contrast_index = self.contrast_index(index).to(index.device)
        if self.z[0] < 0:  # the official normalization constants: mean score x N on the first batch, then fixed
            with torch.no_grad():
                self.z[0] = contrast_scores(self.memory_t, v_s, contrast_index, self.nce_t).mean() * self.n_data
                self.z[1] = contrast_scores(self.memory_s, v_t, contrast_index, self.nce_t).mean() * self.n_data
        z_s, z_t = self.z.tolist()
        loss = crd_loss(v_s, v_t, self.memory_s, self.memory_t, contrast_index, self.nce_t, z_s, z_t, self.n_data)
        momentum_update(self.memory_s, v_s, index, self.nce_m)
        momentum_update(self.memory_t, v_t, index, self.nce_m)
        return loss
