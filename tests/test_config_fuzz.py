"""Fuzzing the config layer: any YAML value for any key of any config, given in a file or with
``--set``, either loads or raises :class:`~vbpc.config.ConfigError`, never another exception; and a
config that loads is within range (what the workflows then rely on)."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbpc import config
from vbpc.config import ConfigError, ContinualConfig, MergeConfig, TrainConfig, load_config
from vbpc.workflows.cnn import CnnConfig
from vbpc.workflows.finetune import FinetuneConfig
from vbpc.workflows.gpt import GptConfig

CLASSES = (TrainConfig, ContinualConfig, MergeConfig, FinetuneConfig, CnnConfig, GptConfig)
KEYS = {cls: config._all_keys(cls) for cls in CLASSES}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["1e-3", "~/x", "/nonexistent", "digits", "ivon", "split", "cosine", "", "0x10", ".inf"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
raw_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


def _check_loaded(cfg) -> None:
    """What every loaded config guarantees (the range checks held)."""
    if isinstance(cfg, TrainConfig):
        assert cfg.data.batch_size > 0 and cfg.schedule.epochs > 0 and cfg.run.log_every > 0
        assert cfg.run.checkpoint_every > 0 and cfg.eval.test_samples >= 0
        assert math.isfinite(cfg.learner.lr) and cfg.learner.lr > 0 and 0 <= cfg.anchor.alpha <= 1
        assert cfg.data.train_size is None or cfg.data.train_size > 0
        assert not cfg.run.out.startswith("~")
    elif isinstance(cfg, (ContinualConfig, MergeConfig)):
        assert cfg.tasks.batch_size > 0 and cfg.tasks.epochs > 0 and cfg.tasks.n_tasks > 0 and cfg.seeds
        assert not cfg.out.startswith("~")
    else:  # the workflow configs declare their checks with vbpc.config.setting
        assert cfg.batch_size > 0 and isinstance(cfg.progress, bool)
        assert math.isfinite(getattr(cfg, "lr", getattr(cfg, "ivon_lr", 1.0)))
        assert all(isinstance(s, int) and not isinstance(s, bool) for s in getattr(cfg, "seeds", [0]))
        assert cfg.threads is None or cfg.threads > 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cls=st.sampled_from(CLASSES), data=st.data(), value=values)
def test_any_value_for_any_key_loads_or_is_a_config_error(tmp_path_factory, cls, data, value):
    key = data.draw(st.sampled_from(KEYS[cls]))
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    try:
        cfg = load_config(None, [f"{key}={text}"], cls=cls)
    except ConfigError:
        return
    _check_loaded(cfg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(cls=st.sampled_from(CLASSES), text=raw_text)
def test_any_file_text_loads_or_is_a_config_error(tmp_path, cls, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path, cls=cls)
    except ConfigError:
        return
    _check_loaded(cfg)


@settings(max_examples=200, deadline=None)
@given(cls=st.sampled_from(CLASSES), tree=st.dictionaries(st.sampled_from(["model", "data", "learner", "tasks",
                                                                          "run", "seeds", "out", "eval", "x"]),
                                                         values, max_size=4))
def test_any_nested_tree_loads_or_is_a_config_error(cls, tree):
    try:
        cfg = config.from_dict(tree, cls)
    except ConfigError:
        return
    _check_loaded(cfg)


@pytest.mark.parametrize("raw,expected", [("1e-3", 0.001), ("1E5", 100000.0), ("-2.5e+2", -250.0), (".5", 0.5),
                                          ("'1e-3'", "1e-3"), ("1_000", 1000)])
def test_yaml_numbers_read_as_yaml_1_2(raw, expected):
    assert config.safe_load_yaml(f"a: {raw}") == {"a": expected}


NASTY = ["0", "-1", "-1999", str(10**400), "-" + str(10**400), ".nan", ".inf", "-.inf", "1e-3", "''", "'~'", "[]",
         "{}", "null", "true", "[1, 1]", "{a: 1}", "'/nonexistent'", "abc", "2.5"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_key_with_every_nasty_value(cls):
    """The exhaustive sweep behind the random one: every key x every boundary value."""
    outcomes = {"ok": 0, "error": 0}
    for key in KEYS[cls]:
        for raw in NASTY:
            try:
                cfg = load_config(None, [f"{key}={raw}"], cls=cls)
            except ConfigError:
                outcomes["error"] += 1
                continue
            _check_loaded(cfg)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > len(KEYS[cls])  # both outcomes occur


# ------------------------------------------------------------------------------ one system, its rules
def _write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("cls,key", [(TrainConfig, "learner.lr"), (FinetuneConfig, "lr"), (GptConfig, "lr"),
                                     (CnnConfig, "ivon_lr"), (ContinualConfig, "learner.lr")])
def test_1e_minus_3_is_a_float_in_a_file_and_in_set(tmp_path, cls, key):
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: 1e-3\n"
    for cfg in (load_config(_write(tmp_path, text), cls=cls), load_config(None, [f"{key}=1e-3"], cls=cls)):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == 0.001 and type(node) is float


@pytest.mark.parametrize("text,key", [("learner:\n  lr: 0.1\n  lr: 0.2\n", "lr"),
                                      ("run: {seed: 1}\nrun: {seed: 2}\n", "run"),
                                      ("model:\n  kwargs: {hidden: [8], hidden: [4]}\n", "hidden")])
def test_duplicate_keys_are_refused_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"duplicate key '{key}'"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("cls", CLASSES[3:], ids=lambda c: c.__name__)
def test_duplicate_keys_are_refused_by_every_command(tmp_path, cls):
    with pytest.raises(ConfigError, match="duplicate key 'progress'"):
        load_config(_write(tmp_path, "progress: true\nprogress: false\n"), cls=cls)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):  # a --set value is read by the same loader
        load_config(None, ["progress={a: 1, a: 2}"], cls=cls)


def test_unknown_keys_name_the_key_the_nearest_and_every_valid_key(tmp_path):
    for source in ({"path": _write(tmp_path, "learner: {lrr: 0.1}\n")}, {"overrides": ["learner.lrr=0.1"]}):
        with pytest.raises(ConfigError) as e:
            load_config(**source)
        msg = str(e.value)
        assert "unknown config key 'learner.lrr'" in msg and "did you mean 'learner.lr'" in msg
        assert "valid keys: learner.name, learner.lr, learner.weight_decay, learner.kwargs" in msg
    with pytest.raises(ConfigError, match="unknown config key 'epoch'; did you mean 'epochs'.*valid keys: methods, "
                                          "seeds, scope"):
        load_config(_write(tmp_path, "epoch: 2\n"), cls=FinetuneConfig)


@pytest.mark.parametrize("cls,key,raw,expect", [
    (TrainConfig, "data.batch_size", "'128'", "expected an integer"),
    (TrainConfig, "data.batch_size", "1.5", "expected an integer"),
    (TrainConfig, "run.progress", "yes", "expected true/false"),  # YAML 1.1 would read a boolean
    (TrainConfig, "learner.lr", "true", "expected a number"),
    (TrainConfig, "learner.lr", "fast", "expected a number"),
    (FinetuneConfig, "methods", "[sgd]", "must be one of"),
    (FinetuneConfig, "seeds", "[0, 0]", "lists a value twice"),
    (GptConfig, "steps", "0", "must be > 0"),
    (CnnConfig, "model", "vgg", "must be one of"),
    (CnnConfig, "progress", "on", "expected true/false"),
])
def test_types_and_ranges_are_checked_in_files_and_set(tmp_path, cls, key, raw, expect):
    with pytest.raises(ConfigError, match=f"{key}.*{expect}|{expect}"):
        load_config(None, [f"{key}={raw}"], cls=cls)
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {raw}\n"
    with pytest.raises(ConfigError, match=expect):
        load_config(_write(tmp_path, text), cls=cls)


def test_set_wins_over_the_file(tmp_path):
    cfg = load_config(_write(tmp_path, "lr: 0.3\nepochs: 2\n"), ["epochs=3", "seeds=[1, 2]"], cls=FinetuneConfig)
    assert (cfg.lr, cfg.epochs, cfg.seeds) == (0.3, 3, [1, 2])


def test_every_shipped_config_loads():
    from pathlib import Path

    from vbpc.cli import CONFIG_COMMANDS, _load, default_train_config

    root = Path(__file__).resolve().parents[1]
    which = {"fmnist": TrainConfig, "continual": ContinualConfig, "merge": MergeConfig, "finetune": FinetuneConfig}
    for path in sorted((root / "examples" / "configs").glob("*.yaml")):
        cls = next(c for prefix, c in which.items() if path.name.startswith(prefix))
        load_config(path, cls=cls)
    for name, (cls_spec, *_rest) in CONFIG_COMMANDS.items():
        assert config.all_keys(_load(cls_spec)), name
    # the packaged default of `vbpc train` is examples/configs/fmnist_ivon.yaml
    assert default_train_config().is_file()
    assert config.to_dict(load_config(default_train_config())) == config.to_dict(
        load_config(root / "examples" / "configs" / "fmnist_ivon.yaml"))
