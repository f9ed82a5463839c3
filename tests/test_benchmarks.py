"""The benchmarks' --quick modes write well-formed results (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian dataset-fashion-mnist")
def test_convex_quick_writes_results(tmp_path):
    import convex

    assert convex.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "convex.json").read_text())
    methods = {r["method"] for r in report["multiclass"]}
    assert {"SGD", "SVRG", "α-SVRG", "VSGD-PoCo", "IVON", "IVON-PoCo"} <= methods
    assert {r["method"] for r in report["binary"]} == {"VON", "VON-PoCo"}
    svrg = next(r for r in report["multiclass"] if r["method"] == "SVRG")["curve"]
    assert svrg[-1]["rel_subopt"] < svrg[0]["rel_subopt"] and svrg[-1]["passes"] > svrg[0]["passes"]
    md = (tmp_path / "convex.md").read_text()
    assert md.startswith("1 seed(s)") and "| problem |" in md  # the table aggregates the seeds
    assert (tmp_path / "convex_multiclass.png").stat().st_size > 0


def test_step_overhead_writes_results(tmp_path):
    import step_overhead

    assert step_overhead.main(["--models", "mlp", "--rounds", "1", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "step_overhead.json").read_text())
    r = report["results"][0]
    assert r["model"] == "mlp" and r["ratios"]["whole_vbpc/adamw"] > 0
    assert r["state_bytes_per_param"]["ivon"] == 8.0  # momentum + h in fp32 (the mean is the parameter)


def test_bma_speed_writes_results(tmp_path):
    import bma_speed

    assert bma_speed.main(["--models", "mlp", "--batches", "16", "--samples", "2", "--rounds", "1",
                           "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bma_speed.json").read_text())["results"][0]
    assert r["model"] == "mlp" and r["samples"] == 2 and r["ratios"]["vmap/(S*forward)"] > 0
    assert (tmp_path / "bma_speed.md").read_text().startswith("| model |")


def test_gpu_check_exits_cleanly_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.py itself")
    import gpu_check

    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_compile_speed_writes_results(tmp_path):
    import compile_speed

    res = compile_speed.main(["--rounds", "1", "--steps", "1", "--models", "mlp", "--backend", "aot_eager",
                              "--out", str(tmp_path / "cs")])
    rows = json.loads((tmp_path / "cs.json").read_text())
    assert rows[0]["model"] == "mlp" and rows[0]["ratio_median"] > 0 and "| mlp |" in res["table"]


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian dataset-fashion-mnist")
def test_calibration_quick_writes_results(tmp_path):
    import calibration

    res = calibration.main(["--quick", "--out", str(tmp_path / "cal")])
    data = json.loads((tmp_path / "cal.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"adamw", "ivon-poco", "mc-dropout"}
    for r in data["rows"]:
        assert 0.0 <= r["ece"] <= 1.0 and 0.0 <= r["ood_auroc"] <= 1.0 and r["nll"] > 0
    assert "| ivon-poco |" in res["table"] and (tmp_path / "cal.png").stat().st_size > 5000


def test_suite_entry_point(tmp_path, capsys, monkeypatch):
    import importlib

    suite = importlib.import_module("benchmarks.__main__")
    assert suite.main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("speed", "convex", "calibration", "continual", "finetune", "merge", "gpu"):
        assert name in listed
    assert suite.main(["run", "lm"]) == 2  # not built yet: says so
    monkeypatch.setattr(suite, "QUICK", str(tmp_path))
    assert suite.main(["run", "gpu", "--quick"]) in (0, 1)
