"""The uncertainty study (``benchmarks/calibration.py``) in its quick (CI) size writes well-formed results, and its
ensemble bootstrap equals hand-computed metrics (a file of its own so that the test workers share the load)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian dataset-fashion-mnist")
def test_calibration_quick_writes_results(tmp_path):
    import calibration

    from vbpc.data.shift import SHIFT_LEVELS

    res = calibration.main(["--quick", "--out", str(tmp_path / "cal")])
    data = json.loads((tmp_path / "cal.json").read_text())
    singles = set(calibration.METHODS) - set(calibration.ENSEMBLES)
    assert set(data["rows"]) == singles and set(data["ensembles"]) == set(calibration.ENSEMBLES)
    for rows in data["rows"].values():
        assert [r["seed"] for r in rows] == data["settings"]["seeds"]
        for r in rows:
            assert 0.0 <= r["ece"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0 and 0 < r["brier"] < 2
            assert set(r["ood"]) == set(data["ood_sets"]) and all(0 <= v <= 1 for v in r["ood"]["digits"].values())
            assert ("mi" in r["ood"]["digits"]) == (r["forward_passes"] > 1)  # MI only with several predictives
            assert set(r["shift"]) == set(SHIFT_LEVELS)
            for fam, curve in r["shift"].items():
                assert len(curve["ece"]) == len(curve["level"]) == len(SHIFT_LEVELS[fam]) + 1
            assert r["mean_shift_ece"] == pytest.approx(calibration.mean_over_shift(r["shift"], "ece"))
    # selection: every trained method has its grid scored on the validation split, the winner is the argmin
    for m, sel in data["selection"].items():
        assert sel["grid"] and all(math.isfinite(g["val_nll"]) for g in sel["grid"])
        assert sel["selected_lr"] == min(sel["grid"], key=lambda g: g["val_nll"])["lr"]
        assert all(r["lr"] == sel["selected_lr"] for r in data["rows"][m])
    assert len(data["posthoc"]["temperature"]) == len(data["settings"]["seeds"])
    for e in data["ensembles"].values():
        assert set(e["vs_adamw"]) == {"accuracy", "nll", "ece", "brier"} and "mi" in e["ood"]["digits"]
    for name in calibration.METHODS:
        assert f"| {name} |" in res["table"]
    for metric in ("accuracy", "nll", "ece", "entropy"):
        assert (tmp_path / f"cal_shift_{metric}.png").stat().st_size > 5000
    assert (tmp_path / "cal.png").stat().st_size > 5000
    # the run cache refuses other settings instead of reusing its runs silently
    with pytest.raises(SystemExit, match="other settings"):
        calibration.main(["--quick", "--hess-init", "0.3", "--out", str(tmp_path / "cal")])


def test_calibration_bootstrap_difference_against_hand_metrics():
    import calibration
    import torch

    from vbpc.metrics import accuracy, brier, ece, nll

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=g)
    p = torch.softmax(3 * torch.randn(300, 4, generator=g, dtype=torch.float64), -1)
    refs = [torch.softmax(2 * torch.randn(300, 4, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    out = calibration.bootstrap_difference(p, refs, y, n_boot=400)
    for key, fn in (("accuracy", accuracy), ("nll", nll), ("brier", brier), ("ece", ece)):
        hand = fn(p, y) - sum(fn(r, y) for r in refs) / 3
        assert out[key]["mean"] == pytest.approx(hand, abs=1e-12)
        assert out[key]["lo"] <= out[key]["mean"] <= out[key]["hi"] and out[key]["lo"] < out[key]["hi"]
    # one resample by hand: ECE from the binned gaps equals vbpc's ECE of the resampled rows
    idx = torch.randint(0, 300, (1, 300), generator=g)
    got = calibration._resampled(calibration._example_stats(p, y), idx)
    assert float(got["ece"][0]) == pytest.approx(ece(p[idx[0]], y[idx[0]]), abs=1e-12)
    assert float(got["nll"][0]) == pytest.approx(nll(p[idx[0]], y[idx[0]]), abs=1e-12)
