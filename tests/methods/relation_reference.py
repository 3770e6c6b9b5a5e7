"""Shared by the relation methods' reference tests: run a term on a reference case of
tests/reference/<method>.json (feature maps or embeddings, the official code's loss and student gradients)."""

import torch
from conftest import reference_cases

from distill_runner.distill.contract import TermState

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
