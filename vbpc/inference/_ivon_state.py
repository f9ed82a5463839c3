r"""Hyperparameter checks and serialization of :class:`vbpc.IVON` (``state_dict``/``load_state_dict``, a mixin;
docs/training.md)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _dtensor as dt
from .. import _runtime as ranks
from ..errors import NonFiniteError, SamplingError, StateDictMismatchError
from ..functional import (
    check_clip_grad_norm,
)
from ..posterior.base import state_dtype

__all__ = ["IVONBase", "IVONState", "check_hparams", "HESS_APPROX", "GRADSQ_SCALE", "SCALAR_STATE"]

HESS_APPROX = ("price", "gradsq")
GRADSQ_SCALE = ("ess", "none")
_STATE_VERSION = 1
#: per-parameter state entries that are float64 scalars, not parameter-shaped (IVON-PoCo's
#: control-variate moments, ``alpha_mode="optimal"``)
SCALAR_STATE = ("cv_cov", "cv_var")


def check_hparams(h: dict, where: str = "") -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter (NaN fails every check)."""
    at = f" in {where}" if where else ""

    def bad(name: str, rule: str) -> None:
        raise ValueError(f"invalid {name}={h[name]!r}{at}: must be {rule}")

    if not (h["lr"] >= 0.0 and math.isfinite(h["lr"])):
        bad("lr", "finite and >= 0")
    if not (h["ess"] > 0.0 and math.isfinite(h["ess"])):
        bad("ess", "finite and > 0")
    if "mc_samples" in h and not (isinstance(h["mc_samples"], int) and not isinstance(h["mc_samples"], bool)
                                  and h["mc_samples"] >= 1):
        bad("mc_samples", "an int >= 1")
    if not (h["hess_init"] > 0.0 and math.isfinite(h["hess_init"])):
        bad("hess_init", "finite and > 0")
    if not 0.0 <= h["beta1"] <= 1.0:
        bad("beta1", "in [0, 1]")
    if h["beta1"] == 1.0 and h["debias"]:
        bad("beta1", "< 1 when debias=True (1 - beta1**t would be 0)")
    if not 0.0 <= h["beta2"] <= 1.0:
        bad("beta2", "in [0, 1]")
    if not (h["weight_decay"] >= 0.0 and math.isfinite(h["weight_decay"])):
        bad("weight_decay", "finite and >= 0")
    if not h["clip_radius"] > 0.0:
        bad("clip_radius", "> 0")
    if h["hess_approx"] not in HESS_APPROX:
        bad("hess_approx", f"one of {HESS_APPROX}")
    if h["gradsq_scale"] not in GRADSQ_SCALE:
        bad("gradsq_scale", f"one of {GRADSQ_SCALE}")


