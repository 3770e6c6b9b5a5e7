"""Hinton KD, the one formula (distill_runner.distill.terms.logits), against an independent computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_runner.distill.recipe import Recipe
from distill_runner.distill.terms.logits import kd_per_sample
from distill_runner.errors import ConfigError


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reference_kd_loss(s, t, y, temperature, alpha):
    """alpha * T^2 * KL_batchmean(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE, in float64 numpy."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean()
    ce = -np.log(_softmax(s)[np.arange(len(y)), y]).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.5), (8.0, 0.9), (2.5, 0.25), (4.0, 1.0)])
def test_hinton_kd_matches_independent_formula(temperature, alpha):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(32, 10, generator=gen) * 3, torch.randn(32, 10, generator=gen) * 3
    y = torch.randint(0, 10, (32,), generator=gen)
    terms = Recipe.hinton(temperature, alpha)({"target": y}, {"logits": s}, {"logits": t})
    expected = reference_kd_loss(s.numpy(), t.numpy(), y.numpy(), temperature, alpha)
    assert sum(terms.values()).item() == pytest.approx(expected, rel=1e-5)
    # each named term is the weighted piece it says it is
    if alpha > 0:
        kd_alone = reference_kd_loss(s.numpy(), t.numpy(), y.numpy(), temperature, 1.0)
        assert terms["kd"].item() == pytest.approx(kd_alone * alpha, rel=1e-5)
    # and its mean is torch's batchmean KL times T^2
    batchmean = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), reduction="batchmean",
                         log_target=True) * temperature**2  # fmt: skip
    assert kd_per_sample(s, t, temperature).mean().item() == pytest.approx(batchmean.item(), rel=1e-5)


def test_t1_alpha0_is_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 5, generator=gen), torch.randn(16, 5, generator=gen)
    y = torch.randint(0, 5, (16,), generator=gen)
    terms = Recipe.hinton(temperature=1.0, alpha=0.0)({"target": y}, {"logits": s}, {"logits": t})
    assert set(terms) == {"ce"}
    assert sum(terms.values()).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert Recipe.cross_entropy()({"target": y}, {"logits": s})["ce"].item() == pytest.approx(
        F.cross_entropy(s, y).item(), rel=1e-6
    )


def test_kd_is_zero_when_student_equals_teacher_and_does_not_depend_on_batch_size():
    z = torch.randn(8, 10)
    assert kd_per_sample(z, z, 4.0).abs().max().item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.randn(1, 10), torch.randn(1, 10)
    repeated = kd_per_sample(s.repeat(7, 1), t.repeat(7, 1), 2.0).mean().item()
    assert repeated == pytest.approx(kd_per_sample(s, t, 2.0).mean().item(), rel=1e-5)


def test_kd_is_stable_in_low_precision_inputs():
    s = (torch.randn(4, 10) * 30).to(torch.bfloat16)
    t = (torch.randn(4, 10) * 30).to(torch.bfloat16)
    value = kd_per_sample(s, t, 1.0).mean()
    assert value.dtype == torch.float32 and math.isfinite(value.item())


@pytest.mark.parametrize(
    "kwargs,key",
    [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"),
     ({"temperature": float("inf")}, "temperature"), ({"alpha": float("nan")}, "alpha")],
)  # fmt: skip
def test_bad_hyperparameters_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Recipe.hinton(**kwargs)
    assert err.value.key == key
