r"""Posterior correction as a component (docs/correction.md; docs/algorithms.md §3, §6).

A base learner (:class:`vbpc.IVON`, :class:`vbpc.VSGD`, :class:`vbpc.VON`) takes the correction as an
options object, and holds its runtime state in one place:

* :class:`PoCo`: the options of posterior correction (α and its schedule, anchor period, warm-up,
  mega-batch, anchor noise, proximal term, …), validated once, here, for every learner;
* :class:`ReplayCorrection`: the continual variant, whose anchor is the old posterior
  :math:`q_{old}` and whose statistics come from a replay memory (eq. 29);
* :class:`Correction`: the runtime a corrected learner holds as ``opt.correction``: the
  :class:`~vbpc.inference.poco.Anchor`, the step counter ``t``, the schedule (:math:`\alpha_t`,
  refresh due), the cost counters, the two-pass driver :meth:`Correction.two_pass` (the same batch
  evaluated at the current and the anchor sample from the same global random state, §6.3) and the
  refresh bookkeeping;
* :class:`CorrectedLearner`: the mixin that exposes the runtime on the learner (``opt.anchor``,
  ``opt.counters``, ``opt.t``, ``opt.alpha``, ``opt.refresh_due``, ``opt.refresh(loss_fn, data)``).

The corrected step, per MC sample :math:`s` (eq. 22):

.. math:: \tilde g=(\hat g_{in}-\alpha_t\hat g_{out})+\alpha_t\bar g_{out},\qquad
          \tilde h=(\hat h_{in}-\alpha_t\hat h_{out})+\alpha_t\bar h_{out}

Each learner supplies only what is specific to its family: how the anchor sample is written, which
statistics a pass yields, and how :math:`\tilde g,\tilde h` enter its update.

Usage::

    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=len(train), beta1=0.0,
                    correction=vbpc.PoCo(alpha=0.75, alpha_schedule="linear", total_steps=n, anchor_period=200))
    # the same learner as vbpc.IVONPoCo(model.parameters(), lr=0.1, ess=len(train), alpha=0.75, ...);
    # with IVON's default beta1 = 0.9 it is vbpc.IVONPoCoMo
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar, Union

import torch
from torch import Tensor, nn

from .._runtime import capture_rng, restore_rng
from ..errors import SamplingError
from .poco import ALPHA_SCHEDULES, ANCHOR_NOISE, Anchor, alpha_at

__all__ = ["PoCo", "ReplayCorrection", "Correction", "CorrectedLearner", "add_full_precision_group", "ALPHA_SCHEDULES",
           "ANCHOR_NOISE", "ALPHA_MODES", "ANCHOR_UPDATES"]

#: ``"scheduled"``: one α_t for every tensor (eq. 22); ``"optimal"``: a per-tensor control-variate α
ALPHA_MODES = ("scheduled", "optimal")
#: ``"frozen"``: ḡ_out fixed for the period (eq. 21); ``"running"``: anchor-pass gradients folded in
ANCHOR_UPDATES = ("frozen", "running")

_T = TypeVar("_T")


def _int_or_none(x: Any, low: int) -> bool:
    return x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= low)


@dataclass(frozen=True)
class PoCo:
    r"""Options of posterior correction (docs/algorithms.md §6.2), validated on construction.

    Attributes:
        alpha: :math:`\alpha_0\in[0,1]` (0: the base learner, bit for bit).
        alpha_schedule: ``"constant"`` or ``"linear"`` (:math:`\alpha_k=\mathrm{linspace}(\alpha_0,0,K)[k]`,
            needs ``total_steps``).
        total_steps: the run's length in steps (for the linear schedule).
        anchor_period: T, steps between anchor refreshes (required when α > 0).
        warmup_steps: :math:`t_w`, uncorrected steps before the first refresh.
        megabatch_size: examples per refresh (``None``: the whole iterable given to ``refresh``).
        refresh_mc: draws per mega-batch chunk (diagonal family).
        refresh_antithetic: evaluate each refresh draw as a ±z pair (diagonal family).
        anchor_noise: ``"shared"`` (the anchor sample reuses the current z) or ``"independent"``.
        anchor_seed: seed of the anchor's own generator.
        proximal: add :math:`\alpha(\bar h_{out}-\hat h_{out})\odot(m-m_{out})` to :math:`\tilde g` (eq. 23);
            ``None``: the learner's default (off for IVON and VSGD, on for VON).
        correct_hessian: correct :math:`\hat h` as well as :math:`\hat g` (diagonal family).
        force_anchor_pass: run the anchor pass even at α=0 (tests, diagnostics).
        anchor_device: where the anchor buffers live (e.g. ``"cpu"`` to offload from a GPU).
        track_stats: keep the last step's in/out estimates and corrected statistics (``opt.last_stats``).
        alpha_mode: ``"scheduled"`` or ``"optimal"`` (a per-tensor control-variate α; diagonal family).
        alpha_smoothing: β of the running moments of ``alpha_mode="optimal"``.
        anchor_update: ``"frozen"`` or ``"running"`` (fold anchor-pass gradients into :math:`\bar g_{out}`).
    """

    alpha: float = 1.0
    alpha_schedule: str = "constant"
    total_steps: Optional[int] = None
    anchor_period: Optional[int] = None
    warmup_steps: int = 0
    megabatch_size: Optional[int] = None
    refresh_mc: int = 1
    refresh_antithetic: bool = True
    anchor_noise: str = "shared"
    anchor_seed: int = 0
    proximal: Optional[bool] = None
    correct_hessian: bool = True
    force_anchor_pass: bool = False
    anchor_device: Optional[Union[str, torch.device]] = None
    track_stats: bool = False
    alpha_mode: str = "scheduled"
    alpha_smoothing: float = 0.9
    anchor_update: str = "frozen"

    def __post_init__(self) -> None:
        checks = [
            ("anchor_noise", self.anchor_noise in ANCHOR_NOISE, f": one of {ANCHOR_NOISE}"),
            ("refresh_mc", isinstance(self.refresh_mc, int) and not isinstance(self.refresh_mc, bool)
             and self.refresh_mc >= 1, ": an int >= 1"),
            ("megabatch_size", self.megabatch_size is None or self.megabatch_size >= 1, ""),
            ("alpha_mode", self.alpha_mode in ALPHA_MODES, f": one of {ALPHA_MODES}"),
            ("alpha_smoothing", 0.0 <= self.alpha_smoothing < 1.0, ": must be in [0, 1)"),
            ("anchor_update", self.anchor_update in ANCHOR_UPDATES, f": one of {ANCHOR_UPDATES}"),
            ("alpha", 0.0 <= self.alpha <= 1.0, ""),
            ("alpha_schedule", self.alpha_schedule in ALPHA_SCHEDULES, ""),
            ("warmup_steps", _int_or_none(self.warmup_steps, 0) and self.warmup_steps is not None, ""),
            ("anchor_period", _int_or_none(self.anchor_period, 1), ""),
            ("total_steps", _int_or_none(self.total_steps, 1), ""),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}{rule}")
        if self.alpha > 0 and self.anchor_period is None:
            raise ValueError("alpha > 0 needs anchor_period (steps between anchor refreshes)")
        if self.alpha_schedule == "linear" and self.total_steps is None:
            raise ValueError("alpha_schedule='linear' needs total_steps")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def split(cls, kwargs: dict[str, Any], correction: Optional[PoCo] = None, *,
              defaults: Optional[Mapping[str, Any]] = None) -> tuple[PoCo, dict[str, Any]]:
        """``(options, the other kwargs)``: the correction options given as keyword arguments (the named
        constructors' spelling) are folded into ``correction`` (or a new :class:`PoCo`); giving an
        option both ways is refused."""
        mine = {k: kwargs[k] for k in cls.fields() if k in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in mine}
        if correction is None:
            return cls(**{**(defaults or {}), **mine}), rest
        if not isinstance(correction, PoCo):
            raise TypeError(f"correction must be a vbpc.PoCo, got {type(correction).__name__}")
        if mine:
            raise TypeError(f"correction options given twice: {sorted(mine)} as keywords and correction=PoCo(...); "
                            "put them in the PoCo")
        return correction, rest

    @classmethod
    def take(cls, learner: str, kwargs: dict[str, Any], correction: Optional[PoCo] = None) -> PoCo:
        """:meth:`split` for a learner whose only keyword arguments left are correction options: the
        others are refused, naming them."""
        options, unknown = cls.split(kwargs, correction)
        if unknown:
            raise TypeError(f"{learner}() got unexpected keyword arguments {sorted(unknown)}")
        return options

    def check_supported(self, learner: str, unsupported: Iterable[str]) -> None:
        """Refuse options this learner would ignore (a non-default value of an option it does not implement)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in unsupported:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"{learner} does not implement the correction option {name}="
                                 f"{getattr(self, name)!r}; leave it at its default ({defaults[name]!r})")


