"""NKD (distill_runner.distill.terms.nkd) against the official NKDLoss (yzd-v/cls_KD, fixed mask of 9466b3f):
values and student-logit gradients stored in tests/reference/nkd.json, computed by the official code."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_cases, reference_inputs
from omegaconf import OmegaConf

from distill_runner.distill.contract import TermState
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.signals import recipe_node
from distill_runner.distill.terms.nkd import NKD
from distill_runner.errors import ConfigError, instantiate

ROOT = Path(__file__).resolve().parents[2]
CASES = reference_cases("nkd")


def _state(temperature, weights=None):
    return TermState(temperature, 0.5, 1.0, weights, 0, 1)


@pytest.mark.parametrize("name", CASES)
def test_matches_official_value_and_gradient(name):
    case = CASES[name]
    batch, student, teacher = reference_inputs(case)
    term = NKD(gamma=case["gamma"], logit_standardization=case["logit_standardization"])
    loss = term(batch, student, teacher, _state(case["temperature"]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=1e-5, atol=1e-7)
    expected_grad = torch.tensor(case["grad_student_logits"], dtype=torch.float32)
    torch.testing.assert_close(student["logits"].grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "loss_before_fix" in c])
def test_follows_the_fixed_non_target_mask(name):
    """The official mask kept the target class in the non-target part until 9466b3f; we follow the fix."""
    case = CASES[name]
    loss = NKD(gamma=case["gamma"])(*reference_inputs(case), _state(case["temperature"])).item()
    assert loss == pytest.approx(case["loss"], rel=1e-5)
    assert abs(loss - case["loss_before_fix"]) > 0.5


def test_sample_weights_weigh_each_sample():
    case = CASES["cifar100_T3_gamma3.5"]
    batch, student, teacher = reference_inputs(case)
    term, state = NKD(gamma=case["gamma"]), _state(case["temperature"])
    per_sample = torch.stack(
        [
            term(
                {"target": batch["target"][i : i + 1]},
                {"logits": student["logits"][i : i + 1]},
                {"logits": teacher["logits"][i : i + 1]},
                state,
            )
            for i in range(len(batch["target"]))
        ]
    )
    assert per_sample.mean().item() == pytest.approx(case["loss"], rel=1e-5)
    weights = torch.linspace(0.2, 1.8, len(per_sample))
    weighted = term(batch, student, teacher, _state(case["temperature"], weights))
    torch.testing.assert_close(weighted, (per_sample * weights).mean(), rtol=1e-5, atol=1e-7)


def test_shipped_recipe_is_the_official_cifar100_setting():
    cfg = OmegaConf.load(ROOT / "conf/distill/nkd.yaml")
    recipe = instantiate(recipe_node(cfg), "distill", _recursive_=False)  # as build_recipe does
    assert isinstance(recipe, Recipe)
    assert recipe.targets["temperature"] == 3.0 and recipe.terms["nkd"].gamma == 3.5
    assert recipe.terms["nkd"].weighs_samples and recipe.terms["nkd"].hyperparameters == ("temperature",)
    case = CASES["cifar100_T3_gamma3.5"]
    batch, student, teacher = reference_inputs(case)
    out = recipe(batch, student, teacher)
    torch.testing.assert_close(out["nkd"], torch.tensor(case["loss"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["ce"], F.cross_entropy(student["logits"], batch["target"]))


@pytest.mark.parametrize(
    "key,value", [("gamma", -1.0), ("gamma", float("nan")), ("gamma", "big"), ("logit_standardization", "yes")]
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as direct:
        NKD(**{key: value})
    assert direct.value.key == key
    spec = {"_target_": "distill_runner.distill.terms.nkd.NKD", key: value}
    with pytest.raises(ConfigError) as built:
        Recipe({"nkd": spec})
    assert built.value.key == f"terms.nkd.{key}"
