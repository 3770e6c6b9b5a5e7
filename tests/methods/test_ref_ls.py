"""Logit standardization (Sun et al., CVPR 2024) against the official code's numbers.

``tests/reference/ls.json`` holds fixed logits and what sunshangquan/logit-standardization-KD's
``normalize``, ``kd_loss``, ``dkd_loss`` (loss and gradient w.r.t. the student logits) and the
``KD``/``DKD`` distillers (as its README runs them on CIFAR-100) return for them; its "source"
block says how they were called.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from distill_runner.distill import Recipe
from distill_runner.distill.contract import TermState
from distill_runner.distill.signals import recipe_node
from distill_runner.distill.terms.logits import DecoupledKD, HintonKD, dkd_per_sample, kd_per_sample, standardize
from distill_runner.errors import ConfigError, instantiate

REF = json.loads((Path(__file__).resolve().parents[2] / "tests" / "reference" / "ls.json").read_text())
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


def inputs(name: str):
    case = REF["inputs"][name]
    student = torch.tensor(case["student"], dtype=torch.float32, requires_grad=True)
    return {"target": torch.tensor(case["target"])}, {"logits": student}, {"logits": torch.tensor(case["teacher"])}


def check(term, case, state: TermState) -> None:
    batch, student, teacher = inputs(case["inputs"])
    loss = term(batch, student, teacher, state)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float32), **CLOSE)
    # gradients are ~1e-2 per element: the tolerance is relative to their scale
    grad = torch.tensor(case["grad_student"], dtype=torch.float32)
    torch.testing.assert_close(student["logits"].grad, grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())


def test_standardize_is_the_official_normalize():
    ref = REF["normalize"]
    logits = torch.tensor(REF["inputs"][ref["inputs"]][ref["of"]])
    torch.testing.assert_close(standardize(logits), torch.tensor(ref["output"], dtype=torch.float32), **CLOSE)


@pytest.mark.parametrize(
    "case", REF["kd"], ids=lambda c: f"{c['inputs']}-T{c['temperature']}-ls{c['logit_standardization']}"
)
def test_kd_matches_official_kd_loss(case):
    term = HintonKD(logit_standardization=case["logit_standardization"])
    check(term, case, TermState(case["temperature"], 0.5, 1.0))


@pytest.mark.parametrize(
    "case",
    REF["dkd"],
    ids=lambda c: f"{c['inputs']}-a{c['alpha']}-b{c['beta']}-T{c['temperature']}-ls{c['logit_standardization']}",
)
def test_dkd_matches_official_dkd_loss(case):
    term = DecoupledKD(logit_standardization=case["logit_standardization"])
    check(term, case, TermState(case["temperature"], case["alpha"], case["beta"]))


def shipped_recipe(name: str, *overrides: str) -> Recipe:
    cfg = compose_config([f"distill={name}", *overrides])
    return instantiate(recipe_node(cfg.distill), "distill", _recursive_=False)


@pytest.mark.parametrize(
    "case", REF["recipes"], ids=lambda c: f"{c['recipe']}-{c['inputs']}-epoch{c['official_epoch']}"
)
def test_shipped_recipe_is_the_official_cifar100_run(case):
    """conf/distill/{kd,dkd}_ls.yaml give the official KD/DKD distillers' losses, warm-up included."""
    recipe = shipped_recipe(case["recipe"])
    recipe.set_epoch(case["official_epoch"] - 1, case["epochs"])  # mdistiller counts epochs from 1
    batch, student, teacher = inputs(case["inputs"])
    with torch.no_grad():
        terms = recipe(batch, student, teacher)
    ce, (distill_name,) = terms.pop("ce"), terms.keys()
    expected = case["losses"]
    torch.testing.assert_close(ce, torch.tensor(expected["loss_ce"], dtype=torch.float32), **CLOSE)
    torch.testing.assert_close(terms[distill_name], torch.tensor(expected["loss_kd"], dtype=torch.float32), **CLOSE)


def test_switched_off_the_terms_are_the_plain_losses_bit_for_bit():
    batch, student, teacher = inputs("c10")
    s, t, y = student["logits"], teacher["logits"], batch["target"]
    state = TermState(4.0, 1.0, 8.0)
    assert torch.equal(HintonKD()(batch, student, teacher, state), kd_per_sample(s, t, 4.0).mean())
    assert torch.equal(DecoupledKD()(batch, student, teacher, state), dkd_per_sample(s, t, y, 1.0, 8.0, 4.0).mean())


@pytest.mark.parametrize("name", ["kd_ls", "dkd_ls"])
def test_a_switch_that_is_not_a_bool_names_its_key(name):
    term = "kd" if name == "kd_ls" else "dkd"
    with pytest.raises(ConfigError) as err:
        shipped_recipe(name, f"distill.terms.{term}.logit_standardization=sometimes")
    assert err.value.key == f"distill.terms.{term}.logit_standardization"
    with pytest.raises(ConfigError, match="logit_standardization='sometimes': use true or false"):
        HintonKD(logit_standardization="sometimes")
