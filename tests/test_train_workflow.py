"""`vbpc train`: configs, and kill-and-resume equal to an uninterrupted run, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from vbpc import checkpoint
from vbpc.config import ConfigError, load_config
from vbpc.workflows import train


def config_args(learner, extra=()):
    return [f"learner.name={learner}", "data.train_size=600", "data.batch_size=100", "model.kwargs={hidden: [32]}",
            "schedule.epochs=2", "run.checkpoint_every=4", "run.progress=false", "eval.test_samples=2",
            "run.log_every=2", *extra]


def config(tmp_path, name, learner, extra=()):
    return load_config(None, [f"run.out={tmp_path / name}", *config_args(learner, extra)])


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


@pytest.mark.slow
@pytest.mark.parametrize("learner,extra", [("ivon", ["learner.lr=0.3"]),
                                           ("ivon-poco", ["learner.lr=0.1", "anchor.period=5"])])
def test_kill_and_resume_is_bitwise(tmp_path, learner, extra):
    full = train(config(tmp_path, "full", learner, extra))
    assert full["step"] == 12 and "test_bma" in full
    killed = config(tmp_path, "resumed", learner, [*extra, "run.max_steps=7"])  # dies mid-epoch, mid-interval
    part = train(killed)
    assert part["step"] == 7 and "test" not in part
    # what a SIGKILL after step 8's log row and mid-way through the next row leaves: rows past the checkpoint
    log = tmp_path / "resumed" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 8, "epoch": 1, "loss": 9.9}\n{"step": 10, "epo')
    resumed = train(config(tmp_path, "resumed", learner, extra), resume=True)
    assert resumed["step"] == 12
    ck1 = checkpoint.load(tmp_path / "full" / "checkpoint.safetensors")
    ck2 = checkpoint.load(tmp_path / "resumed" / "checkpoint.safetensors")
    assert same(ck1.model.state_dict(), ck2.model.state_dict()) and same(ck1.state, ck2.state)  # RNGs included
    assert set(ck1.state["rng"]) >= {"torch_cpu", "numpy", "python"}
    rows = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in log.read_text().splitlines()]
    full_rows = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                 for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows == full_rows  # no duplicate rows, the torn line gone
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


@pytest.mark.slow
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
    assert cli(["train", str(config_path), "--set", "learner.lrr=1"]) == 2
    assert capsys.readouterr().err.startswith("vbpc: error: unknown config key 'learner.lrr'; did you mean")


def test_bbb_learner_runs_and_refuses_resume(tmp_path):
    cfg = config(tmp_path, "bbb", "bbb", ["learner.lr=0.003", "schedule.epochs=1"])
    summary = train(cfg)
    assert summary["step"] == 6 and 0.0 <= summary["test_bma"]["accuracy"] <= 1.0
    ck = checkpoint.load(tmp_path / "bbb" / "checkpoint.safetensors")
    assert ck.extra["learner"] == "bbb" and ck.posterior is not None
    with pytest.raises(ValueError, match="not supported for learner 'bbb'"):
        train(cfg, resume=True)


@pytest.mark.slow
def test_run_directory_is_locked_and_never_silently_replaced(tmp_path, capsys):
    import subprocess
    import sys

    from vbpc.cli import main as cli
    from vbpc.errors import RunLockedError
    from vbpc.io import run_lock

    cfg = config(tmp_path, "run", "ivon", ["run.max_steps=3"])
    out = tmp_path / "run"
    # D1: a live holder of the run directory (another process) refuses a second run, naming its PID
    script = (f"import time\nfrom vbpc.io import run_lock\nwith run_lock({str(out)!r}, 'vbpc train'):\n"
              " print('held', flush=True)\n time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by PID {holder.pid} \\(vbpc train\\)"):
            train(cfg)
        assert sorted(p.name for p in out.iterdir()) == [".vbpc.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    first = train(cfg)  # the kernel released the killed holder's lock
    files = {f: (out / f).read_bytes() for f in ("checkpoint.safetensors", "metrics.jsonl", "summary.json")}
    # D2: re-running into a run without --resume is refused and changes nothing
    with pytest.raises(FileExistsError, match="already holds a run .*--resume.*--overwrite"):
        train(cfg)
    assert cli(["train", "--set", f"run.out={out}", "--set", "learner.lr=0.2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {f: (out / f).read_bytes() for f in files} == files
    with run_lock(out, "test"):  # the same process, another holder
        with pytest.raises(RunLockedError, match=f"PID {__import__('os').getpid()} \\(test\\)"):
            train(cfg, resume=True)
    # a --resume that changes the training is refused; one that changes only where to stop continues
    with pytest.raises(ValueError, match="--resume: the config changes learner.lr from 0.1 to 0.3"):
        train(config(tmp_path, "run", "ivon", ["run.max_steps=3", "learner.lr=0.3"]), resume=True)
    assert {f: (out / f).read_bytes() for f in files} == files
    assert first["step"] == 3 and train(config(tmp_path, "run", "ivon", ["run.max_steps=5"]), resume=True)["step"] == 5
    done = train(config(tmp_path, "run", "ivon"), resume=True)
    assert done["step"] == 12 and "already_finished" not in done
    before = {f: (out / f).read_bytes() for f in files}
    again = train(config(tmp_path, "run", "ivon"), resume=True)  # a finished run: a no-op that says so
    assert again == {**done, "already_finished": True}
    assert {f: (out / f).read_bytes() for f in files} == before
    defaults = tmp_path / "defaults.yaml"  # TrainConfig's defaults (no CONFIG runs the packaged fmnist_ivon.yaml)
    defaults.write_text("{}\n")
    sets = sum((["--set", x] for x in config_args("ivon")), [])
    assert cli(["train", str(defaults), "--set", f"run.out={out}", *sets, "--resume"]) == 0
    assert "already finished (step 12)" in capsys.readouterr().err
    replaced = train(config(tmp_path, "run", "ivon", ["run.max_steps=2"]), overwrite=True)
    assert replaced["step"] == 2 and (out / "metrics.jsonl").read_text().count("\n") == 1
    with pytest.raises(ValueError, match="pass one of them"):
        train(cfg, resume=True, overwrite=True)


@pytest.mark.parametrize("name", __import__("vbpc.inference.registry", fromlist=["LEARNERS"]).learner_names())
def test_every_registered_learner_builds_and_steps_from_a_config(tmp_path, name):
    """``learner.name`` takes every name of the learner registry; the workflow's context (ess, the
    anchor period, the model, ...) reaches only the learners that take it, and one step runs."""
    import math

    import torch.nn.functional as F

    from vbpc.inference.registry import get_learner
    from vbpc.models import build_model
    from vbpc.workflows.train import build_learner

    kw = {"vsgd": "{sigma: 0.01}", "vsgd-poco": "{sigma: 0.01}"}.get(name, "{}")
    cfg = config(tmp_path, "run", name, ["model.kwargs={hidden: [3]}", f"learner.kwargs={kw}", "learner.lr=0.05"])
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    opt = build_learner(cfg, model, n_train=600, steps_per_epoch=6)
    info = get_learner(name)
    assert type(opt).__name__ == info.cls_name.rsplit(".", 1)[-1] or name == "ivon-pocomo"
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    if info.anchored:
        opt.refresh(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)], progress=False)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if info.closure_backward:
            loss.backward()
        return loss

    assert math.isfinite(float(torch.as_tensor(opt.step(closure)).detach()))