@dataclass(frozen=True)
class ReplayCorrection:
    r"""The continual-learning correction (docs/algorithms.md §8, eq. 29): the anchor is the old posterior
    :math:`q_{old}` (α = 1, never refreshed) and the correction term is evaluated on a replay memory
    passed to each ``step(closure, memory=...)``.

    Attributes:
        memory_weight: :math:`N_{old}`, the number of old examples the memory stands for (> 0).
        data_size: :math:`N_{new}` (default: the learner's ``ess``).
        anchor_noise: ``"shared"`` or ``"independent"`` noise at the old posterior's sample.
        track_stats: keep the last step's statistics.
    """

    memory_weight: float
    data_size: Optional[float] = None
    anchor_noise: str = "shared"
    track_stats: bool = False

    def __post_init__(self) -> None:
        if not (self.memory_weight is not None and self.memory_weight > 0):
            raise ValueError("the replay correction needs memory_weight > 0: the number of old examples N_old "
                             "the replay memory stands for (eq. 29)")
        if self.data_size is not None and not (self.data_size >= 0 and math.isfinite(self.data_size)):
            raise ValueError(f"invalid data_size={self.data_size!r}: must be finite and >= 0 (0: no new data)")
        if self.anchor_noise not in ANCHOR_NOISE:
            raise ValueError(f"invalid anchor_noise={self.anchor_noise!r}: one of {ANCHOR_NOISE}")


