"""CRD (distill_runner.distill.terms.crd) against RepDistiller's CRDLoss + ContrastMemory (b84f547): the loss, the
student-feature gradient, the Z constants and the momentum-updated banks over two consecutive steps, stored in
tests/reference/crd.json by the official code; and the sampler, as the official mode=exact draws."""

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_cases

from distill_runner.distill.terms.crd import CRD, contrast_scores, crd_loss, l2_normalize
from distill_runner.errors import ConfigError

CASES = reference_cases("crd")


def _term(case, labels=None) -> CRD:
    term = CRD("s", "t", case["feat_dim"], case["nce_k"], case["nce_t"], case["nce_m"])
    term.build(case["s_dim"], case["t_dim"], case["n_data"], labels)
    w = {k: torch.tensor(v, dtype=torch.float32) for k, v in case["weights"].items()}
    with torch.no_grad():
        for side in ("s", "t"):
            getattr(term, f"embed_{side}").weight.copy_(w[f"embed_{side}.linear.weight"])
            getattr(term, f"embed_{side}").bias.copy_(w[f"embed_{side}.linear.bias"])
        term.memory_s.copy_(torch.tensor(case["memory_student"]))
        term.memory_t.copy_(torch.tensor(case["memory_teacher"]))
    return term


@pytest.mark.parametrize("name", CASES)
def test_matches_official_loss_gradient_and_banks_over_two_steps(name, monkeypatch):
    case = CASES[name]
    term = _term(case)
    for step in case["steps"]:
        monkeypatch.setattr(term, "contrast_index", lambda index, step=step: torch.tensor(step["contrast_index"]))
        f_s = torch.tensor(step["student_feature"], dtype=torch.float32, requires_grad=True)
        f_t = torch.tensor(step["teacher_feature"], dtype=torch.float32)
        loss = term.contrast(torch.tensor(step["index"]), f_s, f_t)
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(step["loss"], dtype=torch.float32), rtol=1e-5, atol=0)
        grad = torch.tensor(step["grad_student_feature"], dtype=torch.float32)
        torch.testing.assert_close(f_s.grad, grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())
        torch.testing.assert_close(term.z, torch.tensor(step["z"], dtype=torch.float32), rtol=1e-5, atol=0)
        torch.testing.assert_close(term.memory_s, torch.tensor(step["memory_student_after"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(term.memory_t, torch.tensor(step["memory_teacher_after"]), rtol=1e-5, atol=1e-6)


def test_the_plain_function_is_the_terms_loss():
    case = CASES["two_steps_s12_t20_d8_k16"]
    term, step = _term(case), case["steps"][1]
    v_s = l2_normalize(term.embed_s(torch.tensor(step["student_feature"])))
    v_t = l2_normalize(term.embed_t(torch.tensor(step["teacher_feature"])))
    z_s, z_t = step["z"]
    loss = crd_loss(v_s, v_t, term.memory_s, term.memory_t, torch.tensor(step["contrast_index"]), case["nce_t"],
                    z_s, z_t, case["n_data"])  # fmt: skip
    assert torch.isfinite(loss) and loss.item() > 0


def test_negatives_are_other_classes_without_replacement_and_repeat_from_the_seed():
    labels = torch.arange(60) % 3  # 40 images of other classes per image
    index = torch.tensor([0, 1, 5, 59])
    draws = []
    for _ in range(2):
        term = CRD("s", "t", feat_dim=4, nce_k=30, seed=7)
        term.build(3, 3, 60, labels)
        draws.append(term.contrast_index(index))
    idx = draws[0]
    assert torch.equal(draws[0], draws[1]) and idx.shape == (4, 31)
    assert torch.equal(idx[:, 0], index)
    assert all(len(set(row[1:].tolist())) == 30 for row in idx)  # without replacement: 30 <= 40 candidates
    assert (labels[idx[:, 1:]] != labels[index][:, None]).all()
    big = CRD("s", "t", feat_dim=4, nce_k=100, seed=7)  # more than the 40 candidates: with replacement, as official
    big.build(3, 3, 60, labels)
    more = big.contrast_index(index)
    assert more.shape == (4, 101) and (labels[more[:, 1:]] != labels[index][:, None]).all()


@pytest.mark.parametrize("key,value", [("feat_dim", 0), ("nce_k", 2.5), ("nce_t", 0), ("nce_m", 1.0)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        CRD("s", "t", **{key: value})
    assert err.value.key == key


def test_scoring_every_bank_row_equals_gathering_the_contrasts():
    """With no more images than contrasts the scores come from one product with the whole bank; they equal the
    official gather of B x (K+1) rows (the path the reference values above check), value and gradient."""
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(20, 8), dim=1)
    index = torch.randint(0, 20, (4, 33))  # K+1 = 33 >= N = 20
    anchor = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    scores = contrast_scores(bank, anchor, index, 0.07)
    (grad,) = torch.autograd.grad(scores.sum(), anchor)
    rows = bank[index]
    expected = torch.exp(torch.einsum("bkd,bd->bk", rows, anchor) / 0.07)
    (expected_grad,) = torch.autograd.grad(expected.sum(), anchor)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
