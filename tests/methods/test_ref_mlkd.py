"""MLKD (distill_runner.distill.terms.mlkd) against the official weak-view loss (Jin-Ying/Multi-Level-Logit-
Distillation 5ee473f; MLKD+LS: sunshangquan/logit-standardization-KD f6e5aa5): values, each level, and
student-logit gradients stored in tests/reference/mlkd.json, computed by the official code."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_cases, reference_inputs
from omegaconf import OmegaConf

from distill_runner.distill.contract import TermState
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.signals import recipe_node
from distill_runner.distill.terms.logits import kd_per_sample, standardize
from distill_runner.distill.terms.mlkd import MLKD, confidence_fractions, relation_gap
from distill_runner.errors import ConfigError, instantiate

ROOT = Path(__file__).resolve().parents[2]
CASES = reference_cases("mlkd")


def _state(temperature):
    return TermState(temperature, 0.5, 1.0, None, 0, 1)


@pytest.mark.parametrize("name", CASES)
def test_matches_official_value_and_gradient(name):
    case = CASES[name]
    batch, student, teacher = reference_inputs(case)
    term = MLKD(case["extra_temperatures"], logit_standardization=case["logit_standardization"])
    loss = term(batch, student, teacher, _state(case["temperature"]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float32), rtol=1e-5, atol=1e-7)
    expected_grad = torch.tensor(case["grad_student_logits"], dtype=torch.float32)
    torch.testing.assert_close(student["logits"].grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_each_level_and_mask_match_official(name):
    case = CASES[name]
    _, student, teacher = reference_inputs(case)
    s, t = student["logits"].detach(), teacher["logits"]
    m_s, m_c = confidence_fractions(t)
    assert (m_s.item(), m_c.item()) == pytest.approx((case["sample_mask_fraction"], case["class_mask_fraction"]))
    s_inst, t_inst = (standardize(s), standardize(t)) if case["logit_standardization"] else (s, t)
    levels = {"instance_level": 0.0, "batch_level": 0.0, "class_level": 0.0}
    for temperature in [case["temperature"], *case["extra_temperatures"]]:
        p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
        levels["instance_level"] += m_s * kd_per_sample(s_inst, t_inst, temperature).mean()
        levels["batch_level"] += m_s * relation_gap(p_s, p_t)
        levels["class_level"] += m_c * relation_gap(p_s.T, p_t.T)
    for level, value in levels.items():
        torch.testing.assert_close(value, torch.tensor(case[level], dtype=torch.float32), rtol=1e-5, atol=1e-7)


def test_shipped_recipes_are_the_official_settings():
    shipped = [("mlkd", 4.0, 0.9, False, "cifar100_T4"), ("mlkd_ls", 2.0, 9.0, True, "ls_T2")]
    for name, temperature, weight, ls, key in shipped:
        # built as the runner builds it (distill_runner.build.build_recipe)
        recipe = instantiate(
            recipe_node(OmegaConf.load(ROOT / f"conf/distill/{name}.yaml")), "distill", _recursive_=False
        )
        term = recipe.terms["mlkd"]
        assert recipe.targets["temperature"] == temperature and recipe.weight_specs == {"ce": 0.1, "mlkd": weight}
        assert term.extra_temperatures == [3.0, 5.0, 2.0, 6.0] and term.logit_standardization is ls
        assert not term.weighs_samples and term.hyperparameters == ("temperature",)
        case = CASES[key]
        batch, student, teacher = reference_inputs(case)
        out = recipe(batch, student, teacher)
        torch.testing.assert_close(out["mlkd"], torch.tensor(weight * case["loss"]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["ce"], 0.1 * F.cross_entropy(student["logits"], batch["target"]))


@pytest.mark.parametrize(
    "key,value",
    [
        ("extra_temperatures", [3.0, 0.0]),
        ("extra_temperatures", [-1.0]),
        ("extra_temperatures", [float("nan")]),
        ("extra_temperatures", 3.0),
        ("extra_temperatures", ["hot"]),
        ("logit_standardization", "yes"),
    ],
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as direct:
        MLKD(**{key: value})
    assert direct.value.key == key
    spec = {"_target_": "distill_runner.distill.terms.mlkd.MLKD", key: value}
    with pytest.raises(ConfigError) as built:
        Recipe({"mlkd": spec})
    assert built.value.key == f"terms.mlkd.{key}"