_COUNTERS = ("inner_passes", "refresh_passes", "inner_examples", "refresh_examples", "clipped_steps")


class Correction:
    """The runtime of posterior correction a learner holds (``opt.correction``): options, anchor, schedule,
    step counter, cost counters and the two-pass driver.

    ``counters``: ``inner_passes``/``refresh_passes`` count forward/backward passes, ``inner_examples``
    and ``refresh_examples`` gradient evaluations (examples × passes; docs/algorithms.md §6.4, eq. 24),
    ``clipped_steps`` the steps a ``clip_grad_norm`` was active."""

    def __init__(self, options: PoCo, params: list[Tensor]):
        self.options = options
        self.anchor = Anchor(params, seed=options.anchor_seed, device=options.anchor_device)
        self.t = 0
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.alpha_now = 0.0  # α_t fixed for the step in progress
        self.anchor_pass = False  # whether the step in progress runs the anchor pass

    # ------------------------------------------------------------------ schedule
    @property
    def n_intervals(self) -> Optional[int]:
        """K, the number of anchor intervals of the run (needs ``total_steps``)."""
        o = self.options
        if o.total_steps is None or o.anchor_period is None:
            return None
        return max(1, math.ceil((o.total_steps - o.warmup_steps) / o.anchor_period))

    @property
    def alpha(self) -> float:
        r""":math:`\alpha_t` for the next step (0 during warm-up and before the first refresh)."""
        o = self.options
        if not self.anchor.ready or self.t < o.warmup_steps or o.alpha == 0.0:
            return 0.0
        return alpha_at(o.alpha, o.alpha_schedule, self.anchor.refreshes - 1, self.n_intervals)

    @property
    def refresh_due(self) -> bool:
        """True at :math:`t=t_w, t_w+T, \\dots` until ``refresh`` has run for this step."""
        o = self.options
        if o.anchor_period is None or self.t < o.warmup_steps or self.anchor.step == self.t:
            return False
        return (self.t - o.warmup_steps) % o.anchor_period == 0

    def check_refresh(self) -> None:
        if self.refresh_due:
            raise SamplingError(f"an anchor refresh is due at step {self.t}: call opt.refresh(loss_fn, data) first")

    def begin_step(self) -> None:
        """Fix α_t and whether the anchor pass runs, once per step."""
        self.check_refresh()
        self.alpha_now = self.alpha
        self.anchor_pass = self.alpha_now != 0.0 or (self.options.force_anchor_pass and self.anchor.ready)

    # ------------------------------------------------------------------ the two passes
    @staticmethod
    def two_pass(current: Callable[[], _T], anchor: Optional[Callable[[], Any]], *,
                 anchor_first: bool = False) -> _T:
        """Evaluate the current pass and the anchor pass from the same global random state (§6.3), and
        leave the random state where the current pass alone would have left it.

        ``anchor_first`` runs the anchor pass first, so that the current pass is the closure's last
        evaluation (frameworks report the last call's outputs).  ``anchor=None``: the current pass only."""
        if anchor is None:
            return current()
        rng0 = capture_rng()
        if anchor_first:
            try:
                anchor()
            finally:
                restore_rng(rng0)
            return current()
        out = current()
        rng1 = capture_rng()
        restore_rng(rng0)
        try:
            anchor()
        finally:
            restore_rng(rng1)
        return out

    # ------------------------------------------------------------------ counters
    def count_step(self, passes: int, batch_size: Optional[int]) -> None:
        """Close a step: add its forward/backward passes (and gradient evaluations) and advance ``t``."""
        self.counters["inner_passes"] += passes
        if batch_size is not None:
            self.counters["inner_examples"] += passes * int(batch_size)
        self.t += 1

    def count_refresh(self, passes: int, examples: int) -> None:
        self.counters["refresh_passes"] += passes
        self.counters["refresh_examples"] += examples

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "counters": dict(self.counters), "anchor": self.anchor.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], *, anchor: bool = True) -> None:
        """Restore ``t``, the counters and (``anchor``) the anchor; validate with :meth:`check_state` first."""
        if anchor:
            self.anchor.load_state_dict(state["anchor"])
        self.t = int(state["t"])
        self.counters = {**dict.fromkeys(_COUNTERS, 0), **state["counters"]}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Validate a saved anchor against the parameters before anything changes."""
        Anchor(self.anchor.params).load_state_dict(state["anchor"])


def add_full_precision_group(opt: Any, param_group: dict[str, Any]) -> None:
    """``torch.optim.Optimizer.add_param_group`` for learners that keep the mean in the parameters themselves
    (no fp32 master copy): bf16/fp16 parameters are refused, checked on the group as torch.optim stored it
    (tensors, also from (name, tensor) pairs), and a refused group is removed again.  Updates below their
    resolution would otherwise be lost silently."""
    torch.optim.Optimizer.add_param_group(opt, param_group)
    low = [p.dtype for p in opt.param_groups[-1]["params"] if p.dtype in (torch.bfloat16, torch.float16)]
    if low:
        opt.param_groups.pop()
        raise TypeError(f"{type(opt).__name__} keeps its mean in the parameters (no fp32 master copy), so {low[0]} "
                        "(bf16/fp16) parameters would silently lose updates below their resolution: use float32 "
                        "parameters (autocast for mixed precision), or vbpc.IVON, which keeps fp32 masters")


class CorrectedLearner:
    """Mixin of the corrected learners: exposes ``opt.correction`` on the learner and implements
    :meth:`refresh` once; a learner supplies ``_refresh_anchor`` (its family's statistics)."""

    correction: Correction

    def _init_correction(self, options: PoCo, params: list[Tensor]) -> None:
        clipped = self.__dict__.pop("_pre_counters", {})  # set by the base learner's constructor
        self.correction = Correction(options, params)
        self.correction.counters.update(clipped)
        self.last_stats: Optional[dict[str, Any]] = None

    @property
    def poco(self) -> PoCo:
        """The correction options."""
        return self.correction.options

    @property
    def anchor(self) -> Anchor:
        return self.correction.anchor

    @property
    def counters(self) -> dict[str, int]:
        return self.correction.counters

    @counters.setter
    def counters(self, value: dict[str, int]) -> None:
        if "correction" not in self.__dict__:  # the base learner's constructor, before the correction exists
            self.__dict__["_pre_counters"] = dict(value)
            return
        self.correction.counters = value

    @property
    def t(self) -> int:
        """Steps taken (the schedule's clock)."""
        return self.correction.t

    @t.setter
    def t(self, value: int) -> None:
        self.correction.t = int(value)

    @property
    def n_intervals(self) -> Optional[int]:
        return self.correction.n_intervals

    @property
    def alpha(self) -> float:
        r""":math:`\alpha_t` for the next step (0 during warm-up and before the first refresh)."""
        return self.correction.alpha

    @property
    def refresh_due(self) -> bool:
        """True at :math:`t=t_w, t_w+T, \\dots` until :meth:`refresh` has run for this step."""
        return self.correction.refresh_due

    def _check_refresh(self) -> None:
        self.correction.check_refresh()

    def _check_can_refresh(self) -> None:
        """Hook: refuse a refresh while the learner is mid-step."""

    def _refresh_anchor(self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, model: Optional[nn.Module],
                        batch_size: Optional[Callable[[Any], int]], progress: bool) -> tuple[int, int]:
        """Compute and publish the family's anchor statistics; returns (passes, gradient evaluations)."""
        raise NotImplementedError

    def refresh(
        self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, model: Optional[nn.Module] = None,
        batch_size: Optional[Callable[[Any], int]] = None, progress: bool = True,
    ) -> None:
        r"""Refresh the anchor at the current posterior (eq. 21): snapshot the mean (and the family's spread)
        and compute the mega-batch statistics :math:`\bar g_{out}` (and :math:`\bar h_{out}`) over ``data``.

        ``loss_fn(batch)`` returns the mean loss of a batch; ``data`` is any iterable of batches (a
        DataLoader over the mega-batch); ``model`` keeps BatchNorm statistics untouched; ``batch_size``
        counts a batch's examples when ``len(batch[0])`` would not.  Nothing changes unless the pass
        completes with finite statistics."""
        self._check_can_refresh()
        norm = getattr(self, "_norm", None)
        model = norm.model if model is None and norm is not None else model
        with torch.no_grad():
            passes, examples = self._refresh_anchor(loss_fn, data, model=model, batch_size=batch_size,
                                                    progress=progress)
        self.correction.count_refresh(passes, examples)
