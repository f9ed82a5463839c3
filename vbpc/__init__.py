"""vbpc: variational Bayesian deep learning with posterior correction, for PyTorch."""

from . import checkpoint, metrics, nn, predictive
from .errors import NonFiniteError, SamplingError, StateDictMismatchError
from .inference.ivon import IVON
from .inference.continual import ContinualIVON, pretrained_posterior
from .inference.ivon_poco import IVONPoCo, IVONPoCoMo
from .inference.poco import SVRG, VSGD, AlphaSVRG, VSGDPoCo
from .inference.svi import BayesByBackprop, to_pyro, to_pyro_guide, to_pyro_model
from .inference.von import VON, VONPoCo
from .posterior import DiagonalGaussian, FullGaussian, GaussianPosterior, IsotropicGaussian
from .scope import Scope, select_parameters
from .version import __version__

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
