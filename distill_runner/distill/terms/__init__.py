"""Loss terms, each named in a recipe's YAML by its ``_target_``, e.g.
``distill_runner.distill.terms.HintonKD``. A term of your own is any class meeting
:class:`distill_runner.distill.contract.LossTerm` (subclass :class:`~distill_runner.distill.contract.Term`)."""

from distill_runner.distill.terms.features import AttentionTransfer, FeatureHints
from distill_runner.distill.terms.logits import CrossEntropy, DecoupledKD, HintonKD
from distill_runner.distill.terms.self_distillation import SelfDistillation

__all__ = ["AttentionTransfer", "CrossEntropy", "DecoupledKD", "FeatureHints", "HintonKD", "SelfDistillation"]
