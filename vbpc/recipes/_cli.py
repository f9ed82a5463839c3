"""What every recipe's command line shares: the parser, the common options and YAML configs.

Every recipe command takes ``--config FILE.yaml`` (keys are the long option names, with ``-`` or
``_``) and repeatable ``--set key=value`` overrides, validated against the parser: an unknown
key names the nearest valid one, a value of the wrong type names the option.  Precedence:
defaults < config file < flags given on the command line < ``--set``.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any, Callable, Optional

from ..config import ConfigError, read_yaml_file, safe_load_yaml

__all__ = ["add_common_arguments", "parse_recipe_args", "apply_config"]


def add_common_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--seed``, ``--threads``, ``--no-progress``, ``--config`` and ``--set``."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML file of option values (keys: the long option names); flags given here win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an option, e.g. --set lr=0.05 (repeatable; wins over everything)")
    return p


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    try:
        if action.nargs in ("+", "*") and isinstance(value, list):
            out = [action.type(v) if action.type else v for v in value]
        else:
            out = action.type(value) if action.type else value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {getattr(action.type, '__name__', 'a value')}, got {value!r}") from None
    values = out if isinstance(out, list) else [out]
    if action.choices is not None and any(v not in action.choices for v in values):
        raise ConfigError(f"{key}: {value!r} is not one of {list(action.choices)}")
    return out


def apply_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fold ``args.config`` (YAML) and ``args.set`` into ``args`` (see the module docstring)."""
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config", "set")}
    updates: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if getattr(args, "config", None):
        layers.append(("config", read_yaml_file(args.config)))
    sets: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        sets[key.strip()] = safe_load_yaml(raw)
    layers.append(("set", sets))
    for where, tree in layers:
        for key, value in tree.items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                near = difflib.get_close_matches(dest, list(actions), n=1, cutoff=0.5)
                hint = f"; did you mean {near[0].replace('_', '-')!r}?" if near else ""
                raise ConfigError(f"unknown option {key!r} in {where}{hint}")
            act = actions[dest]
            if where == "config" and getattr(args, dest) != act.default:
                continue  # given on the command line: the flag wins over the file
            updates[dest] = _convert(act, str(key), value)
    for dest, value in updates.items():
        setattr(args, dest, value)
    return args


def parse_recipe_args(doc: Optional[str], add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
                      argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the recipe's ``add_arguments`` (+ ``--config``/``--set``); the description
    is the docstring's first paragraph."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = add_arguments(p)
    return apply_config(p, p.parse_args(argv))
