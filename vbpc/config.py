"""Typed run configurations: YAML files plus ``--set key=value`` overrides, validated strictly.

Every ``vbpc`` command that takes a config (``train``, ``continual``, ``merge-eval``, ``finetune``,
``cnn``, ``gpt``) reads it here: a dataclass per command, filled from a YAML file (or the defaults)
and ``--set`` overrides, which are parsed by the same YAML reader and the same checks as the file.

* An unknown key is an error naming the key, the nearest valid one and every valid key of its section.
* A value of the wrong type (``batch_size: "128"``, ``progress: yes``, ``lr: true``) or out of its
  range (a zero batch size, an infinite learning rate, a data root that does not exist) is an error
  naming the key, what it expects and the value.  Nothing is coerced except an integer where a float
  is expected.
* YAML is read strictly (YAML 1.2 scalars): a key given twice is an error naming the key and both
  lines, ``1e-3`` is a number (PyYAML's YAML 1.1 resolver reads it as a string) and only
  ``true``/``false`` are booleans (YAML 1.1 also reads ``yes``/``no``/``on``/``off``).  Paths expand ``~``.

A range check is declared next to its field (``setting(128, check=positive)``) or, for the
configs defined here, in :func:`_checks`.

**Why a hand-written parser and not jsonargparse or OmegaConf.**  Both were tried on these
dataclasses (jsonargparse 4.53, OmegaConf 2.4): both silently coerce ``batch_size: "128"`` to 128
and ``progress: "yes"`` to ``True``, jsonargparse accepts a duplicate key (the last one wins), and
neither lists the valid keys of a section or checks ranges, so the range checks (half of this module)
would be needed anyway, on top of a new runtime dependency.  The parser proper (YAML reader, type
check, unknown keys, overrides) is about 150 lines, stricter than either library, and the fuzz tests
(``tests/test_config_fuzz.py``) hold it to "loads within range, or a ConfigError".

``TrainConfig`` is what ``vbpc train`` runs (``vbpc/configs/fmnist_ivon.yaml`` is its default)::

    cfg = load_config("examples/configs/fmnist_ivon.yaml", ["learner.lr=0.3", "schedule.epochs=1"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

__all__ = ["ConfigError", "TrainConfig", "ContinualConfig", "TasksConfig", "MergeConfig", "from_dict", "load_config",
           "to_dict", "read_yaml_file", "safe_load_yaml", "setting", "config_help", "all_keys", "positive", "nonneg",
           "unit", "path", "existing_dir", "one_of", "each", "seed", "nonempty", "train_learners"]

PathLike = Union[str, "os.PathLike[str]"]


class ConfigError(ValueError):
    """A configuration that names an unknown key or holds a value of the wrong type or range."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``1e-3``/``1E5`` as floats and only
    ``true``/``false`` as booleans (YAML 1.2)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: let PyYAML report it
                dup = False
            if dup:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key {key!r} (line {line}; first at line {seen[key]})")
            try:
                seen[key] = key_node.start_mark.line + 1
            except TypeError:
                pass
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
# YAML 1.2 booleans: only true/false (YAML 1.1 also reads yes/no/on/off, e.g. the country code NO, as booleans)
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _StrictLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def safe_load_yaml(text: Any) -> Any:
    """Parse YAML text (or a stream) safely and strictly: no Python tags, no duplicate keys, and
    ``1e-3`` read as a number.  Syntax errors become :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {' '.join(str(exc).split())}") from None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            check: Optional[Any] = None, help: str = "") -> Any:  # noqa: A002
    """A config field with its range ``check`` (``check(value, key) -> value``) and ``help`` text
    (shown by :func:`config_help`), e.g. ``batch_size: int = setting(32, check=positive)``."""
    meta = {"check": check, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = setting("mlp", help="a vbpc.models.build_model name")
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = setting("fashion_mnist", help="a vbpc.data.load_dataset name (train split for training)")
    batch_size: int = 128
    train_size: Optional[int] = setting(None, help="first N training examples (None: all)")
    test_batch_size: int = 1000
    root: Optional[str] = None


@dataclass
class LearnerConfig:
    name: str = setting("ivon", help="a vbpc.inference.registry learner (ivon, ivon-poco, adamw, ...) or bbb")
    lr: float = 0.1
    weight_decay: float = 1e-4
    kwargs: dict[str, Any] = setting(default_factory=dict, help="further constructor arguments")


@dataclass
class ScheduleConfig:
    epochs: int = 2
    scheduler: str = setting("cosine", help="cosine or constant")
    warmup_steps: int = 0


@dataclass
class AnchorConfig:
    period: Optional[int] = setting(None, help="steps between refreshes (None: one epoch)")
    megabatch_size: Optional[int] = setting(None, help="examples per refresh (None: the whole training set)")
    alpha: float = 1.0


@dataclass
class EvalConfig:
    test_samples: int = setting(16, help="posterior samples for the BMA of the final evaluation")
    ood: Optional[str] = None
    every_epoch: bool = setting(True, help="log test accuracy/NLL at the mean weights after every epoch")


@dataclass
class RunConfig:
    seed: int = 0
    out: str = "runs/vbpc"
    checkpoint_every: int = setting(200, help="steps between checkpoints (and at every epoch end)")
    log_every: int = 20
    progress: bool = True
    max_steps: Optional[int] = setting(None, help="stop early (e.g. to test resuming)")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _mlp256() -> ModelConfig:
    return ModelConfig("mlp", {"hidden": [256, 256]})


def _fmnist_ivon() -> LearnerConfig:
    return LearnerConfig("ivon", 0.5, 1e-4, {"hess_init": 0.5, "beta2": 0.999})


@dataclass
class TasksConfig:
    scenario: str = setting("split", help="split (two-class tasks, the head masked to the task's classes) or permuted")
    n_tasks: int = 5
    train_size: Optional[int] = setting(None, help="first N training examples of each task (None: all)")
    test_size: Optional[int] = setting(None, help="first N test examples of each task (None: all)")
    batch_size: int = 128
    epochs: int = setting(1, help="epochs per task")
    memory_per_task: int = setting(200, help="replay-memory examples kept from each old task (method poco)")
    memory_batch_size: int = 128
    memory_weight: Optional[float] = setting(None, help="N_old of eq. (29) for method poco (None: the old tasks' "
                                             "sizes, unbiased)")
    tempered_weight: float = setting(2000.0, help="N_old of eq. (29) for method poco-tempered (a tempered memory "
                                     "weight, reported next to the unbiased poco)")
    old_posterior: str = setting("curvature", help="the old posterior of poco/poco-tempered at the end of a task: "
                                 "curvature (a curvature pass at the final mean), converge (more IVON epochs until h "
                                 "converged) or ivon (IVON's posterior as it is)")
    old_mean: str = setting("newton", help="the old posterior's mean as the next prior of poco (unbiased N_old, no "
                            "memory_weight) with old_posterior=curvature: newton (the fixed point (29) assumes, "
                            "m_old - r/p_old with r the learner's gradient at m_old) or final (m_old as it is)")
    old_posterior_mc: int = setting(1, help="antithetic draws of the end-of-task curvature pass (methods laplace, "
                                    "poco with old_posterior=curvature)")
    converge_tol: float = setting(0.01, help="old_posterior=converge: stop when ||h_after - h_before|| / ||h_before|| "
                                  "over an epoch is below this")
    converge_max_epochs: int = setting(10, help="old_posterior=converge: at most this many extra epochs")
    clamp_memory_curvature: bool = setting(False, help="clamp (N_old/λ) h̄_M(q_old) to [0, δ_v − δ] "
                                           "(set_memory_curvature; needed only for old_posterior=ivon)")
    memory_curvature_every: Optional[int] = setting(40, help="old_posterior=ivon: re-draw the memory's Price "
                                                    "curvature h̄_M(q_old) every k steps (running mean; None: once "
                                                    "per task)")
    ess: str = setting("task", help="λ of task t: 'task' (N_new; the memory weighs N_old/N_new) or 'all' "
                       "(every example seen)")
    memory_curvature_mc: int = setting(4, help="antithetic draws for the memory's Hessian under q_old "
                                       "(set_memory_curvature)")
    root: Optional[str] = setting(None, help="Fashion-MNIST directory (None: the Debian package)")


@dataclass
class ContinualConfig:
    """``vbpc continual``: methods x seeds over a task sequence (docs/algorithms.md §8, eq. 29)."""

    model: ModelConfig = field(default_factory=_mlp256)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    learner: LearnerConfig = field(default_factory=_fmnist_ivon)
    methods: list[str] = setting(default_factory=lambda: ["naive", "vcl", "poco"],
                                 help="naive, vcl, laplace, poco, poco-tempered, adamw")
    adamw_lr: float = setting(1e-3, help="learning rate of the adamw (naive finetuning) baseline")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    test_samples: int = setting(8, help="posterior samples of the BMA evaluation (0: mean weights)")
    out: str = "runs/continual"
    progress: bool = True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, getattr(types, "UnionType", Union)):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is too large for a float") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


# ------------------------------------------------------------------------------------- value ranges
Check = Any  # (value, key) -> value (possibly normalised); raises ConfigError


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def positive(value: Any, key: str) -> Any:
    if value is not None and not (value > 0 and _finite(value)):
        raise ConfigError(f"{key} must be > 0{' and finite' if isinstance(value, float) else ''}, got {value!r}")
    return value


def nonneg(value: Any, key: str) -> Any:
    if value is not None and not (value >= 0 and _finite(value)):
        raise ConfigError(f"{key} must be >= 0{' and finite' if isinstance(value, float) else ''}, got {value!r}")
    return value


def unit(value: Any, key: str) -> Any:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1], got {value!r}")
    return value


def path(value: Any, key: str) -> Any:
    """``~`` expanded (``run.out=~/x`` means the home directory, not a folder named ``~``)."""
    return None if value is None else os.path.expanduser(value)


def existing_dir(value: Any, key: str) -> Any:
    value = path(value, key)
    if value is not None and not os.path.isdir(value):
        raise ConfigError(f"{key}: directory {value!r} does not exist (omit it to use the installed data)")
    return value


def one_of(*choices: str) -> Check:
    def check(value: Any, key: str) -> Any:
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}{hint}")
        return value
    return check


def each(check: Check) -> Check:
    def each(value: Any, key: str) -> Any:
        if not value:
            raise ConfigError(f"{key} must not be empty")
        if len(set(map(repr, value))) != len(value):
            raise ConfigError(f"{key} lists a value twice: {value!r}")
        return [check(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return each


def seed(value: Any, key: str) -> Any:
    if not 0 <= value < 2**32:
        raise ConfigError(f"{key} must be in [0, 2**32) (NumPy's seed range), got {value!r}")
    return value


def train_learners() -> tuple[str, ...]:
    """The learners ``vbpc train`` builds: the registry's (:mod:`vbpc.inference.registry`) and ``bbb``
    (Bayes-by-backprop through Pyro SVI)."""
    from .inference.registry import learner_names

    return (*learner_names(), "bbb")


def _checks() -> dict[Any, dict[str, Check]]:
    """Per config class: field -> range check (applied to given values and to defaults alike)."""
    return {
        ModelConfig: {"name": nonempty},
        DataConfig: {"name": nonempty, "batch_size": positive, "train_size": positive,
                     "test_batch_size": positive, "root": existing_dir},
        LearnerConfig: {"lr": positive, "weight_decay": nonneg},
        ScheduleConfig: {"epochs": positive, "scheduler": one_of("cosine", "constant"), "warmup_steps": nonneg},
        AnchorConfig: {"period": positive, "megabatch_size": positive, "alpha": unit},
        EvalConfig: {"test_samples": nonneg},
        RunConfig: {"seed": seed, "out": path, "checkpoint_every": positive, "log_every": positive,
                    "max_steps": positive},
        TrainConfig: {},
        TasksConfig: {"scenario": one_of("split", "permuted"), "n_tasks": positive, "train_size": positive,
                      "test_size": positive, "batch_size": positive, "epochs": positive,
                      "memory_per_task": nonneg, "memory_batch_size": positive, "memory_weight": positive,
                      "ess": one_of("task", "all"), "memory_curvature_mc": positive, "root": existing_dir,
                      "tempered_weight": positive, "old_posterior": one_of("curvature", "converge", "ivon"),
                      "old_mean": one_of("newton", "final"),
                      "old_posterior_mc": positive, "converge_tol": positive, "converge_max_epochs": positive,
                      "memory_curvature_every": positive},
        ContinualConfig: {"methods": each(one_of("naive", "vcl", "laplace", "poco", "poco-tempered", "adamw")),
                          "adamw_lr": positive,
                          "seeds": each(seed), "test_samples": nonneg, "out": path},
        MergeConfig: {"base_size": positive, "base_epochs": positive, "seeds": each(seed), "out": path},
    }


def nonempty(value: Any, key: str) -> Any:
    if not value.strip():
        raise ConfigError(f"{key} must not be empty")
    return value


def _fields(cls: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls: Any, prefix: str = "") -> list[str]:
    """Every key of config class ``cls``, dotted (``learner.lr``), sections included."""
    out = []
    for name, tp in _fields(cls).items():
        key = f"{prefix}{name}"
        out.append(key)
        if dataclasses.is_dataclass(tp):
            out += all_keys(tp, key + ".")
    return out


_all_keys = all_keys


def config_help(cls: Any) -> str:
    """One line per leaf key of ``cls``: ``key (type, default): help``, for a command's ``--help``."""
    lines = []

    def walk(c: Any, prefix: str) -> None:
        inst = c()
        for f in dataclasses.fields(c):
            tp = _fields(c)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            doc = f.metadata.get("help", "") if f.metadata else ""
            lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {getattr(inst, f.name)!r})"
                         + (f": {doc}" if doc else ""))

    walk(cls, "")
    return "\n".join(lines)


