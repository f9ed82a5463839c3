r"""The posterior interface: :class:`GaussianPosterior` (what every family shares), named entries, and the
in-place sampling context :func:`perturbation`, which writes :math:`\theta=m+\sigma\odot z` into the live
parameters and restores them bit for bit on exit, also when the body raises (docs/algorithms.md §2.2 fix 2,
oracle §10.5).  The package docstring (:mod:`vbpc.posterior`) states the diagonal family's parametrisation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar, Union

import torch
from torch import Tensor, nn

from .._dtensor import any_dtensor, locals_
from ..errors import SamplingError, StateDictMismatchError

_P = TypeVar("_P", bound="GaussianPosterior")

__all__ = ["GaussianPosterior", "Entry", "MeanEntry", "perturbation", "state_dtype", "cholesky", "check_mean_state",
           "check_same_layout", "BAYES_PRECISION_SUFFIX"]

#: Bayesian layers (``vbpc.nn``) store the precision of parameter ``w`` in buffer ``w_precision``.
BAYES_PRECISION_SUFFIX = "_precision"

# Tensors currently holding a weight sample, with the owner that perturbed them.  Guards
# against nested or overlapping sampling contexts, which would restore the wrong values.
_PERTURBED: dict[int, str] = {}


@contextlib.contextmanager
def perturbation(
    targets: list[Tensor],
    names: Union[list[str], Callable[[], list[str]]],
    owner: str,
    write: Callable[[], None],
    saved: Optional[list[Tensor]] = None,
) -> Iterator[list[Tensor]]:
    """Save ``targets``, call ``write()`` to load a weight sample into them in place, and
    restore the saved values bitwise on exit, also when the body raises.

    ``saved`` are optional preallocated buffers (reused across steps by the learners).
    Raises :class:`SamplingError` if a target already holds a sample (nested contexts).
    Yields the saved originals.
    """
    for i, t in enumerate(targets):
        if id(t) in _PERTURBED:
            name = (names() if callable(names) else names)[i]
            raise SamplingError(
                f"{owner}: parameter {name!r} already holds a weight sample from {_PERTURBED[id(t)]}; "
                "sampling contexts cannot be nested"
            )
    with torch.no_grad():
        if saved is None:
            saved = [t.detach().clone() for t in targets]
        else:
            _copy_(saved, targets)
        for t in targets:
            _PERTURBED[id(t)] = owner
    try:
        with torch.no_grad():
            write()
        yield saved
    finally:
        with torch.no_grad():
            _copy_(targets, saved)
        for t in targets:
            _PERTURBED.pop(id(t), None)


def _copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    if any_dtensor(dst) or any_dtensor(src):  # sharded (FSDP2) parameters: copy the local shards
        dst, src = locals_(dst), locals_(src)
    if all(d.dtype == s.dtype and d.device == s.device for d, s in zip(dst, src)):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


@dataclass
class Entry:
    """One parameter tensor of a diagonal posterior (tensors are shared, never copied)."""

    name: str
    mean: Tensor
    hess: Tensor
    ess: float
    weight_decay: float
    target: Optional[Tensor] = None  # live module tensor that receives samples

    def precision(self) -> Tensor:
        return self.hess.add(self.weight_decay).mul_(self.ess)


@dataclass
class MeanEntry:
    """One parameter tensor of an isotropic or full posterior: a name, a (shared) mean, a target."""

    name: str
    mean: Tensor
    target: Optional[Tensor] = None


class GaussianPosterior:
    """Interface shared by vbpc's Gaussian families: ``"diagonal"``, ``"isotropic"``, ``"full"``.

    Every family is a Gaussian over named parameter tensors whose means may be shared with a
    module's parameters.  Common to all: :attr:`names`, :attr:`mean`, :meth:`numel`,
    :meth:`bind`, :meth:`sampled`, :meth:`kl`; per family: :meth:`sample`, :meth:`entropy`,
    :meth:`log_prob`, :meth:`state_dict` / :meth:`load_state_dict`.  Densities are float64
    scalars.  :meth:`GaussianPosterior.from_state_dict` rebuilds any family.
    """

    family: str = "abstract"
    _entries: list

    # ------------------------------------------------------------------ common
    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    @property
    def mean(self) -> dict[str, Tensor]:
        return {e.name: e.mean for e in self._entries}

    def numel(self) -> int:
        return sum(e.mean.numel() for e in self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._entries)} tensors, {self.numel()} parameters)"

    def _check_entries(self) -> None:
        if not self._entries:
            raise ValueError(f"a {type(self).__name__} needs at least one parameter tensor")
        names = self.names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate parameter name {dup[0]!r}")

    def bind(self: _P, model: nn.Module) -> _P:
        """Attach the module whose parameters receive samples (matched by name, or by identity
        for entries already bound to one of its parameters).  All-or-nothing on mismatch."""
        params = dict(model.named_parameters(remove_duplicate=False))
        own = {id(p) for p in params.values()}
        targets = []
        for e in self._entries:
            if e.target is not None and id(e.target) in own:
                targets.append(e.target)
                continue
            if e.name not in params:
                raise StateDictMismatchError(f"posterior parameter {e.name!r} is not in {type(model).__name__}")
            if params[e.name].shape != e.mean.shape:
                raise StateDictMismatchError(
                    f"{e.name}: posterior shape {tuple(e.mean.shape)} != model shape {tuple(params[e.name].shape)}"
                )
            targets.append(params[e.name])
        for e, t in zip(self._entries, targets):
            e.target = t
        return self

    @contextlib.contextmanager
    def sampled(self, model: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None,
                theta: Optional[Mapping[str, Tensor]] = None):
        """Load one weight sample into the module; restore the parameters bitwise on exit.

        Yields the sample dictionary: a fresh :meth:`sample` drawn with ``generator``, or the given
        ``theta`` (e.g. a draw made earlier; it must cover every parameter).  Nested or overlapping
        sampling raises :class:`~vbpc.errors.SamplingError`; exceptions in the body still restore.
        """
        if model is not None:
            self.bind(model)
        missing = [e.name for e in self._entries if e.target is None]
        if missing:
            raise SamplingError(f"posterior is not bound to a module (e.g. {missing[0]!r}); pass the model")
        if theta is None:
            theta = self.sample(generator)
        else:
            self._check_theta(theta)
        targets: list[Tensor] = [e.target for e in self._entries]

        def write() -> None:
            _copy_(targets, [theta[e.name].to(t.dtype) for e, t in zip(self._entries, targets)])

        with perturbation(targets, self.names, f"{type(self).__name__}.sampled", write):
            yield theta

    def _check_theta(self, theta: Mapping[str, Tensor]) -> None:
        for e in self._entries:
            if e.name not in theta:
                raise KeyError(f"log_prob: sample has no tensor {e.name!r}")
            if tuple(theta[e.name].shape) != tuple(e.mean.shape):
                raise ValueError(f"log_prob: {e.name} has shape {tuple(theta[e.name].shape)}, "
                                 f"expected {tuple(e.mean.shape)}")

    def _flat(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[e.name].detach().double().reshape(-1).cpu() for e in self._entries])

    def _flat_mean(self) -> Tensor:
        return self._flat(self.mean)

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, off = {}, 0
        for e in self._entries:
            n = e.mean.numel()
            out[e.name] = flat[off:off + n].view(e.mean.shape)
            off += n
        return out

    def _diag_precision(self) -> Tensor:  # pragma: no cover - per family
        raise NotImplementedError

    def _dense_precision(self, max_dim: int) -> Tensor:
        """The sum-scale precision as a (d, d) float64 matrix (for KL across families)."""
        d = self.numel()
        if d > max_dim:
            raise ValueError(f"{type(self).__name__} over {d} parameters is too large for a dense "
                             f"precision (max_dim={max_dim})")
        return torch.diag(self._diag_precision())

    def kl(self, other: GaussianPosterior) -> Tensor:
        r""":math:`\mathrm{KL}(q\|p)` in float64, for any two families over the same tensors.

        Diagonal and isotropic pairs use the elementwise form
        :math:`\tfrac12\sum_j[S^p_j/S^q_j+S^p_j(m^q_j-m^p_j)^2-1+\log(S^q_j/S^p_j)]`; a full
        member on either side makes both dense:
        :math:`\tfrac12[\mathrm{tr}(S_pS_q^{-1})+(m_q-m_p)^\top S_p(m_q-m_p)-d+\log\det S_q-\log\det S_p]`.
        """
        if not isinstance(other, GaussianPosterior):
            raise TypeError(f"KL to {type(other).__name__} is not defined")
        if other.names != self.names:
            raise ValueError("KL needs posteriors over the same parameter names in the same order")
        for a, b in zip(self._entries, other._entries):
            if a.mean.shape != b.mean.shape:
                raise ValueError(f"KL: {a.name} shapes differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
        r = self._flat_mean() - other._flat_mean()
        if "full" in (self.family, other.family):
            max_dim = max(getattr(self, "max_dim", 0), getattr(other, "max_dim", 0))
            sq, sp = self._dense_precision(max_dim), other._dense_precision(max_dim)
            lq, lp = cholesky(sq, "KL"), cholesky(sp, "KL")
            trace = (sp * torch.cholesky_inverse(lq)).sum()
            logdet = 2 * lq.diagonal().log().sum() - 2 * lp.diagonal().log().sum()
            return 0.5 * (trace + r @ sp @ r - r.numel() + logdet)
        sq, sp = self._diag_precision(), other._diag_precision()
        return (0.5 * (sp / sq + sp * r * r - 1.0 + (sq / sp).log())).sum()

    # ------------------------------------------------------------------ per family
    def sample(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def sample_stack(self, n: int, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """``n`` samples stacked sample-first, ``{name: (n, *shape)}`` (for batched BMA, §9).

        The base implementation stacks ``n`` calls of :meth:`sample`; families may draw all ``n``
        at once (same distribution, a different order of the random stream)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        draws = [self.sample(generator) for _ in range(n)]
        return {k: torch.stack([d[k] for d in draws]) for k in self.names}

    def entropy(self) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, theta: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def load_state_dict(self, state: Mapping) -> None:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> GaussianPosterior:
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def from_state_dict(state: Mapping, model: Optional[nn.Module] = None) -> GaussianPosterior:
        """Rebuild a saved posterior of any family; with ``model`` it is bound for :meth:`sampled`."""
        family = state.get("family") if isinstance(state, Mapping) else None
        classes = {getattr(c, "family", None): c for c in GaussianPosterior.__subclasses__()}
        if family not in classes:
            raise StateDictMismatchError(f"unknown posterior family {family!r}; expected one of "
                                         f"{sorted(map(str, classes))}")
        return classes[family]._from_state(state, model)


