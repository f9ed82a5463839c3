"""vbpc: variational Bayesian deep learning with posterior correction, for PyTorch."""

from . import checkpoint, metrics, nn, predictive
from .errors import NonFiniteError, SamplingError, StateDictMismatchError
from .inference.ivon import IVON
from .inference.continual import ContinualIVON, pretrained_posterior
from .inference.ivon_poco import IVONPoCo, IVONPoCoMo
from .inference.correction import PoCo, ReplayCorrection
from .inference.vsgd import SVRG, VSGD, AlphaSVRG, VSGDPoCo
from .inference.von import VON, VONPoCo
from .posterior import DiagonalGaussian, FullGaussian, GaussianPosterior, IsotropicGaussian
from .scope import Scope, select_parameters
from .version import __version__

#: loaded on first use: Pyro is imported only by the Pyro bridge (``import vbpc`` stays light)
_LAZY = {"BayesByBackprop": "integrations.pyro", "to_pyro": "integrations.pyro",
         "to_pyro_guide": "integrations.pyro", "to_pyro_model": "integrations.pyro"}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)  # noqa: F821
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vbpc' has no attribute {name!r}")

__all__ = [
    "IVON",
    "IVONPoCo",
    "ContinualIVON",
    "pretrained_posterior",
    "IVONPoCoMo",
    "VSGDPoCo",
    "VSGD",
    "SVRG",
    "AlphaSVRG",
    "VON",
    "VONPoCo",
    "BayesByBackprop",
    "to_pyro",
    "to_pyro_guide",
    "to_pyro_model",
    "nn",
    "checkpoint",
    "metrics",
    "predictive",
    "DiagonalGaussian",
    "IsotropicGaussian",
    "FullGaussian",
    "GaussianPosterior",
    "Scope",
    "select_parameters",
    "NonFiniteError",
    "SamplingError",
    "StateDictMismatchError",
    "__version__",
]
