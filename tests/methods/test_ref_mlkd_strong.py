"""MLKD's strong-view branch (distill.terms.MLKD strong_view=true, StrongCrossEntropy; conf/distill/mlkd_strong.yaml)
against the official KD_ours.forward_train on given logits of both views: the recipe's total and the student
gradients of both views equal tests/reference/mlkd_strong.json at 1e-5; its bad settings name the key."""

import copy

import pytest
import torch
from conftest import TINY, compose_config, reference_cases

from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.distill.contract import TermState, strong_augment
from distill_runner.distill.terms.mlkd import MLKD, strong_branch
from distill_runner.errors import ConfigError

CASES = reference_cases("mlkd_strong")


def close(value: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    atol = 1e-5 * expected.abs().max().item() if expected.ndim else 0.0
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def recipe():
    cfg = compose_config(TINY + ["distill=mlkd_strong"])
    data = build_data(cfg)
    return build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed))


@pytest.mark.parametrize("name", CASES)
def test_recipe_total_matches_the_official_value_and_both_student_gradients(name, recipe):
    case = CASES[name]
    s_w, s_s = (torch.tensor(case[k], requires_grad=True) for k in ("student_weak", "student_strong"))
    t_w, t_s = (torch.tensor(case[k]) for k in ("teacher_weak", "teacher_strong"))
    batch = {"target": torch.tensor(case["target"])}
    out = recipe(batch, {"logits": s_w, "strong_logits": s_s}, {"logits": t_w, "strong_logits": t_s})
    loss = sum(out.values())
    loss.backward()
    close(loss.detach(), case["loss"])
    close(s_w.grad, case["grad_student_weak"])
    close(s_s.grad, case["grad_student_strong"])
    strong = strong_branch(s_w, s_s, t_w, t_s, [4.0, 3.0, 5.0, 2.0, 6.0])
    close(case["kd_weight"] * strong.detach(), case["loss_kd_strong"])


def test_the_recipe_asks_for_one_strong_view(recipe):
    assert strong_augment(recipe) is not None and recipe.terms["mlkd"].views == ("weak", "strong")
    assert MLKD().views == ("weak",)  # the default stays the weak-view loss of conf/distill/mlkd.yaml
    other = copy.deepcopy(recipe)
    other.terms["ce_strong"].strong_augment = type(recipe.terms["mlkd"].strong_augment)(ops=3)
    with pytest.raises(ConfigError, match="different strong views"):
        strong_augment(other)


@pytest.mark.parametrize("kwargs,key", [({"strong_view": "yes"}, "strong_view"),
                                        ({"strong_view": True, "logit_standardization": True}, "strong_view"),
                                        ({"strong_view": True, "strong": {"ops": 99}}, "strong.ops")])  # fmt: skip
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        MLKD(**kwargs)
    assert err.value.key == key


def test_without_the_strong_logits_it_is_one_line():
    logits = torch.zeros(4, 3)
    with pytest.raises(ConfigError, match="strong view is missing"):
        MLKD(strong_view=True)({}, {"logits": logits}, {"logits": logits}, TermState(4.0, 0.5, 1.0))
