"""vbpc: variational Bayesian deep learning with posterior correction, for PyTorch (docs/index.md).

``import vbpc`` loads torch and vbpc's own modules only: the Pyro bridge, the framework integrations
(:mod:`vbpc.integrations`), the plots and the command line load on first use.
"""

from . import checkpoint, metrics, nn, predictive
from .errors import CorruptCheckpointError, NonFiniteError, RunLockedError, SamplingError, StateDictMismatchError
from .inference.continual import ContinualIVON, pretrained_posterior
from .inference.correction import PoCo, ReplayCorrection
from .inference.ivon import IVON
from .inference.ivon_poco import IVONPoCo, IVONPoCoMo
from .inference.von import VON, VONPoCo
from .inference.vsgd import SVRG, VSGD, AlphaSVRG, VSGDPoCo
from .memory import state_bytes
from .posterior import (DiagonalGaussian, FullGaussian, GaussianPosterior, IsotropicGaussian, merge_posteriors,
                        task_arithmetic)
from .scope import Scope, select_parameters
from .version import __version__

#: loaded on first use: Pyro is imported only by the Pyro bridge (``import vbpc`` stays light)
_LAZY = {"BayesByBackprop": "integrations.pyro", "to_pyro": "integrations.pyro",
         "to_pyro_guide": "integrations.pyro", "to_pyro_model": "integrations.pyro"}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vbpc' has no attribute {name!r}")


__all__ = [
    # learners (torch.optim optimizers)
    "IVON",
    "VSGD",
    "VON",
    # posterior correction: the component and its named learners
    "PoCo",
    "ReplayCorrection",
    "IVONPoCo",
    "IVONPoCoMo",
    "VSGDPoCo",
    "SVRG",
    "AlphaSVRG",
    "VONPoCo",
    # knowledge adaptation
    "ContinualIVON",
    "pretrained_posterior",
    "merge_posteriors",
    "task_arithmetic",
    # posteriors and what they cover
    "GaussianPosterior",
    "DiagonalGaussian",
    "IsotropicGaussian",
    "FullGaussian",
    "Scope",
    "select_parameters",
    "state_bytes",
    # Pyro (loaded on first use)
    "BayesByBackprop",
    "to_pyro",
    "to_pyro_guide",
    "to_pyro_model",
    # modules
    "checkpoint",
    "metrics",
    "nn",
    "predictive",
    # errors
    "NonFiniteError",
    "SamplingError",
    "StateDictMismatchError",
    "CorruptCheckpointError",
    "RunLockedError",
    "__version__",
]
