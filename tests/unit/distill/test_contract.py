"""The term contract's capabilities as the recipe reads them: per-sample weights, learned values, curriculum."""

import pytest
import torch

from distill_runner.distill.contract import Term, TermState
from distill_runner.distill.recipe import Recipe
from distill_runner.errors import ConfigError

CE = {"_target_": "distill_runner.distill.terms.CrossEntropy", "weight": 1.0}
DIST = {"_target_": "distill_runner.distill.terms.DIST", "weight": 2.0}
KD = {"_target_": "distill_runner.distill.terms.HintonKD", "weight": 1.0}


@pytest.mark.parametrize("switch", [{"sample_weighting": "teacher_confidence"}, {"class_balance": "inverse_frequency"}])
def test_sample_weights_need_a_term_that_applies_them(switch, caplog):
    # DIST couples the samples of a batch: weights cannot apply, so asking for them is an error, not a no-op
    with pytest.raises(ConfigError) as err:
        Recipe({"ce": CE, "dist": DIST}, **switch)
    assert err.value.key == next(iter(switch)) and "no term of this recipe weighs samples" in str(err.value)
    with caplog.at_level("INFO"):
        Recipe({"ce": CE, "dist": DIST, "kd": KD}, **switch)
    assert "apply to: kd" in caplog.text  # the log names the terms the weights act on


class Curriculum(Term):
    """Records what the recipe tells it; learns nothing but reports a value."""

    needs_teacher = False

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def logged(self):
        return {"calls": float(len(self.seen))}

    def forward(self, batch, student, teacher, state: TermState):
        self.seen.append((state.epoch, state.epochs))
        return student["logits"].float().mean()


def test_terms_see_the_epoch_and_report_learned_values():
    recipe = Recipe({"mine": {"_target_": f"{__name__}.Curriculum"}})
    batch, student = {"target": torch.zeros(2, dtype=torch.long)}, {"logits": torch.ones(2, 3)}
    for epoch in range(3):
        recipe.set_epoch(epoch, 3)
        recipe(batch, student)
    assert recipe.terms["mine"].seen == [(0, 3), (1, 3), (2, 3)]
    assert recipe.logged() == {"mine/calls": 3.0}
    assert Recipe.hinton().logged() == {}  # terms that learn nothing log nothing
