"""Learners and workflows: IVON, the posterior-corrected learners, and Pyro interoperability (``svi``)."""

from .continual import ContinualIVON, pretrained_posterior
from .ivon import IVON
from .ivon_poco import IVONPoCo, IVONPoCoMo
from ..posterior.merging import merge_posteriors, task_arithmetic
from .correction import Correction, PoCo, ReplayCorrection
from .poco import Anchor
from .von import VON, VONPoCo
from .vsgd import SVRG, VSGD, AlphaSVRG, VSGDPoCo

__all__ = ["PoCo", "ReplayCorrection", "Correction", "IVON", "IVONPoCo", "IVONPoCoMo", "Anchor", "VSGDPoCo", "VSGD",
           "SVRG", "AlphaSVRG", "VON", "VONPoCo", "BayesByBackprop", "to_pyro", "to_pyro_guide", "to_pyro_model",
           "merge_posteriors", "task_arithmetic", "ContinualIVON", "pretrained_posterior"]


def __getattr__(name: str):  # PEP 562: the Pyro bridge imports Pyro, so it loads on first use
    if name in ("BayesByBackprop", "to_pyro", "to_pyro_guide", "to_pyro_model"):
        from . import svi

        return getattr(svi, name)
    raise AttributeError(f"module 'vbpc.inference' has no attribute {name!r}")
