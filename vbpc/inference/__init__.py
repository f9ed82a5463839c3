"""Learners and workflows: IVON (and, in later modules, the posterior-corrected learners)."""

from .ivon import IVON

__all__ = ["IVON"]
