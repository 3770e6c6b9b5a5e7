"""SimKD, knowledge distillation with the reused teacher classifier (Chen, Mei, Zhang, Wang, Feng, Chen; CVPR 2022).

The student's final feature map goes through a trainable projector (the official factor-``f`` bottleneck:
1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv, BN, ReLU, from the student's channels to the teacher's) and
is matched to the teacher's final feature map by MSE; the spatial sizes are aligned first by average-pooling
the larger map to the smaller one's size. The student predicts by the projected map, average-pooled, through
the teacher's FROZEN classifier: at inference too. So the projector and a frozen copy of the teacher's head
ship with the student: :meth:`SimKD.deployed` returns that model (:class:`SimKDStudent`), which the runner
trains, validates, checkpoints, evaluates and exports as the KD student.

:class:`SimKDStudent` registers the student's own submodules under their own names (layer names and checkpoint
keys of the student part do not change), plus ``simkd_projector`` and ``simkd_teacher_head``. It runs the
student whole (its own classifier's output is unused, as in the official inference) and reads the feature map
through a forward hook. Once deployed, the projector belongs to the deployed model (the recipe no longer holds
it: it is optimized and saved once) and the term reads its output (``simkd_projector``) instead of running it
again; before that (a bare student, as the replay check uses) the term runs the projector itself.

The teacher side is a function of the frozen teacher alone: ``teacher_summary`` keeps its final feature map
(pooled to the student's size when larger), which replay stores; the head is copied when the model is
deployed, after the teacher's training. The loss math is a plain function of tensors: :func:`simkd_loss`.

Docs: docs/methods/recent.md
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.terms.sdd import classifier_head
from distill_runner.errors import ConfigError
from distill_runner.models.factories import architecture, count_parameters
from distill_runner.models.features import INPUT, check_layer, feature_shapes

log = logging.getLogger(__name__)

PROJECTOR, HEAD = "simkd_projector", "simkd_teacher_head"  # module names in the deployed student


def projector(student_channels: int, teacher_channels: int, factor: int = 2) -> nn.Sequential:
    """The official ``SimKD.transfer`` bottleneck (state_dict keys as ``transfer.*`` there, without the prefix)."""
    mid = teacher_channels // factor
    return nn.Sequential(
        nn.Conv2d(student_channels, mid, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, teacher_channels, 1, bias=False),
        nn.BatchNorm2d(teacher_channels),
        nn.ReLU(inplace=True),
    )


def align(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official spatial alignment: the larger map average-pooled to the smaller one's (square) size."""
    s, t = student.shape[2], teacher.shape[2]
    if s > t:
        return F.adaptive_avg_pool2d(student, (t, t)), teacher
    return student, F.adaptive_avg_pool2d(teacher, (s, s))


def predict(projected: torch.Tensor, teacher_head: nn.Module) -> torch.Tensor:
    """Logits from the projected map: global average pool, then the teacher's classifier."""
    return teacher_head(F.adaptive_avg_pool2d(projected, 1).flatten(1))


def simkd_loss(student_feature, teacher_feature, project: nn.Module, teacher_head: nn.Module | None = None):
    """The official SimKD step on tensors: ``(MSE(projected student, teacher), logits or None)``; the teacher side
    takes no gradient."""
    source, target = align(student_feature, teacher_feature.detach())
    projected = project(source)
    logits = predict(projected, teacher_head) if teacher_head is not None else None
    return F.mse_loss(projected, target), logits


