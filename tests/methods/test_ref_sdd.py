"""SDD (distill_runner.distill.terms.sdd) against the official code (shicaiwei123/SDD-CVPR2024 e412036: SPP + fc patch
scores, sdd_kd_loss, multi_dkd, multi_nkd_loss): value, student feature-map and student-classifier gradients in
tests/reference/sdd.json; the recipes' official CIFAR-100 settings; bad settings named by key."""

from pathlib import Path

import pytest
import torch
from conftest import reference_cases
from omegaconf import OmegaConf
from relation_reference import assert_head_term_official, linear

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.sdd import SDD, _Heads, multi_scale_logits, sdd_loss
from distill_runner.errors import ConfigError

CASES = reference_cases("sdd")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_gradients(name):
    case = CASES[name]
    term = SDD("s", "t", base=case["base"], scales=case["scales"], gamma=case["gamma"])
    student_head, teacher_head = linear(case["student_head"]), linear(case["teacher_head"])
    term.heads = _Heads(student_head, teacher_head)  # what bind finds in the models
    state = TermState(case["temperature"], case["alpha"], case["beta"])
    assert_head_term_official(term, student_head, case, {"target": torch.tensor(case["target"])}, state)


@pytest.mark.parametrize("name", CASES)
def test_plain_functions_match_the_official_value(name):
    case = CASES[name]
    s_head, t_head = linear(case["student_head"]), linear(case["teacher_head"])
    s = multi_scale_logits(torch.tensor(case["student"][0]), s_head, case["scales"])
    t = multi_scale_logits(torch.tensor(case["teacher"][0]), t_head, case["scales"])
    assert s.shape[2] == sum(k * k for k in case["scales"])
    loss = sdd_loss(s, t, torch.tensor(case["target"]), case["base"], case["temperature"], case["alpha"],
                    case["beta"], case["gamma"])  # fmt: skip
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)


def test_recipes_are_the_official_cifar100_settings():
    kd, dkd, nkd = (OmegaConf.load(CONF / f"sdd_{b}.yaml") for b in ("kd", "dkd", "nkd"))
    assert (kd.temperature, kd.terms.ce.weight, kd.terms.sdd.weight, kd.terms.sdd.base) == (4.0, 0.1, 0.9, "kd")
    assert (dkd.temperature, dkd.alpha, dkd.beta, dkd.terms.sdd.base) == (4.0, 1.0, 8.0, "dkd")
    assert (nkd.temperature, nkd.terms.sdd.gamma, nkd.terms.sdd.base) == (4.0, 8.0, "nkd")
    assert all(r.terms.sdd.scales == [1, 2, 4] for r in (kd, dkd, nkd))
    assert "sdd" in dkd.schedule and "sdd" in nkd.schedule and not kd.schedule  # 20-epoch warm-up: DKD, NKD only


@pytest.mark.parametrize(
    "key,value", [("base", "ttm"), ("scales", [2, 4]), ("scales", [1, 3]), ("scales", [1, 1]), ("gamma", -1)]
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        SDD("s", "t", **{key: value})
    assert err.value.key == key
