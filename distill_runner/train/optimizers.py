"""Optimizers that need more than one gradient per step: DOT, the Distillation-Oriented Trainer (Zhao, Song, Song,
Liang; ICCV 2023, arXiv:2307.08436), as mdistiller's ``mdistiller/engine/dot.py`` and its ``DOT`` trainer.

DOT is SGD with two momenta: the task (cross-entropy) gradient accumulates in a buffer with ``momentum - delta``,
the distillation gradient in its own buffer with ``momentum + delta``, and each step moves the weights by both
buffers. A parameter only one loss reaches keeps one buffer, at the mean of the two momenta (= ``momentum``). As
the official code: weight decay is added to the task gradient (to the distillation gradient of a parameter the
task loss does not reach, from the second step on); each buffer starts as its first gradient.

An optimizer that says ``splits_losses = True`` gets the loss in two parts from the training loop
(:func:`backward_split`): the recipe's distillation terms' gradient, which it keeps
(``stash_distillation_gradients``), then the task terms' (the terms declaring ``task_loss``, cross-entropy), with
which ``step`` runs. Every recipe works with it: ``trainer/optimizer=dot`` (conf/trainer/optimizer/dot.yaml).
With a recipe of cross-entropy alone (the scratch baseline) DOT is SGD with ``momentum``. The update is also a
plain function of tensors (:func:`dot_update`).

Docs: docs/methods/recent-wsld-srd-dot.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill_runner.errors import ConfigError, instantiate
from distill_runner.schema import is_number


def _momentum_step(buf, d_p: torch.Tensor, momentum: float, dampening: float) -> torch.Tensor:
    """The buffer after one gradient: the gradient itself when there is none yet (no dampening), as torch SGD."""
    if buf is None:
        return torch.clone(d_p).detach()
    return buf.mul_(momentum).add_(d_p, alpha=1 - dampening)


def dot_update(
    task: Sequence[tuple[torch.Tensor, torch.Tensor]],
    distill: Sequence[tuple[torch.Tensor, torch.Tensor]],
    state: dict,
    *,
    lr: float,
    momentum: float,
    momentum_kd: float,
    weight_decay: float,
    dampening: float = 0.0,
) -> None:
    """One DOT step in place: ``task`` and ``distill`` are (parameter, gradient) pairs; ``state[p]`` holds the
    parameter's ``momentum_buffer`` (task) and ``momentum_kd_buffer`` (distillation), as the official names."""
    in_task, in_distill = {id(p) for p, _ in task}, {id(p) for p, _ in distill}
    shared = (momentum + momentum_kd) / 2.0  # the momentum of a parameter only one of the losses reaches
    for p, d_p in task:
        if weight_decay != 0:
            d_p = d_p.add(p, alpha=weight_decay)
        if momentum != 0:
            m = momentum if id(p) in in_distill else shared
            d_p = state[p]["momentum_buffer"] = _momentum_step(state[p].get("momentum_buffer"), d_p, m, dampening)
        p.add_(d_p, alpha=-lr)
    for p, d_p in distill:
        buf = state[p].get("momentum_kd_buffer")
        if buf is not None and id(p) not in in_task and weight_decay != 0:
            d_p = d_p.add(p, alpha=weight_decay)
        m = momentum_kd if id(p) in in_task else shared
        buf = state[p]["momentum_kd_buffer"] = _momentum_step(buf, d_p, m, dampening)
        p.add_(buf, alpha=-lr)


def _check(key: str, value, low: float, high: float | None, fix: str, low_open: bool = False) -> float:
    if not is_number(value) or value < low or (low_open and value == low) or (high is not None and value > high):
        raise ConfigError(key, value, fix)
    return float(value)


class DOT(torch.optim.Optimizer):
    """Distillation-Oriented Trainer: SGD with the task momentum ``momentum - delta`` and the distillation momentum
    ``momentum + delta`` (official CIFAR-100: lr 0.05, momentum 0.9, delta 0.075, weight decay 5e-4)."""

    splits_losses = True  # the training loop hands the distillation and the task gradients apart

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 5e-4, dampening: float = 0.0):  # fmt: skip
        lr = _check("lr", lr, 0, None, "use a learning rate > 0, e.g. 0.05 (DOT's CIFAR-100 setting)", True)
        momentum = _check("momentum", momentum, 0, 1, "use a momentum in [0, 1], e.g. 0.9")
        fix = f"use a delta in [0, min(momentum, 1 - momentum)] = [0, {min(momentum, 1 - momentum):g}], e.g. 0.075"
        delta = _check("delta", delta, 0, min(momentum, 1 - momentum), fix)
        weight_decay = _check("weight_decay", weight_decay, 0, None, "use a weight decay >= 0, e.g. 5e-4")
        dampening = _check("dampening", dampening, 0, 1, "use a dampening in [0, 1] (official: 0)")
        defaults = {"lr": lr, "momentum": momentum - delta, "momentum_kd": momentum + delta,
                    "weight_decay": weight_decay, "dampening": dampening}  # fmt: skip
        super().__init__(params, defaults)
        self._distill: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def stash_distillation_gradients(self) -> None:
        """Keep the gradients the distillation loss's backward left (the loop zeroes them before the task's)."""
        self._distill = [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        """Update with the task gradients now in ``.grad`` and the stashed distillation gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            members = {id(p) for p in group["params"]}
            task = [(p, p.grad) for p in group["params"] if p.grad is not None]
            distill = [(p, g) for p, g in self._distill if id(p) in members]
            options = {k: group[k] for k in ("lr", "momentum", "momentum_kd", "weight_decay", "dampening")}
            dot_update(task, distill, self.state, **options)
        self._distill = []
        return loss


def backward_split(optimizer, task: Sequence[torch.Tensor], distill: Sequence[torch.Tensor]) -> None:
    """The two backward passes of an optimizer with ``splits_losses``, as mdistiller's DOT trainer: the
    distillation losses' gradient first (kept by the optimizer), then the task losses' in ``.grad``."""
    optimizer.zero_grad(set_to_none=True)
    if distill:
        sum(distill).backward(retain_graph=bool(task))
    optimizer.stash_distillation_gradients()
    optimizer.zero_grad(set_to_none=True)
    if task:
        sum(task).backward()


def check_loss_split(optimizer_node, recipe, precision: str, launched: bool) -> None:
    """Before any training: an optimizer that splits the losses needs a recipe with both a task term and a
    distillation term, unscaled gradients and one process. Other optimizers pass."""
    from hydra.utils import get_class

    try:
        splits = getattr(get_class(str(optimizer_node.get("_target_"))), "splits_losses", False)
    except Exception:  # not importable: its instantiation names it later
        return
    if not splits:
        return
    target = optimizer_node.get("_target_")
    try:  # its own checks (momentum, delta), before any stage
        instantiate(optimizer_node, "trainer.optimizer")(params=[torch.nn.Parameter(torch.zeros(1))])
    except ConfigError as err:
        raise err.under("trainer.optimizer") from None
    task = recipe.task_terms
    if not task or len(task) == len(recipe.terms):
        part = "no distillation term" if task else "no task term (cross-entropy)"
        fix = f"DOT moves the task and distillation gradients apart; this recipe has {part}: use one with both (kd)"
        raise ConfigError("trainer.optimizer._target_", target, fix)
    if str(precision) == "16-mixed":
        fix = "DOT takes two unscaled backward passes: use trainer.precision=32 or bf16-mixed"
        raise ConfigError("trainer.precision", precision, fix)
    if launched:
        raise ConfigError(
            "trainer.optimizer._target_", target, "DOT runs in one process (two backward passes per step)"
        )
