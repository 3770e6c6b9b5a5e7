"""DOT (distill_runner.train.optimizers) against mdistiller's DistillationOrientedTrainer and its DOT trainer
(a08d46f): parameters after N fixed steps of a fixed problem, stored in tests/reference/dot.json, computed by the
official code. Our steps go through the training loop's own split (backward_split), as train_step calls it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_cases

from distill_runner.errors import ConfigError
from distill_runner.train.optimizers import DOT, backward_split

CASES = reference_cases("dot")


def _losses(p, x, y, t_logits, t_emb, temperature=4.0, alpha=0.9):
    """The fixed problem of the reference (tests/reference/dot.json, called_as): shared, task-only (task_bias)
    and distillation-only (projector) parameters."""
    h = torch.relu(x @ p["w1"].t())
    logits = h @ p["w2"].t() + p["b2"]
    ce = (1 - alpha) * F.cross_entropy(logits + p["task_bias"], y)
    kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(t_logits / temperature, 1), reduction="batchmean")
    return ce, alpha * kd * temperature**2 + F.mse_loss(h @ p["projector"].t(), t_emb)


@pytest.mark.parametrize("name", CASES)
def test_parameters_after_n_steps_equal_the_official_dot(name):
    case = CASES[name]
    p = {k: torch.tensor(v, requires_grad=True) for k, v in case["params"].items()}
    data = {k: torch.tensor(v) for k, v in case["data"].items()}
    opt = DOT(list(p.values()), lr=case["lr"], momentum=case["momentum"], delta=case["delta"],
              weight_decay=case["weight_decay"])  # fmt: skip
    for i in range(case["steps"]):
        ce, kd = _losses(p, data["x"][i], data["y"][i], data["teacher_logits"][i], data["teacher_embedding"][i])
        assert (ce.item(), kd.item()) == pytest.approx(tuple(case["losses"][i].values()), rel=1e-5)
        backward_split(opt, [ce], [kd])
        opt.step()
    for k, expected in case["params_after"].items():
        e = torch.tensor(expected, dtype=torch.float64)
        torch.testing.assert_close(p[k].detach().double(), e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(opt.state[p["w1"]])  # shared: both buffers
    assert set(opt.state[p["task_bias"]]) == {"momentum_buffer"} and set(opt.state[p["projector"]]) == {
        "momentum_kd_buffer"
    }


def test_without_distillation_gradients_dot_is_sgd_with_its_momentum():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, requires_grad=True), None
    b = a.detach().clone().requires_grad_(True)
    dot, sgd = (
        DOT([a], lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-4),
        torch.optim.SGD([b], 0.1, 0.9, weight_decay=5e-4),
    )
    for _ in range(4):
        x = torch.randn(3)
        backward_split(dot, [(a @ x).pow(2).sum()], [])
        dot.step()
        sgd.zero_grad()
        (b @ x).pow(2).sum().backward()
        sgd.step()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("key,value", [("delta", 0.2), ("momentum", 1.5), ("lr", 0.0), ("weight_decay", -1.0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        DOT([torch.zeros(1, requires_grad=True)], **{key: value})
    assert err.value.key == key
