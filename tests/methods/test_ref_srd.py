"""SRD (distill_runner.distill.terms.srd) against the authors' OurDistillationLoss (roymiles/Simple-Recipe-
Distillation 31e8477) and torchdistill's SRDLoss + SRDModelWrapper (3e4373c): values and gradients (student map,
student logits, projector) stored in tests/reference/srd.json, computed by the official code."""

from pathlib import Path

import pytest
import torch
from conftest import reference_cases
from omegaconf import OmegaConf
from relation_reference import close

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.srd import SRD, srd_loss
from distill_runner.errors import ConfigError

CASES = reference_cases("srd")
RECIPE = Path(__file__).resolve().parents[2] / "conf" / "distill" / "srd.yaml"


def _projector_weight(case: dict) -> torch.Tensor:
    if case["projector_weight"] is not None:
        return torch.tensor(case["projector_weight"])
    u, v = (torch.tensor(x) for x in case["projector_rank2"])
    return (u @ v.t()) / v.shape[0] + torch.eye(u.shape[0], v.shape[0]) * 0.5


def _term(case: dict) -> tuple[SRD, torch.Tensor, torch.Tensor]:
    term = SRD("s0", "t0", exponent=case["exponent"])
    weight = _projector_weight(case)
    term.projector = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        term.projector.weight.copy_(weight)
        term.projector.bias.copy_(torch.tensor(case["projector_bias"]))
    term.student_layers, term.teacher_layers = ("s0",), ("t0",)
    return term, torch.tensor(case["student"][0], requires_grad=True), torch.tensor(case["teacher"][0])


@pytest.mark.parametrize("name", CASES)
def test_term_matches_the_official_value_and_gradients(name):
    case = CASES[name]
    term, f_s, f_t = _term(case)
    s_logits = torch.tensor(case["student_logits"], requires_grad=True)
    student = {"logits": s_logits, "features": {"s0": f_s}}
    teacher = {"logits": torch.tensor(case["teacher_logits"]), "features": {"t0": term.teacher_summary("t0", f_t)}}
    loss = term({}, student, teacher, TermState(case["temperature"], 0.5, 1.0))
    loss.backward()
    torch.testing.assert_close(loss.double(), torch.tensor(case["loss"], dtype=torch.float64), rtol=1e-5, atol=0)
    close(f_s.grad, case["grad_student"][0])
    close(s_logits.grad, case["grad_student_logits"])
    if case["grad_projector_weight"] is not None:
        close(term.projector.weight.grad, case["grad_projector_weight"])


@pytest.mark.parametrize("name", CASES)
def test_plain_function_matches_the_official_value(name):
    case = CASES[name]
    term, f_s, f_t = _term(case)
    z_s, z_t = term.projector(f_s.mean((2, 3))), f_t.mean((2, 3))
    logits = torch.tensor(case["student_logits"]), torch.tensor(case["teacher_logits"])
    assert srd_loss(z_s, z_t, *logits, case["temperature"], case["exponent"]).item() == pytest.approx(
        case["loss"], rel=1e-5
    )


def test_a_batch_of_one_keeps_the_logits_part():
    term, f_s, f_t = _term(CASES["torchdistill_B8_32to64_T1"])
    logits = torch.randn(1, 10)
    loss = term({}, {"logits": logits, "features": {"s0": f_s[:1]}},
                {"logits": logits, "features": {"t0": f_t[:1].mean((2, 3))}}, TermState(1.0, 0.5, 1.0))  # fmt: skip
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # equal logits: KL 0, and no batch statistics of one sample


def test_recipe_is_the_official_setting():
    term = OmegaConf.load(RECIPE).terms.srd
    assert (term.exponent, term.feature_weight, term.logit_weight, term.eps, term.projector) == (
        4.0,
        2.0,
        1.0,
        1e-4,
        True,
    )
    assert OmegaConf.load(RECIPE).temperature == 1.0


@pytest.mark.parametrize(
    "key,value", [("exponent", -1.0), ("feature_weight", "two"), ("eps", 0.0), ("projector", "yes")]
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        SRD("s", "t", **{key: value})
    assert err.value.key == key