class SimKDStudent(nn.Module):
    """The deployed SimKD student: the student's feature map at ``layer`` -> (pooled to ``pool_to`` when set) ->
    projector -> average pool -> the teacher's frozen classifier. The student's submodules keep their names."""

    def __init__(self, student: nn.Module, layer: str, project: nn.Module, teacher_head: nn.Module, pool_to):
        super().__init__()
        for name, child in student.named_children():
            self.add_module(name, child)
        self.add_module(PROJECTOR, project)
        self.add_module(HEAD, teacher_head.requires_grad_(False))
        self._student = [student]  # its forward, outside the module tree: its modules are registered above
        self.layer, self.pool_to = layer, pool_to
        self.architecture = f"{architecture(student)}+SimKD projector+teacher head"
        self.includes = (
            f"the SimKD projector ({count_parameters(project):,} parameters) and a frozen copy of the "
            f"teacher's classifier ({count_parameters(teacher_head):,} parameters)"
        )
        self.train(student.training)

    @torch.enable_grad()
    def freeze_unused(self, image_shape: tuple[int, int, int]) -> list[str]:
        """Freeze the student's parameters the prediction does not depend on (its own classifier): they get no
        gradient anyway, and DistributedDataParallel requires one for every trainable parameter. Returns their
        names."""
        was_training, trainable = self.training, [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        self.eval()  # a dry run: no BatchNorm statistics move
        try:
            device = trainable[0][1].device
            logits = self(torch.zeros(2, *image_shape, device=device))
            grads = torch.autograd.grad(logits.sum(), [p for _, p in trainable], allow_unused=True)
        finally:
            self.train(was_training)
        unused = [(n, p) for (n, p), g in zip(trainable, grads) if g is None]
        for _, p in unused:
            p.requires_grad_(False)
        return [n for n, _ in unused]

    def train(self, mode: bool = True):
        super().train(mode)
        getattr(self, HEAD).eval()  # frozen: dropout or BatchNorm in a teacher head stay in inference mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        seen = []
        hook = self.get_submodule(self.layer).register_forward_hook(lambda module, inputs, out: seen.append(out))
        try:
            self._student[0](images)  # its own logits are not used
        finally:
            hook.remove()
        feature = seen[-1]
        if self.pool_to is not None:
            feature = F.adaptive_avg_pool2d(feature, (self.pool_to, self.pool_to))
        return predict(getattr(self, PROJECTOR)(feature), getattr(self, HEAD))


class SimKD(Term):
    """SimKD between the student's final feature map ``student`` and the teacher's ``teacher``, the teacher's
    classifier ``teacher_head`` (a module mapping its pooled feature to the logits) reused by the student;
    ``factor`` the projector's bottleneck (official default 2; the paper also reports 4 and 8)."""

    def __init__(self, student: str, teacher: str, teacher_head: str = "fc", factor: int = 2):
        super().__init__()
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ConfigError("factor", factor, "use a whole number >= 1 (official 2; the paper also reports 4, 8)")
        for key, layer in (("student", student), ("teacher", teacher)):
            if isinstance(layer, str) and layer.endswith(INPUT):
                raise ConfigError(key, layer, "SimKD reads a module's output: name the final conv stage, e.g. layer4")
        self.student, self.teacher, self.teacher_head, self.factor = student, teacher, teacher_head, factor
        self.sizes = (0, 0)  # the student's and the teacher's map sizes (bind)
        self.image_shape = (3, 32, 32)  # [C, H, W] of the data's images (bind)
        self._teacher_head: list[nn.Module] = []  # the teacher's classifier, outside the module tree
        self._deployed_projector: list[nn.Module] = []  # the projector once it belongs to the deployed student

    def bind(self, student, teacher, data, key):
        if teacher is None:
            raise ConfigError(key, "simkd", "SimKD reuses the teacher's classifier: the recipe needs a teacher")
        clash = [n for n in (PROJECTOR, HEAD) if n in dict(student.named_children())]
        if clash or any(True for _ in student.named_parameters(recurse=False)):
            fix = f"the student must keep its parameters in submodules not named {PROJECTOR} or {HEAD}"
            raise ConfigError(f"{key}.student", type(student).__name__, fix)
        cs, hs = self._map(student, self.student, data, f"{key}.student", "student")
        ct, ht = self._map(teacher, self.teacher, data, f"{key}.teacher", "teacher")
        if ct // self.factor < 1:
            raise ConfigError(f"{key}.factor", self.factor, f"must be at most the teacher's {ct} channels")
        head = classifier_head(teacher, self.teacher_head, ct, data.num_classes, f"{key}.teacher_head", "teacher")
        self._teacher_head = [head]
        self.projector = projector(cs, ct, self.factor)
        self.sizes, self.image_shape = (hs, ht), (data.in_channels, data.image_size, data.image_size)
        self.student_layers, self.teacher_layers = (self.student,), (self.teacher,)

    @staticmethod
    def _map(model, layer, data, key, role) -> tuple[int, int]:
        """Channels and height of the square 4-D feature map at ``layer``; anything else is one line."""
        check_layer(model, layer, key, role)
        shape = feature_shapes(model, (layer,), data.in_channels, data.image_size)[layer]
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ConfigError(key, layer, f"needs a square 4-D feature map, got {list(shape)} per sample")
        return shape[0], shape[1]

    def _projector(self) -> nn.Module:
        return self._deployed_projector[0] if self._deployed_projector else self.projector

    def deployed(self, student: nn.Module) -> nn.Module:
        """The student as it ships: its feature map, the projector and a frozen copy of the teacher's head (copied
        now: call it after the teacher's training). The projector moves from the recipe to this model."""
        if isinstance(student, SimKDStudent):
            return student
        project = self._projector()
        if not self._deployed_projector:
            del self.projector
            self._deployed_projector = [project]
        # the deployed forward's projected map, read instead of running the projector twice; the student's own map
        # stays first: it pairs with the teacher's for CKA, on the deployed student and on the baseline alike
        self.student_layers = (self.student, PROJECTOR)
        hs, ht = self.sizes
        head = copy.deepcopy(self._teacher_head[0])
        model = SimKDStudent(student, self.student, project, head, ht if hs > ht else None)
        if unused := model.freeze_unused(self.image_shape):
            log.info("SimKD: the student's %s do not reach its prediction (frozen)", ", ".join(unused))
        return model

    def teacher_summary(self, layer, feature):
        """The teacher's final feature map, pooled to the student's size when larger (what replay stores)."""
        hs = self.sizes[0]
        return F.adaptive_avg_pool2d(feature, (hs, hs)) if feature.shape[2] > hs else feature

    def forward(self, batch, student, teacher, state: TermState):
        target = teacher["features"][self.teacher].float()
        if PROJECTOR in student["features"]:  # deployed: the model ran the projector
            return F.mse_loss(student["features"][PROJECTOR].float(), target)
        return simkd_loss(student["features"][self.student].float(), target, self._projector())[0]
