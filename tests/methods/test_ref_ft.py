"""FT's loss (distill_runner.distill.terms.ab_ft) against RepDistiller's FactorTransfer (HobbitLong/RepDistiller
@ b84f547, distiller_zoo/FT.py): value and gradient of the student's factor on fixed factor maps (same size,
student larger, student smaller, p2 = 2), stored in tests/reference/ft.json."""

import pytest
import torch
from conftest import reference_cases

from distill_runner.distill.terms.ab_ft import ft_loss

CASES = reference_cases("ft")


@pytest.mark.parametrize("name", CASES)
def test_loss_function_equals_the_official_value_and_gradient(name):
    case = CASES[name]
    factor_s = torch.tensor(case["factor_s"], dtype=torch.float32, requires_grad=True)
    loss = ft_loss(factor_s, torch.tensor(case["factor_t"], dtype=torch.float32), case["p1"], case["p2"])
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=1e-5, atol=0)
    expected = torch.tensor(case["grad_factor_s"], dtype=torch.float32)
    torch.testing.assert_close(factor_s.grad, expected, rtol=1e-5, atol=1e-9)