def from_dict(data: Optional[dict[str, Any]], cls: Any = TrainConfig, prefix: str = "", root: Any = None) -> Any:
    """Build ``cls`` from nested dicts, validating every key and type (``root``: the top-level
    config class, whose keys the nearest-key suggestion searches)."""
    root = cls if root is None else root
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(full, all_keys(root), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            valid = ", ".join(f"{prefix}{k}" for k in fields)
            raise ConfigError(f"unknown config key {full!r}{hint} (valid keys: {valid})")
        tp = fields[key]
        kwargs[key] = (from_dict(value, tp, full + ".", root) if dataclasses.is_dataclass(tp)
                       else _coerce(value, tp, full))
    cfg = cls(**kwargs)
    checks = {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if f.metadata.get("check")}
    checks.update(_checks().get(cls, {}))
    for name, check in checks.items():
        setattr(cfg, name, check(getattr(cfg, name), f"{prefix}{name}"))
    post = getattr(cls, "__config_check__", None)
    if post is not None:
        post(cfg)
    if cls is TrainConfig:
        _check_train(cfg)
    return cfg


def _check_train(cfg: TrainConfig) -> None:
    """Cross-field checks of a :class:`TrainConfig`."""
    one_of(*train_learners())(cfg.learner.name, "learner.name")
    if cfg.data.name.partition(":")[0] == "digits":
        raise ConfigError("data.name: 'digits' has a single split of 1,797 images (vbpc's OOD set); training on it "
                          "would test on the training images. Train on fashion_mnist, mnist or cifar10")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def read_yaml_file(path: PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML file; anything else (a directory, a binary file, a list, bad
    YAML) is a :class:`ConfigError` naming the file."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ConfigError(f"config {path!r} is not a file" if os.path.exists(path) else
                          f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"config {path!r} is not a UTF-8 text file (a binary file?)") from None
    if "\x00" in text:
        raise ConfigError(f"config {path!r} is not a text file (it holds NUL bytes)")
    try:
        tree = safe_load_yaml(text) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the config must be a mapping at the top level, got {type(tree).__name__}")
    return tree


def load_config(path: Optional[PathLike] = None, overrides: Optional[list[str]] = None, cls: Any = None) -> Any:
    """Read a YAML config (or start from the defaults) and apply ``key=value`` overrides (values are
    parsed as YAML: ``learner.lr=0.3``, ``model.kwargs={hidden: [64]}``, ``eval.ood=null``).

    ``cls`` is the config class (default :class:`TrainConfig`; the ``continual`` and ``finetune``
    commands pass theirs)."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml_file(path)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set(tree, key.strip(), safe_load_yaml(raw))
    return from_dict(tree, TrainConfig if cls is None else cls)


@dataclass
class MergeConfig:
    """``vbpc merge-eval``: finetune one posterior per task from a common base, merge (eq. 31)."""

    model: ModelConfig = field(default_factory=_mlp256)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    learner: LearnerConfig = field(default_factory=_fmnist_ivon)
    base_size: int = setting(10000, help="examples of the base (all classes, the first task's pixels) posterior")
    base_epochs: int = 1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/merge"
    progress: bool = True
