"""Workflows run by the ``vbpc`` command: ``train`` (more to come: continual, finetune, merge)."""

from .train import LEARNERS, build_learner, train

__all__ = ["LEARNERS", "build_learner", "train"]
