"""DIST against the official loss's outputs (tests/reference/dist.json: hunto/image_classification_sota,
lib/models/losses/dist_kd.py, run on the literal logits stored there)."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill_runner.distill.contract import TermState
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.terms.dist import DIST
from distill_runner.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests" / "reference" / "dist.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}


def _inputs(case):
    student = torch.tensor(case["student_logits"], requires_grad=True)
    batch = {"target": torch.tensor(case["target"])}
    return batch, student, torch.tensor(case["teacher_logits"])


def test_reference_names_its_source():
    source = REFERENCE["source"]
    assert len(source["commit"]) == 40 and source["path"] == "lib/models/losses/dist_kd.py"


@pytest.mark.parametrize("name", CASES)
def test_dist_matches_official_loss_and_gradient(name):
    case = CASES[name]
    batch, s, t = _inputs(case)
    term = DIST(beta=case["beta"], gamma=case["gamma"], logit_standardization=case["logit_standardization"])
    loss = term(batch, {"logits": s}, {"logits": t}, TermState(case["tau"], 0.5, 1.0))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad, torch.tensor(case["grad_student_logits"]), rtol=1e-4, atol=1e-6)


def test_batch_of_one_has_a_constant_intra_class_part_as_official():
    case = CASES["batch_of_one"]
    batch, s, t = _inputs(case)
    state = TermState(case["tau"], 0.5, 1.0)
    intra_only = DIST(beta=0.0, gamma=1.0)(batch, {"logits": s}, {"logits": t}, state)
    assert intra_only.item() == pytest.approx(case["tau"] ** 2)  # 1 - correlation 0, times T^2


def test_shipped_recipe_is_the_official_cifar100_setting():
    case = CASES["cifar100_default"]
    batch, s, t = _inputs(case)
    recipe = Recipe(**{k: v for k, v in OmegaConf.load(ROOT / "conf/distill/dist.yaml").items() if k != "_target_"
                       and k != "teacher_outputs"})  # fmt: skip
    assert recipe.current["temperature"] == case["tau"] and recipe.terms["dist"].hyperparameters == ("temperature",)
    assert not recipe.terms["dist"].weighs_samples
    terms = recipe(batch, {"logits": s}, {"logits": t})
    torch.testing.assert_close(terms["dist"], torch.tensor(2.0 * case["loss"]), rtol=1e-5, atol=1e-7)


TERM = "distill_runner.distill.terms.dist.DIST"


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"beta": -1.0}, "terms.dist.beta"),
        ({"gamma": -0.5}, "terms.dist.gamma"),
        ({"gamma": float("nan")}, "terms.dist.gamma"),
        ({"beta": 0.0, "gamma": 0.0}, "terms.dist.gamma"),
        ({"logit_standardization": "yes"}, "terms.dist.logit_standardization"),
    ],
)
def test_bad_values_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Recipe({"dist": {"_target_": TERM, **kwargs}})
    assert err.value.key == key


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature_is_the_recipes_key(temperature):
    with pytest.raises(ConfigError) as err:
        Recipe({"dist": {"_target_": TERM}}, temperature=temperature)
    assert err.value.key == "temperature"
