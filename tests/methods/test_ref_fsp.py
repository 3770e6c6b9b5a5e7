"""FSP (distill_runner.distill.terms.feature_maps) against RepDistiller's FSP (the default) and torchdistill's
FSPLoss (style: torchdistill): values and student gradients in tests/reference/fsp.json."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term

from distill_runner.distill.terms.feature_maps import FSP
from distill_runner.errors import ConfigError

CASES = cases("fsp")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    case = CASES[name]
    loss, grads = run_term(bound(FSP(["s:t"], style=case["style"]), len(case["student"])), case)
    assert_official(loss, grads, case)


def test_recipe_is_the_official_setting():
    term = OmegaConf.load(CONF / "fsp.yaml").terms.fsp
    assert (term.weight, term.style, len(term.pairs)) == (50.0, "repdistiller", 2)


def test_a_bad_style_names_the_key():
    with pytest.raises(ConfigError) as err:
        FSP(["s:t"], style="paper")
    assert err.value.key == "style"
