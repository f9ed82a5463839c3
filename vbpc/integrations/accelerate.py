r"""One weight sample per micro-batch inside ``accelerate``'s gradient accumulation.

``accelerate``'s documented loop (``with accelerator.accumulate(model): ... accelerator.backward(loss);
optimizer.step(); optimizer.zero_grad()``) does two things a variational learner must undo:
``zero_grad`` is a no-op between micro-batches, so each sample would start from the previous
micro-batch's gradient (vbpc refuses that: ``foreign_grads``), and ``accelerator.backward`` divides the
loss by the accumulation count, while the learner averages the micro-batch samples itself.
:func:`sample` does both right::

    from vbpc.integrations.accelerate import sample

    model, opt, loader = accelerator.prepare(model, vbpc.IVON(model.parameters(), ...), loader)
    for x, y in loader:
        with sample(accelerator, model, opt) as backward:
            backward(F.cross_entropy(model(x), y))      # the micro-batch's mean loss, undivided
        opt.step()                                       # accelerate steps at the boundary only
        opt.zero_grad()

The result equals the plain loop bit for bit (one sample per micro-batch; ``tests/test_accumulation.py``).
See ``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from torch import Tensor, nn

from ..inference.ivon import IVON
from ._common import unwrap_learner

__all__ = ["sample"]


@contextmanager
def sample(accelerator: Any, model: nn.Module, optimizer: Any) -> Iterator[Callable[[Tensor], None]]:
    """``accelerator.accumulate(model)`` around one weight sample of ``optimizer`` (a vbpc learner, or
    accelerate's wrapper of one) with ``p.grad`` cleared on entry; yields ``backward(loss)``, which
    calls ``accelerator.backward`` on the loss times the accumulation count (undoing its division)."""
    learner = unwrap_learner(optimizer)
    if not isinstance(learner, IVON):
        raise TypeError(f"vbpc.integrations.accelerate.sample needs a vbpc learner (IVON family), got "
                        f"{type(learner).__name__}")
    k = int(accelerator.gradient_accumulation_steps)

    def backward(loss: Tensor, **kwargs: Any) -> None:
        accelerator.backward(loss * k if k > 1 else loss, **kwargs)

    with accelerator.accumulate(model), learner.sampled_params(train=True, zero_grad=True):
        yield backward
