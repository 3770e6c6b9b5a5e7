"""AB's loss (distill_runner.distill.terms.ab_ft) against RepDistiller's ABLoss (HobbitLong/RepDistiller @ b84f547,
distiller_zoo/AB.py, summed over stages as helper/pretrain.py's init()): value and student gradient on fixed
pre-ReLU maps of several shapes, stored in tests/reference/ab.json."""

import pytest
import torch
from conftest import reference_cases
from torch import nn

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.ab_ft import ActivationBoundaries, ab_loss

CASES = reference_cases("ab")


def _inputs(case):
    sources = [torch.tensor(s["source"], dtype=torch.float32, requires_grad=True) for s in case["stages"]]
    return sources, [torch.tensor(s["target"], dtype=torch.float32) for s in case["stages"]]


def _check(case, loss, sources):
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=1e-5, atol=0)
    for s, stage in zip(sources, case["stages"]):
        torch.testing.assert_close(
            s.grad, torch.tensor(stage["grad_source"], dtype=torch.float32), rtol=1e-5, atol=1e-8
        )


@pytest.mark.parametrize("name", CASES)
def test_loss_function_equals_the_official_value_and_gradient(name):
    case = CASES[name]
    sources, targets = _inputs(case)
    _check(case, ab_loss(sources, targets, case["margin"]), sources)


@pytest.mark.parametrize("name", CASES)
def test_the_term_on_its_teacher_summaries_equals_the_official_loss(name):
    """The teacher side the term keeps (the sign of the pre-ReLU map: what replay stores) loses nothing."""
    case = CASES[name]
    sources, targets = _inputs(case)
    term = ActivationBoundaries(margin=case["margin"])
    n = len(sources)
    term.student_layers, term.teacher_layers = tuple(f"s{i}" for i in range(n)), tuple(f"t{i}" for i in range(n))
    term.connectors = nn.ModuleList(nn.Identity() for _ in range(n))
    teacher = {"features": {t: term.teacher_summary(t, y) for t, y in zip(term.teacher_layers, targets)}}
    loss = term({}, {"features": dict(zip(term.student_layers, sources))}, teacher, TermState(4.0, 0.5, 1.0))
    _check(case, loss, sources)
