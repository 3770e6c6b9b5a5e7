"""Shared by the reference tests of the relation and feature methods: run a term on a reference case of
tests/reference/<method>.json (feature maps or embeddings, the official code's loss and student gradients)."""

import torch
from conftest import reference_cases
from torch import nn

from distill_runner.distill.contract import TermState
from distill_runner.distill.terms.features import parse_pairs

STATE = TermState(4.0, 0.5, 1.0)


def cases(method: str) -> dict[str, dict]:
    return reference_cases(method)


def tensors(case: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The case's student features (taking gradients) and teacher features, float32."""
    student = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in case["student"]]
    return student, [torch.tensor(x, dtype=torch.float32) for x in case["teacher"]]


def bound(term, layers: int):
    """``term`` with layers s0.. / t0.. set as its bind would, without models (the inputs are given)."""
    if hasattr(term, "pairs"):
        term.pairs = [(f"s{i}", f"t{i}", 1.0) for i in range(layers)]
    else:
        term.student, term.teacher = "s0", "t0"
    term.student_layers = tuple(f"s{i}" for i in range(layers))
    term.teacher_layers = tuple(f"t{i}" for i in range(layers))
    return term


def run_term(term, case: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The term's loss on the case (the teacher through its ``teacher_summary``, as the recipe does), and
    the gradient of each student input."""
    student, teacher = tensors(case)
    s_out = {"features": dict(zip(term.student_layers, student, strict=True))}
    t_out = {"features": {n: term.teacher_summary(n, f) for n, f in zip(term.teacher_layers, teacher, strict=True)}}
    loss = term({}, s_out, t_out, STATE)
    loss.backward()
    return loss, [x.grad for x in student]


def relative_errors(loss: torch.Tensor, grads: list[torch.Tensor], case: dict) -> tuple[float, float]:
    """(|loss - official| / |official|, max |grad - official| / max |official grad|)."""
    value = abs(loss.item() - case["loss"]) / abs(case["loss"])
    grad = 0.0
    for g, expected in zip(grads, case["grad_student"], strict=True):
        e = torch.tensor(expected, dtype=torch.float64)
        grad = max(grad, ((g.double() - e).abs().max() / e.abs().max()).item())
    return value, grad


def assert_official(loss: torch.Tensor, grads: list[torch.Tensor], case: dict, rtol: float = 1e-5) -> None:
    """Loss and every student gradient equal the official code's at ``rtol`` (gradients: elementwise, with an
    absolute floor of ``rtol`` times the largest official gradient, for the elements near zero)."""
    torch.testing.assert_close(loss.double(), torch.tensor(case["loss"], dtype=torch.float64), rtol=rtol, atol=0)
    for g, expected in zip(grads, case["grad_student"], strict=True):
        e = torch.tensor(expected, dtype=torch.float64)
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=rtol * e.abs().max().item())


def close(value: torch.Tensor, expected, rtol: float = 1e-5) -> None:
    """``value`` equals ``expected`` at ``rtol`` (absolute floor: ``rtol`` times the largest expected element)."""
    e = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(value.double(), e, rtol=rtol, atol=rtol * e.abs().max().item())


def linear(weights: dict) -> nn.Linear:
    """A classifier head with the case's weight, and its bias where the case stores one (a CAM's head has none)."""
    w = torch.tensor(weights["weight"], dtype=torch.float32)
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        if "bias" in weights:
            head.bias.copy_(torch.tensor(weights["bias"]))
    return head


def assert_head_term_official(term, student_head: nn.Linear, case: dict, batch: dict, state: TermState) -> None:
    """The term on the case's maps (student ``s``, teacher ``t`` through its ``teacher_summary``): loss, map
    gradient and student-head gradient equal the official code's at 1e-5."""
    x = torch.tensor(case["student"][0], requires_grad=True)
    teacher = {"features": {"t": term.teacher_summary("t", torch.tensor(case["teacher"][0]))}}
    loss = term(batch, {"features": {"s": x}}, teacher, state)
    loss.backward()
    close(loss, case["loss"])
    close(x.grad, case["grad_student"][0])
    close(student_head.weight.grad, case["grad_student_head_weight"])


def pair_specs(layers: int) -> list[str]:
    """The ``pairs`` setting s0:t0, s1:t1, ... of a term over ``layers`` pairs."""
    return [f"s{i}:t{i}" for i in range(layers)]


def with_pairs(term):
    """``term`` with its pairs parsed as its bind would (the layers are given, no models)."""
    term.pairs = parse_pairs(term._pairs_cfg, "pairs")
    return term


def named_features(case: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The case's student features as s0.. (taking gradients) and teacher features as t0.., float32."""
    student = {f"s{i}": torch.tensor(x, dtype=torch.float32, requires_grad=True)
               for i, x in enumerate(case["student_features"])}  # fmt: skip
    teacher = {f"t{i}": torch.tensor(x, dtype=torch.float32) for i, x in enumerate(case["teacher_features"])}
    return student, teacher


def assert_pairs_term_official(term, student: dict, teacher: dict, case: dict) -> None:
    """The term's loss and every student feature's gradient equal the official code's (float32, 1e-5 relative;
    gradients with an absolute floor of 1e-6 times the largest official one)."""
    loss = term({}, {"features": student}, {"features": teacher}, None)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float32), rtol=1e-5, atol=0)
    for i, expected in enumerate(case["grad_student_features"]):
        expected = torch.tensor(expected, dtype=torch.float32)
        torch.testing.assert_close(student[f"s{i}"].grad, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
