"""WSLD (distill_runner.distill.terms.wsld) against the official WSLDistiller (bellymonster/Weighted-Soft-Label-
Distillation 67820dd): soft-loss values, student-logit gradients and the shipped CE + 2.5 * soft total, stored in
tests/reference/wsld.json, computed by the official code."""

from pathlib import Path

import pytest
import torch
from conftest import reference_cases, reference_inputs
from omegaconf import OmegaConf

from distill_runner.distill.contract import TermState
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.terms.wsld import WSLD, wsld_loss, wsld_weights

CASES = reference_cases("wsld")
RECIPE = Path(__file__).resolve().parents[2] / "conf" / "distill" / "wsld.yaml"


def _errors(loss: torch.Tensor, grad: torch.Tensor, case: dict) -> tuple[float, float]:
    expected = torch.tensor(case["grad_student"], dtype=torch.float64)
    value = abs(loss.item() - case["loss"]) / abs(case["loss"])
    return value, ((grad.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_gradient(name):
    case = CASES[name]
    batch, student, teacher = reference_inputs(case)
    loss = WSLD()(batch, student, teacher, TermState(case["temperature"], 0.5, 1.0))
    loss.backward()
    torch.testing.assert_close(loss.double(), torch.tensor(case["loss"], dtype=torch.float64), rtol=1e-5, atol=0)
    expected = torch.tensor(case["grad_student"], dtype=torch.float64)
    torch.testing.assert_close(student["logits"].grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert max(_errors(loss, student["logits"].grad, case)) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_plain_function_and_the_shipped_recipe_match_the_official_total(name):
    case = CASES[name]
    batch, student, teacher = reference_inputs(case)
    assert wsld_loss(student["logits"], teacher["logits"], batch["target"], case["temperature"]).item() == (
        pytest.approx(case["loss"], rel=1e-5)
    )
    cfg = OmegaConf.load(RECIPE)
    cfg.temperature = case["temperature"]
    recipe = Recipe(**{k: v for k, v in cfg.items() if k not in ("_target_", "teacher_outputs")})
    total = sum(recipe(batch, student, teacher).values())
    assert total.item() == pytest.approx(case["total_loss"], rel=1e-5)


def test_weights_are_detached_and_small_where_the_student_fits_as_well_as_the_teacher():
    s = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    w = wsld_weights(s, torch.tensor([[5.0, 0.0], [5.0, 0.0]]), torch.tensor([0, 0]))
    assert not w.requires_grad and w[0] == pytest.approx(1 - torch.exp(torch.tensor(-1.0)).item(), rel=1e-4)
    assert w[1] == pytest.approx(1.0, abs=1e-6)  # the student far worse than the teacher: the full soft label


def test_recipe_is_the_official_setting():
    cfg = OmegaConf.load(RECIPE)
    assert (cfg.temperature, cfg.terms.ce.weight, cfg.terms.wsl.weight) == (2.0, 1.0, 2.5)
