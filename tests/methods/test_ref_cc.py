"""CC (distill_runner.distill.terms.relation) against the authors' code as RepDistiller ships it (Correlation on
LinearEmbed outputs) and torchdistill's CCKDLoss (gaussian kernel): tests/reference/cc.json."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from relation_reference import assert_official, bound, cases, run_term
from torch import nn

from distill_runner.distill.terms.relation import CorrelationCongruence
from distill_runner.errors import ConfigError

CASES = cases("cc")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"


def _linear(weights, side):
    weight = torch.tensor(weights[f"{side}.weight"])
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data, linear.bias.data = weight, torch.tensor(weights[f"{side}.bias"])
    return linear


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_student_gradient(name):
    case = CASES[name]
    term = bound(CorrelationCongruence("s", "t", embed_dim=case["embed_dim"], kernel=case.get("kernel", "repdistiller"),
                                       gamma=case.get("gamma", 0.4), max_p=case.get("max_p", 2)), 1)  # fmt: skip
    if case["embed_dim"]:  # the official embeddings' weights, as drawn there
        term.embed_s, term.embed_t = _linear(case["embed_weights"], "s"), _linear(case["embed_weights"], "t")
    loss, grads = run_term(term, case)
    assert_official(loss, grads, case)


def test_recipe_is_the_official_cifar100_setting():
    term = OmegaConf.load(CONF / "cc.yaml").terms.cc
    assert (term.weight, term.embed_dim, term.kernel) == (0.02, 128, "repdistiller")


@pytest.mark.parametrize("key,value", [("embed_dim", 0), ("kernel", "laplace"), ("max_p", 0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        CorrelationCongruence("s", "t", **{key: value})
    assert err.value.key == key
