"""The learners: IVON, the posterior-corrected learners (correction as a component, :class:`PoCo`), VSGD and VON."""

from .continual import ContinualIVON, pretrained_posterior
from .correction import Correction, PoCo, ReplayCorrection
from .ivon import IVON
from .ivon_poco import IVONPoCo, IVONPoCoMo
from .poco import Anchor
from .von import VON, VONPoCo
from .vsgd import SVRG, VSGD, AlphaSVRG, VSGDPoCo

__all__ = ["PoCo", "ReplayCorrection", "Correction", "IVON", "IVONPoCo", "IVONPoCoMo", "Anchor", "VSGDPoCo", "VSGD",
           "SVRG", "AlphaSVRG", "VON", "VONPoCo", "ContinualIVON", "pretrained_posterior"]

