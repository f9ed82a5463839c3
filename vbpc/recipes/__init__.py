"""Runnable recipes shared by the ``vbpc`` command and ``examples/``."""
