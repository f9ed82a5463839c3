"""Learners and workflows: IVON (and, in later modules, the posterior-corrected learners)."""

from .ivon import IVON
from .ivon_poco import IVONPoCo, IVONPoCoMo
from .poco import SVRG, VSGD, AlphaSVRG, Anchor, VSGDPoCo
from .von import VON, VONPoCo

__all__ = ["IVON", "IVONPoCo", "IVONPoCoMo", "Anchor", "VSGDPoCo", "VSGD", "SVRG", "AlphaSVRG", "VON", "VONPoCo"]
