"""The posterior-correction studies run in their quick (CI) sizes and write well-formed results: the convex
benchmark and the ablation (a file of their own so that the test workers share the load)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian dataset-fashion-mnist")
def test_convex_quick_writes_results(tmp_path):
    import convex

    assert convex.main(["--quick", "--epochs", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "convex.json").read_text())
    methods = {r["method"] for r in report["multiclass"]}
    assert {"SGD", "SVRG", "α-SVRG", "VSGD-PoCo", "IVON", "IVON-PoCo"} <= methods
    assert {r["method"] for r in report["binary"]} == {"VON", "VON-PoCo"}
    svrg = next(r for r in report["multiclass"] if r["method"] == "SVRG")["curve"]
    assert svrg[-1]["rel_subopt"] < svrg[0]["rel_subopt"] and svrg[-1]["passes"] > svrg[0]["passes"]
    md = (tmp_path / "convex.md").read_text()
    assert md.startswith("1 seed(s)") and "| problem |" in md  # the table aggregates the seeds
    assert (tmp_path / "convex_multiclass.png").stat().st_size > 0


@pytest.mark.slow
def test_ablation_quick_writes_results(tmp_path):
    import ablation

    assert ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in report["lm"]] == list(ablation.LM_VARIANTS)
    assert [r["variant"] for r in report["convex"]] == list(ablation.CONVEX_VARIANTS)
    lm_runs = {r["variant"]: r for r in report["lm"]}
    # a bigger mega-batch costs more gradient evaluations; the uncorrected reference costs the least
    assert lm_runs["M = 2048"]["final"]["grad_evals"] > lm_runs["default"]["final"]["grad_evals"]
    assert lm_runs["default"]["final"]["grad_evals"] > lm_runs["M = 128"]["final"]["grad_evals"]
    assert lm_runs["IVON (no correction)"]["final"]["grad_evals"] < lm_runs["M = 128"]["final"]["grad_evals"]
    # plain IVON given the default's gradient evaluations: as many steps as they buy, to within one batch
    matched, default = lm_runs["IVON, the default's gradient evaluations"], lm_runs["default"]
    per_step = lm_runs["IVON (no correction)"]["final"]["grad_evals"] // lm_runs["IVON (no correction)"]["steps"]
    assert matched["steps"] > default["steps"]
    assert abs(matched["final"]["grad_evals"] - default["final"]["grad_evals"]) <= per_step // 2
    md = (tmp_path / "ablation.md").read_text()
    assert "| proximal on |" in md and "| no Hessian correction |" in md and "| α constant |" in md
    assert (tmp_path / "ablation_lm.png").stat().st_size > 5000
    assert (tmp_path / "ablation_convex.png").stat().st_size > 5000
    assert "one seed, no spread" in md and " ± " not in md.split("Convex")[0]  # no fake ± 0.000 for one seed
    # the default is described from the run's own settings (the quick LM uses T = 8, M = 8)
    assert "α0 = 0.75 with linear decay, anchor period T = 8 steps, mega-batch M = 8 sequences, shared" in md
    (tmp_path / "ablation.md").unlink()
    assert ablation.main(["--from-json", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ablation.md").read_text() == md
    with pytest.raises(FileNotFoundError, match="ablation.json"):
        ablation.main(["--from-json", "--out", str(tmp_path / "nowhere")])


@pytest.mark.slow
def test_unlearning_quick_writes_results(tmp_path):
    """The unlearning study's --quick run: every method on both forget sets, costs that add up, the
    gold standard at KL 0 from itself and never predicting the class it never saw."""
    import unlearning

    assert unlearning.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "unlearning.json").read_text())
    md = (tmp_path / "unlearning.md").read_text()
    assert (tmp_path / "unlearning.png").stat().st_size > 0
    for scenario in ("class", "random"):
        rows = report["runs"]["0"][scenario]["rows"]
        assert set(rows) == set(unlearning.METHODS)
        assert rows["retrain"]["kl_test"] == pytest.approx(0.0, abs=1e-12)
        n = report["runs"]["0"][scenario]["n_forget"]
        assert rows["eq32"]["grad_evals"] == 11 * n  # at the mean: the gradient and ten GGN class passes
        assert rows["eq32+poco"]["grad_evals"] == 11 * n + 10 * 2 * 128
        assert rows["finetune"]["grad_evals"] == 2 * 10 * 128
    assert report["runs"]["0"]["class"]["rows"]["retrain"]["forget_acc"] == 0.0
    assert "Unlearning class 3" in md and "paired differences" in md
