"""Replayed teacher outputs against the online teacher, step by step: the check every replayable recipe's
test runs (tests/unit/distill/test_replay_recipes.py, tests/methods/)."""

import copy

import pytest
import torch

from distill_runner.distill.signals import ReplayedTeacher, compute_teacher_outputs
from distill_runner.models.features import FeatureTap
from distill_runner.train import engine

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)


def replayed_equals_online(recipe, student, online, data, dtype, tolerance, epochs=3) -> int:
    """Train-mode steps of ``recipe`` over ``epochs`` augmented epochs with the online and the replayed
    signal on the same batches: every term's loss and every gradient agree. Returns the batches compared."""
    entry = compute_teacher_outputs(online, data.train, epochs, CPU, FP32, dtype, False, recipe.summarize)
    assert set(entry["summaries"]) == set(recipe.summary_spec())
    replayed = ReplayedTeacher(entry["logits"], entry["summaries"])
    tap = FeatureTap(student, recipe.student_layers)
    params = [*student.parameters(), *recipe.parameters()]
    compared = 0
    for epoch in range(epochs):
        data.train.set_epoch(epoch)
        replayed.set_epoch(epoch)
        recipe.set_epoch(epoch, epochs)
        for batch in data.train:
            losses, state = [], copy.deepcopy(recipe.state_dict())
            for signal in (online, replayed):
                recipe.load_state_dict(state)  # a stateful term (CRD's memory banks) starts both calls alike
                for p in params:
                    p.grad = None
                out = recipe(batch, tap(batch["image"]), signal(batch))
                sum(out.values()).backward()
                grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
                losses.append(({k: v.item() for k, v in out.items()}, grads))
            (a, grad_a), (b, grad_b) = losses
            assert a.keys() == b.keys() and a == pytest.approx(b, rel=tolerance, abs=tolerance / 10), epoch
            assert (grad_a - grad_b).norm() <= tolerance * grad_a.norm(), epoch
            if tolerance <= 1e-5:  # float32 storage: every element
                torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
            compared += 1
    tap.remove()
    return compared
