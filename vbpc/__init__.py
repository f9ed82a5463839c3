"""vbpc: variational Bayesian deep learning with posterior correction, for PyTorch (docs/index.md).

``import vbpc`` imports nothing heavy (not even torch): every public name loads on first use, and the
Pyro bridge, the framework integrations (:mod:`vbpc.integrations`) and the plots only when used.
"""

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # the names below load on first use (PEP 562): `import vbpc` and `vbpc --help` stay instant
    from . import checkpoint, metrics, nn, predictive
    from .errors import CorruptCheckpointError, NonFiniteError, RunLockedError, SamplingError, StateDictMismatchError
    from .inference.continual import ContinualIVON, pretrained_posterior
    from .inference.correction import PoCo, ReplayCorrection
    from .inference.ivon import IVON
    from .inference.ivon_poco import IVONPoCo, IVONPoCoMo
    from .inference.unlearning import Unlearned, unlearn
    from .inference.von import VON, VONPoCo
    from .inference.vsgd import SVRG, VSGD, AlphaSVRG, VSGDPoCo
    from .integrations.pyro import BayesByBackprop, to_pyro, to_pyro_guide, to_pyro_model
    from .memory import state_bytes
    from .posterior import (
        DiagonalGaussian,
        FullGaussian,
        GaussianPosterior,
        IsotropicGaussian,
        merge_posteriors,
        task_arithmetic,
    )
    from .scope import Scope, select_parameters

#: where each public name lives; a submodule maps to itself (``vbpc.metrics``)
_LAZY = {
    **dict.fromkeys(["IVON"], "inference.ivon"),
    **dict.fromkeys(["IVONPoCo", "IVONPoCoMo"], "inference.ivon_poco"),
    **dict.fromkeys(["VSGD", "VSGDPoCo", "SVRG", "AlphaSVRG"], "inference.vsgd"),
    **dict.fromkeys(["VON", "VONPoCo"], "inference.von"),
    **dict.fromkeys(["PoCo", "ReplayCorrection"], "inference.correction"),
    **dict.fromkeys(["ContinualIVON", "pretrained_posterior"], "inference.continual"),
    **dict.fromkeys(["unlearn", "Unlearned"], "inference.unlearning"),
    **dict.fromkeys(["GaussianPosterior", "DiagonalGaussian", "IsotropicGaussian", "FullGaussian", "merge_posteriors",
                     "task_arithmetic"], "posterior"),
    **dict.fromkeys(["Scope", "select_parameters"], "scope"),
    "state_bytes": "memory",
    **dict.fromkeys(["BayesByBackprop", "to_pyro", "to_pyro_guide", "to_pyro_model"], "integrations.pyro"),
    **dict.fromkeys(["NonFiniteError", "SamplingError", "StateDictMismatchError", "CorruptCheckpointError",
                     "RunLockedError"], "errors"),
    **{m: m for m in ("checkpoint", "metrics", "nn", "predictive")},
}


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = module if _LAZY[name] == name else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vbpc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "unlearn",
    "Unlearned",
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
