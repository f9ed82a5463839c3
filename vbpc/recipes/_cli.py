"""What every recipe's command line shares: the parser and the common options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Callable, Optional

__all__ = ["add_common_arguments", "parse_recipe_args"]


def add_common_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--seed``, ``--threads`` and ``--no-progress``."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    return p


def parse_recipe_args(doc: Optional[str], add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
                      argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the recipe's ``add_arguments``; the description is the docstring's first paragraph."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_arguments(p).parse_args(argv)
