"""VID (distill_runner.distill.terms.vid) against RepDistiller's VIDLoss (b84f547): loss, student-map gradients and
the learned variances' gradients stored in tests/reference/vid.json by the official code."""

import pytest
import torch
from conftest import reference_cases

from distill_runner.distill.terms.features import parse_pairs
from distill_runner.distill.terms.vid import VID, match_sizes, vid_nll
from distill_runner.errors import ConfigError

CASES = reference_cases("vid")


def _inputs(case):
    term = VID([f"s{i}:t{i}" for i in range(len(case["student_shapes"]))], init_pred_var=case["init_pred_var"])
    term.pairs = parse_pairs(term._pairs_cfg, "pairs")
    term.build([(s[0], t[0]) for s, t in zip(case["student_shapes"], case["teacher_shapes"])])
    with torch.no_grad():
        for regressor, weights in zip(term.regressors, case["weights"]):
            for name, p in regressor.named_parameters():
                p.copy_(torch.tensor(weights[name]))
    student = {f"s{i}": torch.tensor(x, dtype=torch.float32, requires_grad=True)
               for i, x in enumerate(case["student_features"])}  # fmt: skip
    teacher = {f"t{i}": torch.tensor(x, dtype=torch.float32) for i, x in enumerate(case["teacher_features"])}
    return term, student, teacher


@pytest.mark.parametrize("name", CASES)
def test_matches_official_value_and_gradients(name):
    case = CASES[name]
    term, student, teacher = _inputs(case)
    loss = term({}, {"features": student}, {"features": teacher}, None)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float32), rtol=1e-5, atol=0)
    for i, expected in enumerate(case["grad_student_features"]):
        expected = torch.tensor(expected, dtype=torch.float32)
        torch.testing.assert_close(student[f"s{i}"].grad, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
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
