"""Integrations with other libraries' training loops, each imported on demand (``import vbpc`` loads none):

* :mod:`vbpc.integrations.lightning` -- :class:`~vbpc.integrations.lightning.VBCallback` for PyTorch Lightning;
* :mod:`vbpc.integrations.hf` -- :class:`~vbpc.integrations.hf.VBTrainer`, a ``transformers.Trainer``;
* :mod:`vbpc.integrations.accelerate` -- :func:`~vbpc.integrations.accelerate.sample` for ``accelerate``'s
  gradient accumulation.

See ``docs/integrations.md``.
"""
