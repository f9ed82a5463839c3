"""The learner registry: every learner vbpc ships (and the baselines its workflows compare with),
built from one name, with what each one needs and supports.

The CLI (``learner.name`` of a config), the workflows and the benchmarks build learners here and
nowhere else::

    info = get_learner("ivon-poco")
    opt = info.build(model.named_parameters(), lr=0.1, ess=len(train), anchor_period=100)
    if info.anchored and opt.refresh_due:
        opt.refresh(loss_fn, megabatches, model=model)

The capability flags are read off the learners' code (``vbpc/inference/*.py``), and a generic test
matrix (``tests/test_learner_db.py``) exercises each learner on ``small_options`` according to them.
Building is strict: ``build`` passes its options to the class unchanged, so an option the learner
does not take is a ``TypeError``.  :meth:`LearnerInfo.build_in` is for workflows, which hold a
context (the training-set size, the number of steps, the model, ...) that only some learners take:
it passes each context entry only to the learners listed as taking it (:attr:`LearnerInfo.context`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["CONTEXT", "LEARNERS", "LearnerInfo", "get_learner", "learner_names"]

#: the workflow context a learner may take (see :meth:`LearnerInfo.build_in`)
CONTEXT = ("ess", "model", "total_steps", "anchor_period", "megabatch_size", "alpha")


@dataclass(frozen=True)
class LearnerInfo:
    """One learner: its name, how to build it, its posterior family and what it supports."""

    name: str  #: the registry (and config) name, e.g. ``"ivon-poco"``
    builder: Callable[..., Any] = field(repr=False)  #: ``builder(params, **options)``
    family: str  #: ``"diagonal"``, ``"isotropic"``, ``"full"`` or ``"none"`` (a point estimate)
    cls_name: str  #: the class (or factory) the builder calls, e.g. ``"vbpc.IVONPoCo"``
    needs_closure: bool  #: ``step()`` needs a closure (or samples collected beforehand)
    anchored: bool  #: keeps an anchor: ``refresh(loss_fn, data)`` when ``refresh_due``
    supports_sample: bool  #: has ``.sample(closure)`` (collect samples, then ``step()``)
    supports_param_groups: bool  #: honours per-group hyperparameters
    supports_foreach: bool  #: takes ``foreach=``
    supports_sync: bool  #: takes ``sync=True`` (averages statistics over DDP ranks)
    supports_bf16: bool  #: bf16 parameters (fp32 master state)
    supports_compile: bool  #: works with a ``torch.compile``'d model in the closure
    supports_model_norm: bool  #: takes ``model=``/``norm_update=`` (the BatchNorm policy)
    closure_backward: bool = True  #: the closure calls ``backward`` (False: returns the loss with its graph, VON)
    has_posterior: bool = False  #: has ``.posterior(model)``
    context: tuple[str, ...] = ()  #: the :data:`CONTEXT` entries it takes (see :meth:`build_in`)
    small_options: Mapping[str, Any] = field(default_factory=dict)  #: options for a small test problem
    summary: str = ""

    def build(self, params: Iterable[Any], **options: Any) -> Any:
        """The learner over ``params`` (parameters, groups or ``(name, parameter)`` pairs)."""
        return self.builder(params, **options)

    def build_in(self, params: Iterable[Any], context: Mapping[str, Any], **options: Any) -> Any:
        """Build with the ``context`` entries this learner takes (``None`` values skipped), then
        ``options`` (which win); a context key outside :data:`CONTEXT` is a ``KeyError``."""
        unknown = sorted(set(context) - set(CONTEXT))
        if unknown:
            raise KeyError(f"unknown learner context {unknown}; expected keys of {list(CONTEXT)}")
        kw = {k: v for k, v in context.items() if k in self.context and v is not None}
        kw.update(options)
        return self.build(params, **kw)


def _vbpc() -> Any:
    import vbpc  # at build time: ``vbpc`` imports this package

    return vbpc


def _plain(params: Iterable[Any]) -> list[Any]:
    """``torch.optim`` takes parameters or groups, not ``(name, parameter)`` pairs."""
    out = []
    for p in params:
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            out.append(p[1])
        else:
            out.append(p)
    return out


def _adamw(params: Iterable[Any], **kw: Any) -> Any:
    import torch

    return torch.optim.AdamW(_plain(params), **kw)


def _sgd(params: Iterable[Any], **kw: Any) -> Any:
    import torch

    return torch.optim.SGD(_plain(params), **kw)


def _cls(name: str) -> Callable[..., Any]:
    def build(params: Iterable[Any], **kw: Any) -> Any:
        return getattr(_vbpc(), name)(params, **kw)
    build.__name__ = f"build_{name}"
    return build


def _continual(params: Iterable[Any], prior: Optional[Any] = None, **kw: Any) -> Any:
    """:class:`vbpc.ContinualIVON`; without ``prior``, the prior is IVON's initial posterior at the
    parameters' current values (precision ``ess * (hess_init + weight_decay)``)."""
    vb = _vbpc()
    params = list(params)
    if prior is None:
        ivon_kw = {k: kw[k] for k in ("lr", "ess", "hess_init", "weight_decay") if k in kw}
        prior = vb.IVON(params, **ivon_kw).posterior(kw.get("model"))  # named like the model, when given
        prior = vb.DiagonalGaussian.from_state_dict(prior.state_dict())  # a frozen copy
    return vb.ContinualIVON(params, prior=prior, **kw)


