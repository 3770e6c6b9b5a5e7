"""KDSVD (distill_runner.distill.terms.feature_maps) against RepDistiller's port of the authors' TF code (the
default) and mdistiller's kdsvd_loss (reshape: mdistiller): values and student gradients in
tests/reference/kdsvd.json. The teacher side goes through teacher_summary (its singular vectors and values),
as replay stores it."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term, tensors

from distill_runner.distill.terms.feature_maps import KDSVD, kdsvd_teacher
from distill_runner.errors import ConfigError

CASES = cases("kdsvd")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    case = CASES[name]
    term = bound(KDSVD(["s:t"], k=case["k"], reshape=case["reshape"]), len(case["student"]))
    loss, grads = run_term(term, case)
    assert_official(loss, grads, case)


def test_teacher_summary_is_small_and_per_sample():
    case = CASES["three_layers"]
    _, teacher = tensors(case)
    summary = kdsvd_teacher(teacher[0], 1)
    assert summary.shape == (teacher[0].shape[0], teacher[0].shape[1] + 1, 1)
    torch.testing.assert_close(kdsvd_teacher(teacher[0][:1], 1), summary[:1])  # one sample alone: the same


def test_recipe_is_the_official_setting():
    term = OmegaConf.load(CONF / "kdsvd.yaml").terms.kdsvd
    assert (term.weight, term.k, term.reshape) == (1.0, 1, "repdistiller")


@pytest.mark.parametrize("key,value", [("k", 0), ("reshape", "torchdistill")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        KDSVD(["s:t"], **{key: value})
    assert err.value.key == key
