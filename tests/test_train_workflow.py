"""`vbpc train`: configs, and kill-and-resume equal to an uninterrupted run, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from vbpc import checkpoint
from vbpc.config import ConfigError, load_config
from vbpc.workflows import train


def config(tmp_path, name, learner, extra=()):
    return load_config(None, [f"run.out={tmp_path / name}", f"learner.name={learner}", "data.train_size=600",
                              "data.batch_size=100", "model.kwargs={hidden: [32]}", "schedule.epochs=2",
                              "run.checkpoint_every=4", "run.progress=false", "eval.test_samples=2",
                              "run.log_every=2", *extra])


def state_of(path):
    ck = checkpoint.load(path)
    return ck.model.state_dict(), ck.state["optimizer"]


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("learner,extra", [("ivon", ["learner.lr=0.3"]),
                                           ("ivon-poco", ["learner.lr=0.1", "anchor.period=5"])])
def test_kill_and_resume_is_bitwise(tmp_path, learner, extra):
    full = train(config(tmp_path, "full", learner, extra))
    assert full["step"] == 12 and "test_bma" in full
    killed = config(tmp_path, "resumed", learner, [*extra, "run.max_steps=7"])  # dies mid-epoch, mid-interval
    part = train(killed)
    assert part["step"] == 7 and "test" not in part
    resumed = train(config(tmp_path, "resumed", learner, extra), resume=True)
    assert resumed["step"] == 12
    m1, o1 = state_of(tmp_path / "full" / "checkpoint.safetensors")
    m2, o2 = state_of(tmp_path / "resumed" / "checkpoint.safetensors")
    assert same(m1, m2) and same(o1, o2)
    assert resumed["test"] == full["test"] and resumed["test_bma"] == full["test_bma"]
    assert (tmp_path / "full" / "curves.png").exists()
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "test_accuracy" in r] == [1, 2] and sum("loss" in r for r in rows) == 6


def test_killed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path, "run", "ivon", ["run.max_steps=4"])
    train(cfg)
    path = tmp_path / "run" / "checkpoint.safetensors"
    before = path.read_bytes()
    import vbpc.checkpoint as ck

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, "run", "ivon", ["run.max_steps=8"]), resume=True)
    assert path.read_bytes() == before and checkpoint.load(path).extra["step"] == 4


def test_resume_errors(tmp_path):
    train(config(tmp_path, "run", "ivon", ["run.max_steps=2"]))
    with pytest.raises(ValueError, match="learner 'ivon'"):
        train(config(tmp_path, "run", "adamw", []), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path, "other", "ivon", []), resume=True)
    with pytest.raises(Exception, match="do not fit"):
        train(config(tmp_path, "run", "ivon", ["model.kwargs={hidden: [16]}"]), resume=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'learner.lr'"):
        load_config(None, ["learner.lrr=0.1"])
    with pytest.raises(ConfigError, match="schedule.epochs: expected an integer"):
        load_config(None, ["schedule.epochs=two"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["learner.lr"])


def test_loader_iteration_leaves_global_rng():
    """Re-creating loaders on resume must not shift the global RNG (IVON's noise source)."""
    from vbpc.data import make_loader

    ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    before = torch.get_rng_state()
    for loader in (make_loader(ds, 3, shuffle=True, generator=torch.Generator().manual_seed(0)), make_loader(ds, 3)):
        list(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_cli_train_quick_config_then_evaluate(tmp_path, capsys):
    """The README's main job on a tiny budget: vbpc train <example config> then vbpc evaluate."""
    from pathlib import Path

    from vbpc.cli import main as cli

    config_path = Path(__file__).resolve().parents[1] / "examples" / "configs" / "fmnist_ivon.yaml"
    out = tmp_path / "run"
    assert cli(["train", str(config_path), "--set", f"run.out={out}", "--set", "data.train_size=1000",
                "--set", "schedule.epochs=1", "--set", "run.progress=false", "--set", "eval.test_samples=2"]) == 0
    assert '"test_bma"' in capsys.readouterr().out
    assert cli(["evaluate", str(out / "checkpoint.safetensors"), "--samples", "2", "--n-boot", "10",
                "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    assert (tmp_path / "report" / "report.md").exists()
    with pytest.raises(ConfigError, match="did you mean"):
        cli(["train", str(config_path), "--set", "learner.lrr=1"])


def test_bbb_learner_runs_and_refuses_resume(tmp_path):
    cfg = config(tmp_path, "bbb", "bbb", ["learner.lr=0.003", "schedule.epochs=1"])
    summary = train(cfg)
    assert summary["step"] == 6 and 0.0 <= summary["test_bma"]["accuracy"] <= 1.0
    ck = checkpoint.load(tmp_path / "bbb" / "checkpoint.safetensors")
    assert ck.extra["learner"] == "bbb" and ck.posterior is not None
    with pytest.raises(ValueError, match="not supported for learner 'bbb'"):
        train(cfg, resume=True)
