"""ReviewKD (distill_runner.distill.terms.reviewkd) against mdistiller's ReviewKD (a08d46f; its ABF and hcl are the
authors' dvlab-research/ReviewKD code): loss, student-feature gradients and the ABFs' BatchNorm statistics,
stored in tests/reference/reviewkd.json by the official code."""

import pytest
import torch
from conftest import reference_cases
from relation_reference import assert_pairs_term_official, named_features, pair_specs, with_pairs

from distill_runner.distill.terms.reviewkd import ReviewKD, as_map, hcl_loss, review
from distill_runner.errors import ConfigError

CASES = reference_cases("reviewkd")


def _inputs(case):
    n = len(case["student_shapes"])
    term = with_pairs(ReviewKD(pair_specs(n)))
    term.student_layers, term.teacher_layers = tuple(f"s{i}" for i in range(n)), tuple(f"t{i}" for i in range(n))
    term.build([c for c, _ in case["student_shapes"]], [c for c, _ in case["teacher_shapes"]],
               [(h, h) for _, h in case["teacher_shapes"]])  # fmt: skip
    state = {k: torch.tensor(v) for k, v in case["abfs_state"].items()}
    term.abfs.load_state_dict(state, strict=False)
    return term, *named_features(case)


@pytest.mark.parametrize("name", CASES)
def test_matches_official_value_gradients_and_batchnorm_statistics(name):
    case = CASES[name]
    term, student, teacher = _inputs(case)
    assert_pairs_term_official(term, student, teacher, case)
    stats = term.abfs.state_dict()
    for key, expected in case["abfs_state_after"].items():
        torch.testing.assert_close(stats[key], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_the_plain_functions_give_the_terms_loss():
    case = CASES["resnet_like_4_stages"]
    term, student, teacher = _inputs(case)
    maps = [as_map(student[f"s{i}"]) for i in range(4)]
    outputs = review(term.abfs, maps, term.out_sizes)
    loss = hcl_loss(outputs, [as_map(teacher[f"t{i}"]) for i in range(4)])
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)


def test_pair_weights_weigh_each_stage():
    case = CASES["resnet_like_4_stages"]
    term, student, teacher = _inputs(case)
    term.pairs = [(s, t, 2.0) for s, t, _ in term.pairs]
    doubled = term({}, {"features": student}, {"features": teacher}, None)
    assert doubled.item() == pytest.approx(2 * case["loss"], rel=1e-5)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError) as err:
        ReviewKD(["a:b"], max_mid_channel=0)
    assert err.value.key == "max_mid_channel"
