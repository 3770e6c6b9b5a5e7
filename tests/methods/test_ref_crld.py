"""CRLD (distill_runner.distill.terms.crld) against the official code: mdistiller/distillers/CRLD.py of the CRLD
code (kd_loss + CRLD.forward_train on given logits of both views), values and student gradients of both views in
tests/reference/crld.json (its source names the repository and commit)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_cases
from omegaconf import OmegaConf

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.crld import CRLD, crld_losses
from distill_runner.errors import ConfigError

CASES = reference_cases("crld")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"
RTOL = 1e-5


def inputs(case: dict):
    s_w, s_s = (
        torch.tensor(case[k], dtype=torch.float32, requires_grad=True) for k in ("student_weak", "student_strong")
    )
    t_w, t_s = (torch.tensor(case[k], dtype=torch.float32) for k in ("teacher_weak", "teacher_strong"))
    return s_w, s_s, t_w, t_s, torch.tensor(case["target"])


def term_of(case: dict) -> CRLD:
    return CRLD(case["tau_w"], case["tau_s"], case["wv_weight"], case["cv_weight"], ce_strong=case["ce_weight"])


def close(value: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    atol = RTOL * expected.abs().max().item() if expected.ndim else 0.0
    torch.testing.assert_close(value.double(), expected, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("name", CASES)
def test_recipe_total_matches_the_official_value_and_both_student_gradients(name):
    """The recipe's ce (weak view, weight CE_WEIGHT) + the crld term = loss_ce + loss_kd_wv + loss_kd_cv."""
    case = CASES[name]
    s_w, s_s, t_w, t_s, target = inputs(case)
    student, teacher = {"logits": s_w, "strong_logits": s_s}, {"logits": t_w, "strong_logits": t_s}
    state = TermState(case["temperature"], 0.5, 1.0)
    loss = case["ce_weight"] * F.cross_entropy(s_w, target) + term_of(case)({"target": target}, student, teacher, state)
    loss.backward()
    close(loss.detach(), case["loss"])
    close(s_w.grad, case["grad_student_weak"])
    close(s_s.grad, case["grad_student_strong"])


@pytest.mark.parametrize("name", CASES)
def test_plain_function_gives_the_official_within_and_cross_view_losses(name):
    case = CASES[name]
    s_w, s_s, t_w, t_s, _ = inputs(case)
    settings = (case["temperature"], case["tau_w"], case["tau_s"], case["wv_weight"], case["cv_weight"])
    within, cross = crld_losses(s_w, s_s, t_w, t_s, *settings)
    close(within.detach(), case["loss_kd_wv"])
    close(cross.detach(), case["loss_kd_cv"])


def test_recipe_is_the_official_cifar100_setting():
    recipe = OmegaConf.load(CONF / "crld.yaml")
    term = recipe.terms.crld
    assert recipe.temperature == 4.0 and recipe.terms.ce.weight == 1.0 and term.weight == 1.0
    assert (term.tau_w, term.tau_s, term.wv_weight, term.cv_weight, term.ce_strong) == (0.9, 0.2, 2.0, 0.5, 1.0)
    assert dict(term.strong) == {"ops": 2, "cutout": 0.5}
    assert CASES["cifar100_B16_official"]["tau_w"] == term.tau_w  # the reference case is the shipped setting


def test_a_missing_strong_view_is_one_clear_line():
    logits = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="strong view"):
        CRLD()(
            {"target": torch.zeros(2, dtype=torch.long)}, {"logits": logits}, {"logits": logits}, TermState(4, 0.5, 1)
        )


@pytest.mark.parametrize(
    "key,value,says",
    [("tau_w", 1.5, "tau_w"), ("tau_s", -0.1, "tau_s"), ("wv_weight", "big", "wv_weight"),
     ("ce_strong", -1, "ce_strong"), ("strong", {"ops": -1}, "strong.ops"),
     ("strong", {"cutout": 2}, "strong.cutout"), ("strong", {"n": 2}, "strong")],
)  # fmt: skip
def test_bad_values_name_the_key(key, value, says):
    with pytest.raises(ConfigError) as err:
        CRLD(**{key: value})
    assert err.value.key == says and "\n" not in str(err.value)
