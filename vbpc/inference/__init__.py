"""Learners and workflows: IVON (and, in later modules, the posterior-corrected learners)."""

from .ivon import IVON
from .poco import SVRG, VSGD, AlphaSVRG, Anchor, VSGDPoCo

__all__ = ["IVON", "Anchor", "VSGDPoCo", "VSGD", "SVRG", "AlphaSVRG"]
