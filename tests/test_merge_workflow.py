"""``vbpc merge-eval``: merging finetuned posteriors (eq. 31) scored on every task (tiny CI version
of examples/configs/merge_permuted.yaml, real Fashion-MNIST)."""

from __future__ import annotations

import json

import pytest

from vbpc.cli import main
from vbpc.config import ConfigError, MergeConfig, load_config
from vbpc.workflows.merging import run_merging


def test_merge_eval_tiny(tmp_path, capsys):
    rc = main(["merge-eval", "examples/configs/merge_permuted.yaml", "--set", f"out={tmp_path}",
               "--set", "tasks.n_tasks=3", "--set", "tasks.train_size=1000", "--set", "tasks.test_size=200",
               "--set", "tasks.batch_size=32",
               "--set", "base_size=1000", "--set", "seeds=[0]", "--set", "progress=false",
               "--set", "model.kwargs={hidden: [32]}"])
    assert rc == 0
    out = capsys.readouterr().out
    for m in ("| base |", "| individual |", "| precision |", "| hessian |", "| average |", "| task-arithmetic |"):
        assert m in out
    assert (tmp_path / "merging.png").stat().st_size > 5000
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert len(rows["precision"]["acc"]) == 3
    # the base never saw perm1/perm2; each finetune learns its own task well above chance (0.1)
    assert rows["individual"]["acc"][1] > rows["base"]["acc"][1] + 0.2
    # a merge keeps the base task (perm0) far better than chance and adds the new tasks
    assert rows["precision"]["acc"][0] > 0.5 and rows["precision"]["mean"] > rows["base"]["mean"]


def test_merge_eval_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'base_size'"):
        load_config(None, ["base_sze=3"], cls=MergeConfig)
    with pytest.raises(ConfigError, match="learner.name"):
        run_merging(load_config(None, [f"out={tmp_path}", "learner.name=adamw"], cls=MergeConfig))