_IVON_CTX = ("ess", "model")
_POCO_CTX = ("ess", "model", "total_steps", "anchor_period", "megabatch_size", "alpha")
_SMALL_IVON = {"lr": 0.05, "ess": 100.0, "hess_init": 1.0, "beta2": 0.999}

LEARNERS: dict[str, LearnerInfo] = {info.name: info for info in (
    LearnerInfo("ivon", _cls("IVON"), "diagonal", "vbpc.IVON", needs_closure=False, anchored=False,
                supports_sample=False, supports_param_groups=True, supports_foreach=True, supports_sync=True,
                supports_bf16=True, supports_compile=True, supports_model_norm=True, has_posterior=True,
                context=_IVON_CTX, small_options=dict(_SMALL_IVON),
                summary="IVON (diagonal Gaussian, natural-gradient variational learning)"),
    LearnerInfo("ivon-poco", _cls("IVONPoCo"), "diagonal", "vbpc.IVONPoCo", needs_closure=True, anchored=True,
                supports_sample=True, supports_param_groups=True, supports_foreach=True, supports_sync=True,
                supports_bf16=True, supports_compile=True, supports_model_norm=True, has_posterior=True,
                context=_POCO_CTX, small_options={**_SMALL_IVON, "alpha": 0.5, "anchor_period": 5},
                summary="IVON with posterior correction against an anchor (eq. 22)"),
    LearnerInfo("ivon-pocomo", _cls("IVONPoCoMo"), "diagonal", "vbpc.IVONPoCoMo", needs_closure=True,
                anchored=True, supports_sample=True, supports_param_groups=True, supports_foreach=True,
                supports_sync=True, supports_bf16=True, supports_compile=True, supports_model_norm=True,
                has_posterior=True, context=_POCO_CTX,
                small_options={**_SMALL_IVON, "alpha": 0.5, "anchor_period": 5},
                summary="IVON-PoCo with momentum (beta1 > 0)"),
    LearnerInfo("continual-ivon", _continual, "diagonal", "vbpc.ContinualIVON", needs_closure=True, anchored=False,
                supports_sample=False, supports_param_groups=True, supports_foreach=True, supports_sync=True,
                supports_bf16=True, supports_compile=True, supports_model_norm=True, has_posterior=True,
                context=_IVON_CTX, small_options=dict(_SMALL_IVON),
                summary="IVON with an old posterior as the prior (eq. 29; prior= defaults to the initial one)"),
    LearnerInfo("vsgd", _cls("VSGD"), "isotropic", "vbpc.VSGD", needs_closure=True, anchored=False,
                supports_sample=False, supports_param_groups=True, supports_foreach=False, supports_sync=True,
                supports_bf16=False, supports_compile=True, supports_model_norm=True,
                small_options={"lr": 0.05, "sigma": 0.01},
                summary="variational SGD over an isotropic Gaussian with fixed sigma"),
    LearnerInfo("vsgd-poco", _cls("VSGDPoCo"), "isotropic", "vbpc.VSGDPoCo", needs_closure=True, anchored=True,
                supports_sample=False, supports_param_groups=True, supports_foreach=False, supports_sync=True,
                supports_bf16=False, supports_compile=True, supports_model_norm=True,
                context=("model", "total_steps", "anchor_period", "megabatch_size", "alpha"),
                small_options={"lr": 0.05, "sigma": 0.01, "alpha": 0.5, "anchor_period": 5},
                summary="VSGD with posterior correction (eq. 20)"),
    LearnerInfo("svrg", _cls("SVRG"), "none", "vbpc.SVRG", needs_closure=True, anchored=True,
                supports_sample=False, supports_param_groups=True, supports_foreach=False, supports_sync=True,
                supports_bf16=False, supports_compile=True, supports_model_norm=True,
                context=("model", "total_steps", "anchor_period", "megabatch_size"),
                small_options={"lr": 0.05, "anchor_period": 5},
                summary="SVRG (VSGD-PoCo with sigma = 0, alpha = 1)"),
    LearnerInfo("alpha-svrg", _cls("AlphaSVRG"), "none", "vbpc.AlphaSVRG", needs_closure=True, anchored=True,
                supports_sample=False, supports_param_groups=True, supports_foreach=False, supports_sync=True,
                supports_bf16=False, supports_compile=True, supports_model_norm=True, context=_POCO_CTX[1:],
                small_options={"lr": 0.05, "anchor_period": 5, "total_steps": 20},
                summary="alpha-SVRG (an SGD base, alpha decaying linearly)"),
    LearnerInfo("von", _cls("VON"), "full", "vbpc.VON", needs_closure=True, anchored=False, supports_sample=False,
                supports_param_groups=False, supports_foreach=False, supports_sync=True, supports_bf16=False,
                supports_compile=False, supports_model_norm=True, closure_backward=False, has_posterior=True,
                context=_IVON_CTX, small_options={"lr": 0.5, "ess": 100.0},
                summary="VON over a full Gaussian (dense precision; small models)"),
    LearnerInfo("von-poco", _cls("VONPoCo"), "full", "vbpc.VONPoCo", needs_closure=True, anchored=True,
                supports_sample=False, supports_param_groups=False, supports_foreach=False, supports_sync=True,
                supports_bf16=False, supports_compile=False, supports_model_norm=True, closure_backward=False,
                has_posterior=True, context=_POCO_CTX[:5] + ("alpha",),
                small_options={"lr": 0.5, "ess": 100.0, "alpha": 0.5, "anchor_period": 5},
                summary="VON with posterior correction (section 7)"),
    LearnerInfo("adamw", _adamw, "none", "torch.optim.AdamW", needs_closure=False, anchored=False,
                supports_sample=False, supports_param_groups=True, supports_foreach=True, supports_sync=False,
                supports_bf16=False, supports_compile=True, supports_model_norm=False,
                small_options={"lr": 0.01}, summary="AdamW baseline (point estimate)"),
    LearnerInfo("sgd", _sgd, "none", "torch.optim.SGD", needs_closure=False, anchored=False, supports_sample=False,
                supports_param_groups=True, supports_foreach=True, supports_sync=False, supports_bf16=False,
                supports_compile=True, supports_model_norm=False, small_options={"lr": 0.05, "momentum": 0.9},
                summary="SGD baseline (point estimate)"),
)}


def learner_names() -> tuple[str, ...]:
    """The registered names, in registry order."""
    return tuple(LEARNERS)


def get_learner(name: str) -> LearnerInfo:
    """The :class:`LearnerInfo` of ``name`` (the registry name, or the class name such as ``"IVONPoCo"``);
    an unknown name is a ``KeyError`` listing the known ones."""
    if isinstance(name, str):
        if name in LEARNERS:
            return LEARNERS[name]
        for info in LEARNERS.values():
            if info.cls_name.rsplit(".", 1)[-1].lower() == name.lower():
                return info
    near = difflib.get_close_matches(str(name), list(LEARNERS), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise KeyError(f"unknown learner {name!r}{hint}; known learners: {', '.join(LEARNERS)}")