def state_dtype(dtype: torch.dtype, floor: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype state is kept in: at least ``floor`` (fp32), docs/algorithms.md §2.2 fix 5."""
    return torch.promote_types(dtype, floor)


def cholesky(matrix: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor; a clear error if ``matrix`` is not symmetric positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(f"{what}: the precision matrix is not positive definite (Cholesky failed at "
                         f"column {int(info) - 1})")
    return factor


def check_mean_state(state: Mapping, family: str, keys: tuple[str, ...]) -> None:
    if not isinstance(state, Mapping) or state.get("family") != family:
        fam = state.get("family") if isinstance(state, Mapping) else type(state).__name__
        raise StateDictMismatchError(f"expected a {family}-Gaussian state dict, got family {fam!r}")
    for key in ("names", "mean", *keys):
        if key not in state:
            raise StateDictMismatchError(f"posterior state dict lacks {key!r}")
    for n in state["names"]:
        if n not in state["mean"]:
            raise StateDictMismatchError(f"posterior state dict has no mean for {n!r}")


def check_same_layout(post: GaussianPosterior, state: Mapping) -> None:
    if list(state["names"]) != post.names:
        extra = sorted(set(state["names"]) ^ set(post.names))
        raise StateDictMismatchError(f"posterior names differ (e.g. {extra[:3]}) or are in another order")
    for e in post._entries:
        if tuple(state["mean"][e.name].shape) != tuple(e.mean.shape):
            raise StateDictMismatchError(
                f"{e.name}: saved mean shape {tuple(state['mean'][e.name].shape)} != {tuple(e.mean.shape)}")
