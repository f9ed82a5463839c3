r"""Which gradients belong to a weight sample: the safety net against gradients computed outside it.

A variational learner reads ``p.grad`` at the end of a sample as :math:`\nabla\ell(\theta)` at that
sample's weights :math:`\theta=m+\sigma\odot z`.  Frameworks can put other gradients there:

* Lightning's ``accumulate_grad_batches`` runs the non-final micro-batches outside the optimizer
  closure, at the *mean* weights, and their gradients are summed into the closure's sample;
* ``accelerate``'s ``accumulate()`` skips ``zero_grad`` between micro-batches, so each sample starts
  from the previous micro-batch's gradient (already collected);
* a loop that never clears gradients carries the previous step's into the next sample.

:class:`GradWatch` tells them apart with tensor hooks registered while the sample is loaded.  A
hook fires when a backward pass inside the sample reaches the parameter, *before* autograd adds the
new gradient to ``p.grad``.  If ``p.grad`` is then still the very tensor that was there when the
sample began, unmodified (same object and version counter) and non-zero, the backward is about to
add the sample's gradient to one computed outside it: a *carried* gradient.  A parameter that no
backward inside the sample reached but whose ``p.grad`` is that untouched non-zero tensor holds a
*stale* gradient.  Clearing ``p.grad`` anywhere inside the sample (``zero_grad()`` with
``set_to_none`` either way, as ivon-opt's protocol does) resets both checks, so documented protocols
raise no alarm.  The non-zero test (one device sync per suspect tensor) runs only on suspects.

Sharded (DTensor, FSDP2) parameters receive their gradients from FSDP's reduce-scatter, not from an
autograd hook on the parameter, so they are not watched.  See ``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = ["GradWatch", "FOREIGN_GRADS", "is_placeholder"]

#: values of the learners' ``foreign_grads`` option
FOREIGN_GRADS = ("error", "warn")


class GradWatch:
    """Context manager over ``params`` for one weight sample; :meth:`problem` describes what went wrong.

    ``names`` (or a callable returning them) name the parameters in the message."""

    def __init__(self, params: list[Tensor], names: Union[list[str], Callable[[], list[str]]]):
        self.params = params
        self._names = names
        self._entry: list[tuple[Optional[Tensor], int]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.reached = [False] * len(params)  # a backward pass inside the sample reached the parameter
        self.carried: list[int] = []
        self.stale: list[int] = []

    @staticmethod
    def _untouched(p: Tensor, entry: tuple[Optional[Tensor], int]) -> bool:
        g, version = entry
        return g is not None and p.grad is g and g._version == version and bool(g.ne(0).any())

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:
            if not self.reached[i]:
                self.reached[i] = True
                if self._untouched(self.params[i], self._entry[i]):
                    self.carried.append(i)
        return hook

    def __enter__(self) -> GradWatch:
        self._entry = [(p.grad, p.grad._version if p.grad is not None else -1) for p in self.params]
        try:
            for i, p in enumerate(self.params):
                self._handles.append(p.register_hook(self._hook(i)))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc: object) -> None:
        self._remove()
        if exc[0] is None:
            self.stale = [i for i, p in enumerate(self.params)
                          if not self.reached[i] and self._untouched(p, self._entry[i])]
        self._entry = []

    @property
    def any_backward(self) -> bool:
        """Whether any backward pass inside the sample reached a watched parameter."""
        return any(self.reached)

    def problem(self, who: str) -> Optional[str]:
        """A one-line description of the foreign gradients, or ``None`` when every gradient is the sample's."""
        if not (self.carried or self.stale):
            return None
        names = self._names() if callable(self._names) else self._names
        bad = self.carried or self.stale
        first = names[bad[0]]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        if self.carried:
            what = (f"the backward pass of this weight sample added its gradient to a gradient computed outside "
                    f"the sample: p.grad of {first!r}{more} was already set when the sample began and was not "
                    "cleared inside it")
        else:
            what = (f"p.grad of {first!r}{more} holds a gradient computed outside this weight sample (no backward "
                    "pass inside the sample reached it, and it was not cleared)")
        return (f"{who}: {what}. Usual causes: Lightning's accumulate_grad_batches (its non-final micro-batches run "
                "at the mean weights; add vbpc.integrations.lightning.VBCallback() to the Trainer), accelerate's "
                "accumulate() loop (use sampled_params(train=True, zero_grad=True)), or a loop that never clears "
                "gradients (call zero_grad() inside the sample or before it). foreign_grads='warn' turns this "
                "error into a warning")


def is_placeholder(result: object, watch: Optional[GradWatch], params: list[Tensor],
                   grads_before: list[Optional[Tensor]]) -> bool:
    """Whether a closure was a framework's placeholder (Lightning's ``LightningOptimizer.step()`` under
    manual optimization): it returned ``None``, no backward pass reached ``params`` (``watch``; ``None``
    when unwatched) and no gradient was assigned (``p.grad`` is still the object in ``grads_before``)."""
    return (result is None and not (watch is not None and watch.any_backward)
            and all(p.grad is g for p, g in zip(params, grads_before)))
