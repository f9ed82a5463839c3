"""``vbpc continual``: the workflow on tiny real Fashion-MNIST task sequences (the CI versions of
examples/configs/continual_*.yaml)."""

from __future__ import annotations

import json

import pytest
import torch

from vbpc import checkpoint
from vbpc.cli import main
from vbpc.config import ConfigError, ContinualConfig, load_config
from vbpc.workflows.continual import forgetting, make_tasks, run_continual

TINY = ["tasks.train_size=512", "tasks.test_size=200", "tasks.memory_per_task=16", "tasks.memory_batch_size=16",
        "tasks.batch_size=32", "seeds=[0, 1]", "test_samples=2", "progress=false", "model.kwargs={hidden: [32]}"]


def test_forgetting_is_the_mean_drop_from_the_best_earlier_accuracy():
    acc = [[0.9], [0.8, 0.95], [0.85, 0.7, 0.9]]
    # task 1: best earlier 0.9 -> 0.85; task 2: best 0.95 -> 0.7
    assert forgetting(acc) == pytest.approx(((0.9 - 0.85) + (0.95 - 0.7)) / 2)
    assert forgetting(acc[:1]) == 0.0


@pytest.mark.slow
def test_split_tasks_are_the_class_pairs_of_real_fashion_mnist():
    tasks = make_tasks("split", 5, test_size=100)
    assert [t.name for t in tasks] == ["0/1", "2/3", "4/5", "6/7", "8/9"]
    assert sum(len(t) for t in tasks) == 60000
    for t in tasks:
        assert set(t.y.unique().tolist()) == set(t.cols.tolist())
    perm = make_tasks("permuted", 3, train_size=50, seed=0)
    assert torch.equal(perm[0].x, tasks[0].x[:0].new_empty(0)) is False
    # the same images, permuted pixels: identical sorted pixel values per image
    assert torch.equal(perm[1].x.flatten(1).sort(1).values, perm[0].x.flatten(1).sort(1).values)
    assert not torch.equal(perm[1].x, perm[0].x)
    with pytest.raises(ConfigError, match="at most 5"):
        make_tasks("split", 6)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["continual_split", "continual_permuted"])
def test_quick_config_runs_end_to_end(tmp_path, capsys, config):
    n = 3 if config == "continual_split" else 2
    rc = main(["continual", f"examples/configs/{config}.yaml", "--set", f"out={tmp_path}",
               "--set", f"tasks.n_tasks={n}", *sum((["--set", s] for s in TINY), [])])
    assert rc == 0
    out = capsys.readouterr().out
    for meth in ("naive", "vcl", "laplace", "poco", "poco-tempered", "adamw"):
        assert f"| {meth} |" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 2 * n
    # the end-of-task curvature pass ran (laplace, poco); its clamp count is logged
    assert all("old_posterior_clamped" in r for r in rows if r["method"] in ("laplace", "poco", "poco-tempered"))
    for r in rows:
        assert len(r["acc"]) == r["task"] and 0.0 <= r["ece"] <= 1.0
        assert r["avg_acc"] == pytest.approx(sum(r["acc"]) / len(r["acc"]))
    first = [r for r in rows if r["task"] == 1 and r["seed"] == 0]
    # task 1 is plain IVON for every IVON-based method (same seed): naive and vcl evaluate IVON's posterior,
    # laplace/poco/poco-tempered the same end-of-task curvature-pass posterior: identical numbers within each
    assert len({json.dumps(r["acc"]) for r in first if r["method"] in ("naive", "vcl")}) == 1
    assert len({json.dumps(r["acc"]) for r in first if r["method"] in ("laplace", "poco", "poco-tempered")}) == 1
    chance = 0.5 if config == "continual_split" else 0.1
    assert min(r["acc"][0] for r in first if r["method"] != "adamw") > chance + 0.2  # real learning, even this tiny
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["summary"]) == {"naive", "vcl", "laplace", "poco", "poco-tempered", "adamw"}
    assert res["config"]["tasks"]["memory_weight"] is None  # the shipped configs use the unbiased N_old
    assert res["config"]["tasks"]["clamp_memory_curvature"] is False
    assert (tmp_path / "continual.png").stat().st_size > 10_000
    ck = checkpoint.load(tmp_path / "poco_seed1.safetensors")
    assert ck.posterior is not None and ck.extra["method"] == "poco"


def test_bad_input(tmp_path):
    cfg = load_config(None, [f"out={tmp_path}", "tasks.memory_per_task=0", *TINY[:2]], cls=ContinualConfig)
    with pytest.raises(ConfigError, match="replay memory"):
        run_continual(cfg)
    with pytest.raises(ConfigError, match="methods"):
        run_continual(load_config(None, [f"out={tmp_path}", "methods=[ewc]"], cls=ContinualConfig))
    with pytest.raises(ConfigError, match="old_posterior"):
        load_config(None, ["tasks.old_posterior=laplace"], cls=ContinualConfig)
    with pytest.raises(ConfigError, match="memory_curvature_every"):
        load_config(None, ["tasks.memory_curvature_every=0"], cls=ContinualConfig)
    with pytest.raises(ConfigError, match="replay memory"):
        run_continual(load_config(None, [f"out={tmp_path}", "tasks.memory_per_task=0", "methods=[poco-tempered]",
                                         *TINY[:2]], cls=ContinualConfig))
    with pytest.raises(ConfigError, match="did you mean 'tasks.memory_per_task'"):
        load_config(None, ["tasks.memory_per_tsk=3"], cls=ContinualConfig)
    with pytest.raises(ConfigError, match=r"seeds\[1\]: expected an integer"):
        load_config(None, ["seeds=[0, a]"], cls=ContinualConfig)


def test_help_lists_every_config_section(capsys):
    with pytest.raises(SystemExit):
        main(["continual", "--help"])
    text = capsys.readouterr().out
    for key in ("tasks.", "scenario", "memory_per_task", "methods", "seeds", "--set"):
        assert key in text
