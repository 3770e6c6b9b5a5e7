"""TTM and WTTM against the official zkxufo/TTM classes (reference values in tests/reference/ttm.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill_runner.distill import Recipe
from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.ttm import TTM, WTTM
from distill_runner.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
REF = json.loads((ROOT / "tests" / "reference" / "ttm.json").read_text())
CLASSES = {"TTM": TTM, "WTTM": WTTM}
STATE = TermState(temperature=4.0, alpha=0.5, beta=1.0)  # TTM reads none of these


def _call(term, inputs, state=STATE, student=None):
    student = torch.tensor(inputs["student"]) if student is None else student
    batch = {"target": torch.tensor(inputs["target"])}
    return term(batch, {"logits": student}, {"logits": torch.tensor(inputs["teacher"])}, state)


@pytest.mark.parametrize("case", REF["cases"], ids=lambda c: c["name"])
def test_matches_official_loss_and_gradient(case):
    term = CLASSES[case["method"]](gamma=case["gamma"], logit_standardization=case["logit_standardization"])
    student = torch.tensor(REF["inputs"][case["input"]]["student"], requires_grad=True)
    loss = _call(term, REF["inputs"][case["input"]], student=student)
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=1e-5, atol=1e-7)
    if "grad_student" in case:
        loss.backward()
        torch.testing.assert_close(student.grad, torch.tensor(case["grad_student"]), rtol=1e-5, atol=1e-7)


def test_defaults_are_the_readme_exponents():
    assert TTM().gamma == 0.1 and WTTM().gamma == 0.2
    assert TTM.weighs_samples and WTTM.weighs_samples and TTM.hyperparameters == () and WTTM.hyperparameters == ()


@pytest.mark.parametrize("cls", [TTM, WTTM])
def test_sample_weights_scale_each_sample(cls):
    inputs = REF["inputs"]["small"]
    term = cls()
    weights = torch.linspace(0.5, 2.0, len(inputs["target"]))
    per_sample = torch.stack(  # the loss of each sample alone, unweighted
        [_call(term, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(len(inputs["target"]))]
    )
    weighted = _call(term, inputs, TermState(4.0, 0.5, 1.0, sample_weights=weights))
    torch.testing.assert_close(weighted, (per_sample * weights).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_shipped_recipe_builds_and_runs(name):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "distill" / f"{name}.yaml"))
    cfg.pop("_target_"), cfg.pop("teacher_outputs")  # the class itself; read by the runner, not the recipe
    recipe = Recipe(**cfg)
    term = recipe.terms[name]
    assert isinstance(term, CLASSES[name.upper()]) and term.gamma == cfg["terms"][name]["gamma"]
    inputs = REF["inputs"]["small"]
    out = recipe(
        {"target": torch.tensor(inputs["target"])},
        {"logits": torch.tensor(inputs["student"])},
        {"logits": torch.tensor(inputs["teacher"])},
    )
    expected = cfg["terms"][name]["weight"] * _call(term, inputs)
    torch.testing.assert_close(out[name], expected)


@pytest.mark.parametrize("name", ["ttm", "wttm"])
@pytest.mark.parametrize(
    ("key", "value"),
    [("gamma", 0.0), ("gamma", -0.5), ("gamma", float("inf")), ("gamma", "0.1"), ("logit_standardization", "yes")],
)
def test_bad_values_name_the_key(name, key, value):
    spec = {"_target_": f"distill_runner.distill.terms.ttm.{name.upper()}", key: value}
    with pytest.raises(ConfigError) as err:
        Recipe({name: spec})
    assert err.value.key == f"terms.{name}.{key}"
