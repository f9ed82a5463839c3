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

CLASSES = (TrainConfig, ContinualConfig, MergeConfig)
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
    else:
        assert cfg.tasks.batch_size > 0 and cfg.tasks.epochs > 0 and cfg.tasks.n_tasks > 0 and cfg.seeds
        assert not cfg.out.startswith("~")


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
