"""VID (distill_runner.distill.terms.vid) against RepDistiller's VIDLoss (b84f547): loss, student-map gradients and
the learned variances' gradients stored in tests/reference/vid.json by the official code."""

import pytest
import torch
from conftest import reference_cases
from relation_reference import assert_pairs_term_official, named_features, pair_specs, with_pairs

from distill_runner.distill.terms.vid import VID, match_sizes, vid_nll
from distill_runner.errors import ConfigError

CASES = reference_cases("vid")


def _inputs(case):
    term = with_pairs(VID(pair_specs(len(case["student_shapes"])), init_pred_var=case["init_pred_var"]))
    term.build([(s[0], t[0]) for s, t in zip(case["student_shapes"], case["teacher_shapes"])])
    with torch.no_grad():
        for regressor, weights in zip(term.regressors, case["weights"]):
            for name, p in regressor.named_parameters():
                p.copy_(torch.tensor(weights[name]))
    return term, *named_features(case)


@pytest.mark.parametrize("name", CASES)
def test_matches_official_value_and_gradients(name):
    case = CASES[name]
    term, student, teacher = _inputs(case)
    assert_pairs_term_official(term, student, teacher, case)
    for regressor, expected in zip(term.regressors, case["grad_log_scale"]):
        torch.testing.assert_close(regressor.log_scale.grad, torch.tensor(expected, dtype=torch.float32), rtol=1e-5,
                                   atol=1e-7)  # fmt: skip


def test_the_plain_function_is_the_pairs_loss():
    case = CASES["one_pair_same_channels_var2"]
    term, student, teacher = _inputs(case)
    (regressor,) = term.regressors
    x, y = match_sizes(student["s0"], teacher["t0"])
    assert x.shape[2:] == y.shape[2:] == (3, 3)
    loss = vid_nll(regressor.regressor(x), y, regressor.log_scale, regressor.eps)
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)


@pytest.mark.parametrize("key,value", [("init_pred_var", 0.0), ("eps", -1.0), ("init_pred_var", "big")])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        VID(["a:b"], **{key: value})
    assert err.value.key == key
