"""ICKD (distill_runner.distill.terms.feature_maps) against the official ICKDLoss (ADLab-AutoDrive/ICKD, its
embed_s 1x1 conv + BatchNorm with the weights drawn there): values and student gradients in
tests/reference/ickd.json."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term

from distill_runner.distill.terms.feature_maps import ICKD
from distill_runner.models.features import Adapter

CASES = cases("ickd")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    case = CASES[name]
    term = bound(ICKD(["s:t"]), 1)
    weight = torch.tensor(case["embed_weight"])
    term.adapters["0"] = Adapter(weight.shape[1], weight.shape[0])
    term.adapters["0"][0].weight.data = weight
    loss, grads = run_term(term, case)
    assert_official(loss, grads, case)


def test_recipe_is_the_official_cifar100_setting():
    assert OmegaConf.load(CONF / "ickd.yaml").terms.ickd.weight == 4.0