class IVONBase(Optimizer):
    """What :class:`vbpc.IVON`'s mixins share: the attributes ``IVON.__init__`` sets (declared here for type
    checkers) and the per-parameter state helpers."""

    parity: Optional[str]
    state_dtype: torch.dtype
    mc_samples: int
    sync: bool
    foreach: Optional[bool]
    clip_grad_norm: Optional[float]
    foreign_grads: str
    counters: dict[str, int]
    skipped_samples: int
    _sharded: bool
    _count: int
    _count_out: int
    _active: bool
    _closure_owned: bool
    _clipped: bool
    _acc: dict[int, dict[str, Any]]
    _noise_checked: bool
    _ws: dict[int, dict[str, Any]]

    def _check_positivity(self, gi: int, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError

    def _reset_samples(self) -> None:
        raise NotImplementedError

    def _loc(self, ts: list[Tensor]) -> list[Tensor]:
        """The local shards of DTensors (FSDP2), the tensors themselves otherwise."""
        return dt.locals_(ts) if self._sharded else ts

    def _agree(self, flag: bool, device: torch.device) -> bool:
        """``flag`` and-ed over ranks when the parameters are sharded (each rank sees its shards)."""
        if self._sharded and ranks.active():
            return ranks.all_true(flag, device)
        return flag

    def _sdtype(self, p: Tensor) -> torch.dtype:
        return state_dtype(p.dtype, self.state_dtype)

    def _state(self, p: Tensor, group: dict) -> dict:
        """Per-parameter state, created lazily (so ``add_param_group`` works, fix 7)."""
        st = self.state[p]
        if not st:
            sd = self._sdtype(p)
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["momentum"] = torch.zeros_like(p, dtype=sd, memory_format=torch.contiguous_format)
            st["hess"] = torch.full_like(p, group["hess_init"], dtype=sd, memory_format=torch.contiguous_format)
            if self.parity:
                # The reference adds torch.as_tensor(hess_init), i.e. h0 rounded to the default
                # dtype (float32), even for float64 parameters; reproduced only under parity.
                st["hess"].zero_().add_(torch.as_tensor(group["hess_init"]))
            if p.dtype != sd:
                st["mean"] = p.detach().to(sd, copy=True)
            st["wd_checked"] = float(group["weight_decay"])
        return st

    @staticmethod
    def _trainable(group: dict) -> list[Tensor]:
        return [p for p in group["params"] if p.requires_grad]


class IVONState(IVONBase):
    """Serialization of :class:`vbpc.IVON` (a mixin)."""

    # ------------------------------------------------------------------ serialization
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the transient workspaces (torch.optim keeps only 3 keys, which breaks
        ``copy.deepcopy`` and pickling of the flags); refuses while samples are pending."""
        if self._active or self._count:
            raise SamplingError("cannot copy or pickle IVON while samples are pending: call step() first")
        return {**self.__dict__, "_ws": {}, "_acc": {}}

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state dict plus vbpc's flags; step counters are in each state."""
        if self._active or self._count:
            raise SamplingError("IVON.state_dict() while samples are pending: call step() first "
                                "(a sampled context or collected gradients would be lost)")
        sd = super().state_dict()
        sd["vbpc"] = {"version": _STATE_VERSION, "mc_samples": self.mc_samples, "sync": self.sync,
                      "parity": self.parity, "state_dtype": str(self.state_dtype).replace("torch.", ""),
                      "clip_grad_norm": self.clip_grad_norm, "counters": dict(self.counters)}
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, moving state to each parameter's device but keeping fp32 state.

        Everything is validated first: on any mismatch a
        :class:`~vbpc.errors.StateDictMismatchError` names it and nothing changes.
        """
        if self._active or self._count:
            raise SamplingError("IVON.load_state_dict() while samples are pending")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise StateDictMismatchError(f"optimizer state dict lacks {key!r}")
        saved_groups = state_dict["param_groups"]
        if any(isinstance(sg, dict) and isinstance(sg.get("hess"), Tensor) for sg in saved_groups):
            raise StateDictMismatchError("this is a state dict of the reference IVON (ivon-opt keeps hess and momentum "
                                         "in its param groups); vbpc.IVON's layout differs and cannot load it: "
                                         "train with vbpc.IVON from the start, or copy the tensors by hand")
        if len(saved_groups) != len(self.param_groups):
            raise StateDictMismatchError(f"state dict has {len(saved_groups)} param groups, optimizer has "
                                         f"{len(self.param_groups)}")
        id_map: dict[Any, Tensor] = {}
        new_groups = []
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise StateDictMismatchError(f"param group {gi}: state dict has {len(sg['params'])} parameters, "
                                             f"optimizer has {len(g['params'])}")
            id_map.update(zip(sg["params"], g["params"]))
            ng = {**g, **{k: v for k, v in sg.items() if k != "params"}, "params": g["params"]}
            for k in self.defaults:
                ng.setdefault(k, self.defaults[k])
            check_hparams(ng, f"saved param group {gi}")
            new_groups.append(ng)
        new_state: defaultdict = defaultdict(dict)
        wd_of = {id(q): float(ng["weight_decay"]) for ng in new_groups for q in ng["params"]}
        for idx, st in state_dict["state"].items():
            if idx not in id_map:
                raise StateDictMismatchError(f"state dict has state for unknown parameter index {idx}")
            p = id_map[idx]
            missing = {"step", "momentum", "hess"} - set(st)
            if missing:
                raise StateDictMismatchError(f"state of parameter {idx} lacks {sorted(missing)} (not an IVON state?)")
            out: dict[str, Any] = {}
            for k, v in st.items():
                if isinstance(v, Tensor) and k in SCALAR_STATE:  # per-tensor float64 scalars (IVON-PoCo)
                    if v.dim() != 0:
                        raise StateDictMismatchError(f"state {k!r} of parameter {idx} must be a scalar, "
                                                     f"has shape {tuple(v.shape)}")
                    out[k] = v.to(device=p.device, dtype=torch.float64, copy=True)
                elif isinstance(v, Tensor) and k != "step":
                    if v.shape != p.shape:
                        raise StateDictMismatchError(f"state {k!r} of parameter {idx} has shape {tuple(v.shape)}, "
                                                     f"parameter has {tuple(p.shape)}")
                    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise NonFiniteError(f"state {k!r} of parameter {idx} holds NaN or inf")
                    out[k] = v.to(device=p.device, dtype=self._sdtype(p), copy=True)
                elif k == "step":
                    out[k] = torch.as_tensor(v, dtype=torch.float32).detach().clone().cpu()
                else:
                    out[k] = v
            out.setdefault("wd_checked", -1.0)
            if not bool((out["hess"].double() + wd_of[id(p)] > 0).all()):
                raise StateDictMismatchError(f"state 'hess' of parameter {idx} has entries with h + weight_decay <= 0 "
                                             "(a negative or zero precision): not a valid IVON state")
            new_state[p] = out
        extra = state_dict.get("vbpc", {})
        clip = check_clip_grad_norm(extra.get("clip_grad_norm", self.clip_grad_norm))
        mc = extra.get("mc_samples", new_groups[0]["mc_samples"] if new_groups else 1)
        if not (isinstance(mc, int) and not isinstance(mc, bool) and mc >= 1):
            raise StateDictMismatchError(f"the state dict's mc_samples={mc!r} is not an int >= 1")
        state_dtype: Optional[torch.dtype] = self.state_dtype
        if "state_dtype" in extra:
            state_dtype = getattr(torch, extra["state_dtype"], None) if isinstance(extra["state_dtype"], str) else None
            if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
                raise StateDictMismatchError(f"the state dict's state_dtype={extra['state_dtype']!r} is not a "
                                             "floating torch dtype")
        if self._sharded and (extra.get("sync") or extra.get("parity")):
            raise StateDictMismatchError("the state dict was saved with sync=True or parity=True, which sharded "
                                         "(DTensor, FSDP2) parameters do not support")
        # commit
        self.state = new_state
        self.param_groups = new_groups
        self.mc_samples = mc
        self.sync = bool(extra.get("sync", self.sync))
        self.clip_grad_norm = clip
        self.counters = {**self.counters, **extra.get("counters", {})}
        self.parity = extra.get("parity", self.parity)
        assert state_dtype is not None  # checked above
        self.state_dtype = state_dtype
        self._ws.clear()
        self._reset_samples()
