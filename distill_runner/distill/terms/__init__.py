"""Loss terms, each named in a recipe's YAML by its ``_target_``, e.g.
``distill_runner.distill.terms.HintonKD``. A term of your own is any class meeting
:class:`distill_runner.distill.contract.LossTerm` (subclass :class:`~distill_runner.distill.contract.Term`).

Docs: docs/methods/index.md
"""

from distill_runner.distill.terms.ab_ft import ActivationBoundaries, FactorTransfer
from distill_runner.distill.terms.catkd import CATKD
from distill_runner.distill.terms.crd import CRD
from distill_runner.distill.terms.crld import CRLD, StrongCrossEntropy
from distill_runner.distill.terms.ctkd import CTKD
from distill_runner.distill.terms.dist import DIST
from distill_runner.distill.terms.feature_maps import FSP, ICKD, KDSVD, NST
from distill_runner.distill.terms.features import AttentionTransfer, FeatureHints
from distill_runner.distill.terms.logits import CrossEntropy, DecoupledKD, HintonKD
from distill_runner.distill.terms.mlkd import MLKD
from distill_runner.distill.terms.nkd import NKD
from distill_runner.distill.terms.ofd import OFD
from distill_runner.distill.terms.relation import PKT, RKD, CorrelationCongruence, SimilarityPreserving
from distill_runner.distill.terms.reviewkd import ReviewKD
from distill_runner.distill.terms.sdd import SDD
from distill_runner.distill.terms.self_distillation import SelfDistillation
from distill_runner.distill.terms.simkd import SimKD
from distill_runner.distill.terms.srd import SRD
from distill_runner.distill.terms.ttm import TTM, WTTM
from distill_runner.distill.terms.vid import VID
from distill_runner.distill.terms.wsld import WSLD

__all__ = [
    "CATKD",
    "CRD",
    "CRLD",
    "CTKD",
    "DIST",
    "FSP",
    "ICKD",
    "KDSVD",
    "MLKD",
    "NKD",
    "NST",
    "OFD",
    "PKT",
    "RKD",
    "SDD",
    "SRD",
    "TTM",
    "VID",
    "WSLD",
    "WTTM",
    "ActivationBoundaries",
    "AttentionTransfer",
    "CorrelationCongruence",
    "CrossEntropy",
    "DecoupledKD",
    "FactorTransfer",
    "FeatureHints",
    "HintonKD",
    "ReviewKD",
    "SelfDistillation",
    "SimKD",
    "SimilarityPreserving",
    "StrongCrossEntropy",
]
