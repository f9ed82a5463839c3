"""Workflows run by the ``vbpc`` command, each a function of a typed config (:mod:`vbpc.config`):
``train``, ``continual``, ``merging`` (``merge-eval`` and ``merge``), ``finetune``, ``cnn`` and ``gpt``."""

from .train import build_learner, train

__all__ = ["build_learner", "train"]
