"""Learners and workflows: IVON, the posterior-corrected learners, and Pyro interoperability (``svi``)."""

from .continual import ContinualIVON, pretrained_posterior
from .ivon import IVON
from .ivon_poco import IVONPoCo, IVONPoCoMo
from .merge import merge_posteriors, task_arithmetic
from .poco import SVRG, VSGD, AlphaSVRG, Anchor, VSGDPoCo
from .svi import BayesByBackprop, to_pyro, to_pyro_guide, to_pyro_model
from .von import VON, VONPoCo

__all__ = ["IVON", "IVONPoCo", "IVONPoCoMo", "Anchor", "VSGDPoCo", "VSGD", "SVRG", "AlphaSVRG", "VON", "VONPoCo",
           "BayesByBackprop", "to_pyro", "to_pyro_guide", "to_pyro_model", "merge_posteriors", "task_arithmetic",
           "ContinualIVON", "pretrained_posterior"]
