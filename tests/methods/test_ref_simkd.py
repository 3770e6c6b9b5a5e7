"""SimKD (distill_runner.distill.terms.simkd) against the official code (DefangChen/SimKD 2b389c3, models/util.py
SimKD with train_student.py's nn.MSELoss): on fixed feature maps (equal sizes, the student's larger, the teacher's
larger; factors 2 and 4), projector weights (BatchNorm statistics included) and teacher head, the loss and the
student's gradient (train mode), the term (bare and deployed) and the deployed student's logits in train and eval
mode equal tests/reference/simkd.json at 1e-5 relative; the recipe's official setting; bad settings by key."""

from pathlib import Path

import pytest
import torch
from conftest import reference_cases
from omegaconf import OmegaConf
from relation_reference import close
from torch import nn

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.simkd import PROJECTOR, SimKD, projector, simkd_loss
from distill_runner.errors import ConfigError
from distill_runner.models.features import FeatureTap

CASES = reference_cases("simkd")
CONF = Path(__file__).resolve().parents[2] / "conf" / "distill"
STATE = TermState(4.0, 0.5, 1.0)


class Student(nn.Module):
    """A student whose final feature map (``body``) is its input: the gradient to the image is the feature's."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.body, self.fc = nn.Identity(), nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def parts(case: dict) -> tuple[nn.Module, nn.Linear]:
    """The official module's transfer weights in our projector, and the teacher head."""
    s, t = torch.tensor(case["student"]), torch.tensor(case["teacher"])
    project = projector(s.shape[1], t.shape[1], case["factor"])
    state = {k.removeprefix("transfer."): torch.tensor(v) for k, v in case["projector"].items()}
    project.load_state_dict(state, strict=False)  # num_batches_tracked: not part of the math
    head = nn.Linear(t.shape[1], len(case["teacher_head"]["bias"]))
    with torch.no_grad():
        head.weight.copy_(torch.tensor(case["teacher_head"]["weight"]))
        head.bias.copy_(torch.tensor(case["teacher_head"]["bias"]))
    return project, head


def term_for(case: dict) -> SimKD:
    """A term as bind leaves it for these maps (``body`` of :class:`Student`, teacher ``t``)."""
    term = SimKD("body", "t", factor=case["factor"])
    term.projector, head = parts(case)
    term._teacher_head = [head]
    term.sizes = (len(case["student"][0][0]), len(case["teacher"][0][0]))
    term.student_layers, term.teacher_layers = ("body",), ("t",)
    term.image_shape = tuple(torch.tensor(case["student"]).shape[1:])  # Student's image is its feature map
    return term


@pytest.mark.parametrize("name", CASES)
def test_plain_function_matches_the_official_loss_gradient_and_logits(name):
    case = CASES[name]
    project, head = parts(case)
    x = torch.tensor(case["student"], requires_grad=True)
    loss, logits = simkd_loss(x, torch.tensor(case["teacher"]), project.train(), head)
    loss.backward()
    close(loss, case["loss"])
    close(x.grad, case["grad_student"])
    close(logits, case["train_logits"])


@pytest.mark.parametrize("name", CASES)
def test_bare_term_matches_the_official_value_and_gradient(name):
    case = CASES[name]
    term = term_for(case)
    x = torch.tensor(case["student"], requires_grad=True)
    teacher = {"features": {"t": term.teacher_summary("t", torch.tensor(case["teacher"]))}}
    loss = term({}, {"features": {"body": x}}, teacher, STATE)
    loss.backward()
    close(loss, case["loss"])
    close(x.grad, case["grad_student"])


@pytest.mark.parametrize("name", CASES)
def test_deployed_student_and_term_match_the_official_code(name):
    case = CASES[name]
    term = term_for(case)
    x = torch.tensor(case["student"], requires_grad=True)
    deployed = term.deployed(Student(x.shape[1], len(case["teacher_head"]["bias"])))
    assert "projector" not in dict(term.named_children()) and term.student_layers == ("body", PROJECTOR)
    eval_logits = deployed.eval()(x.detach())  # before the train-mode step moves the BatchNorm statistics
    close(eval_logits, case["eval_logits"])
    tap = FeatureTap(deployed.train(), term.student_layers)
    out = tap(x)
    teacher = {"features": {"t": term.teacher_summary("t", torch.tensor(case["teacher"]))}}
    loss = term({}, out, teacher, STATE)
    loss.backward()
    close(loss, case["loss"])
    close(x.grad, case["grad_student"])
    close(out["logits"], case["train_logits"])
    assert not any(p.requires_grad for p in deployed.simkd_teacher_head.parameters())
    assert not deployed.fc.weight.requires_grad  # the student's own classifier is unused: frozen (DDP needs it)
    assert all(p.requires_grad for p in deployed.simkd_projector.parameters())


def test_recipe_is_the_official_setting():
    recipe = OmegaConf.load(CONF / "simkd.yaml")
    terms = recipe.terms  # -c 0 -d 0 -b 1: no cross-entropy, no KD, the MSE at weight 1
    assert list(terms) == ["ce", "simkd"] and (terms.ce.weight, terms.simkd.weight, terms.simkd.factor) == (0, 1, 2)


@pytest.mark.parametrize("key,value", [("factor", 0), ("factor", 1.5), ("student", "layer4:input")])
def test_bad_values_name_the_key(key, value):
    kwargs = {"student": "s", "teacher": "t", key: value}
    with pytest.raises(ConfigError) as err:
        SimKD(**kwargs)
    assert err.value.key == key
