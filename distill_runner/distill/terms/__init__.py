"""Loss terms, each named in a recipe's YAML by its ``_target_``, e.g.
``distill_runner.distill.terms.HintonKD``. A term of your own is any class meeting
:class:`distill_runner.distill.contract.LossTerm` (subclass :class:`~distill_runner.distill.contract.Term`)."""

from distill_runner.distill.terms.ab_ft import ActivationBoundaries, FactorTransfer
from distill_runner.distill.terms.ctkd import CTKD
from distill_runner.distill.terms.dist import DIST
from distill_runner.distill.terms.features import AttentionTransfer, FeatureHints
from distill_runner.distill.terms.logits import CrossEntropy, DecoupledKD, HintonKD
from distill_runner.distill.terms.mlkd import MLKD
from distill_runner.distill.terms.nkd import NKD
from distill_runner.distill.terms.ofd import OFD
from distill_runner.distill.terms.self_distillation import SelfDistillation
from distill_runner.distill.terms.ttm import TTM, WTTM

__all__ = [
    "CTKD",
    "DIST",
    "MLKD",
    "NKD",
    "OFD",
    "TTM",
    "WTTM",
    "ActivationBoundaries",
    "AttentionTransfer",
    "CrossEntropy",
    "DecoupledKD",
    "FactorTransfer",
    "FeatureHints",
    "HintonKD",
    "SelfDistillation",
]
