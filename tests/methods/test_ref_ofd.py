"""OFD (distill_runner.distill.terms.ofd) against the authors' code (clovaai/overhaul-distillation @ 76344a8,
CIFAR-100/distiller.py): margins from BatchNorm parameters, the loss and the student's gradient, stored in
tests/reference/ofd.json (computed by the official functions on fixed feature maps of several shapes)."""

import pytest
import torch
from conftest import reference_cases
from torch import nn

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.ofd import OFD, ofd_loss, ofd_margin

CASES = reference_cases("ofd")
STATE = TermState(4.0, 0.5, 1.0)


def _inputs(case):
    stages = case["stages"]
    sources = [torch.tensor(s["source"], dtype=torch.float32, requires_grad=True) for s in stages]
    targets = [torch.tensor(s["target"], dtype=torch.float32) for s in stages]
    bns = []
    for s in stages:
        bn = nn.BatchNorm2d(len(s["bn_weight"]))
        bn.weight.data = torch.tensor(s["bn_weight"], dtype=torch.float32)
        bn.bias.data = torch.tensor(s["bn_bias"], dtype=torch.float32)
        bns.append(bn)
    return sources, targets, bns


def _check_gradients(case, sources):
    for s, stage in zip(sources, case["stages"]):
        torch.testing.assert_close(
            s.grad, torch.tensor(stage["grad_source"], dtype=torch.float32), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", CASES)
def test_margins_equal_the_official_ones_from_batchnorm(name):
    _, _, bns = _inputs(CASES[name])
    for bn, stage in zip(bns, CASES[name]["stages"]):
        expected = torch.tensor(stage["margin"], dtype=torch.float32)
        torch.testing.assert_close(ofd_margin(bn.weight, bn.bias), expected, rtol=1e-5, atol=1e-6)
        assert (expected < 0).all()


@pytest.mark.parametrize("name", CASES)
def test_loss_function_equals_the_official_value_and_gradient(name):
    case = CASES[name]
    sources, targets, bns = _inputs(case)
    loss = ofd_loss(sources, targets, [ofd_margin(bn.weight, bn.bias) for bn in bns])
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=1e-5, atol=0)
    _check_gradients(case, sources)


@pytest.mark.parametrize("name", CASES)
def test_the_term_on_its_teacher_summaries_equals_the_official_loss(name):
    """The term's teacher side (max(feature, margin), what replay stores) and its loss: connectors as identity."""
    case = CASES[name]
    sources, targets, bns = _inputs(case)
    term = OFD()
    n = len(sources)
    term.student_layers = tuple(f"s{i}" for i in range(n))
    term.teacher_layers = tuple(f"t{i}" for i in range(n))
    term.connectors = nn.ModuleList(nn.Identity() for _ in range(n))
    term._teacher_bns = bns
    teacher = {"features": {t: term.teacher_summary(t, y) for t, y in zip(term.teacher_layers, targets)}}
    student = {"features": dict(zip(term.student_layers, sources))}
    loss = term({}, student, teacher, STATE)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=1e-5, atol=0)
    _check_gradients(case, sources)
