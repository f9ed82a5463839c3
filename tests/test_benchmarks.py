"""The benchmarks' --quick modes write well-formed results (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
def test_step_overhead_writes_results(tmp_path):
    import step_overhead

    assert step_overhead.main(["--models", "mlp", "--rounds", "1", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "step_overhead.json").read_text())
    r = report["results"][0]
    q = r["ratios"]["whole_vbpc/adamw"]
    assert r["model"] == "mlp" and 0 < q["min"] <= q["median"] <= q["max"]
    assert r["state_bytes_per_param"]["ivon"] == 8.0  # momentum + h in fp32 (the mean is the parameter)


@pytest.mark.slow
def test_bma_speed_writes_results(tmp_path):
    import bma_speed

    assert bma_speed.main(["--models", "mlp", "--batches", "16", "--samples", "2", "--rounds", "1",
                           "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bma_speed.json").read_text())["results"][0]
    q = r["ratios"]["vmap/loop"]
    assert r["model"] == "mlp" and r["samples"] == 2 and 0 < q["min"] <= q["median"] <= q["max"]
    assert (tmp_path / "bma_speed.md").read_text().startswith("| model |")


def test_gpu_check_exits_cleanly_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.py itself")
    import gpu_check

    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_speed_writes_results(tmp_path):
    import compile_speed

    res = compile_speed.main(["--rounds", "1", "--steps", "1", "--models", "mlp", "--backend", "aot_eager",
                              "--out", str(tmp_path / "cs")])
    rows = json.loads((tmp_path / "cs.json").read_text())
    assert rows[0]["model"] == "mlp" and rows[0]["ratio_median"] > 0 and "| mlp |" in res["table"]


def test_suite_entry_point(tmp_path, capsys, monkeypatch):
    import importlib

    suite = importlib.import_module("benchmarks.__main__")
    assert suite.main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("speed", "convex", "calibration", "continual", "finetune", "merge", "lm", "ablation", "gpu"):
        assert name in listed
    monkeypatch.setattr(suite, "QUICK", str(tmp_path))
    assert suite.main(["run", "gpu", "--quick"]) in (0, 1)


@pytest.mark.slow
def test_speed_quick_combines_and_checks_targets(tmp_path):
    import speed

    assert speed.main(["--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "speed.md").read_text()
    assert "| mlp |" in md and "BMA vmap ÷ loop" in md and "bytes per parameter" in md
    assert "IVON-PoCoMo ÷ IVON ≤ 2.05×: mlp " in md and ("(met)" in md or "missed" in md)
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["step"]["results"][0]["ratios"]["whole_ivon-poco/vbpc"]["median"] > 0


def test_speed_targets_say_by_how_much():
    import speed

    r = {"model": "cnn", "ratios": {"whole_vbpc/adamw": {"median": 1.26}, "whole_ivon-poco/vbpc": {"median": 2.0},
                                    "opt_vbpc/ivon-opt": None}}
    text = speed.targets([r], [])
    assert "cnn 1.26× (**missed** by 20%)" in text and "cnn 2.00× (met)" in text
    assert "ivon-opt ≤ 0.7×" not in text  # no reference installed: no line rather than a made-up one


@pytest.mark.slow
def test_lm_quick_writes_results(tmp_path):
    import lm

    assert lm.main(["--quick", "--no-progress", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "lm.json").read_text())
    assert report["seeds"] == [0, 1] and set(report["selection"]) == {"adamw", "ivon", "ivon-pocomo"}
    # PoCoMo's selection starts from IVON's selected (a, β2) and tries both mega-batch remedies
    sel = report["selection"]
    pocomo_cfgs = [s["config"] for s in sel["ivon-pocomo"]["scores"]]
    assert all(c["lr"] == sel["ivon"]["best"]["lr"] for c in pocomo_cfgs)
    assert {c.get("alpha_mode") for c in pocomo_cfgs} >= {"optimal"}
    assert {c.get("anchor_update") for c in pocomo_cfgs} >= {"running"}
    runs = {(r["method"], r["seed"]): r for r in report["runs"]}
    assert {m for m, _ in runs} == set(lm.METHODS)
    b = report["settings"]["batch_size"]
    for s in (0, 1):  # paired: the same initial weights at a seed, so the same step-0 test perplexity
        assert len({runs[(m, s)]["curve"][0]["val_ppl"] for m in lm.METHODS}) == 1
        for m in ("adamw", "ivon"):
            assert runs[(m, s)]["final"]["grad_evals"] == runs[(m, s)]["steps"] * b  # one pass per step
        poco, matched = runs[("ivon-pocomo", s)], runs[("ivon-pocomo-matched", s)]
        assert poco["final"]["grad_evals"] > 2 * b * (poco["steps"] - report["settings"]["warmup"])
        budget = runs[("adamw", s)]["final"]["grad_evals"]
        assert budget - 2 * b < matched["final"]["grad_evals"] <= budget
        assert runs[("ivon", s)]["clipped_steps"] >= 1  # the in-learner clip of the GPT-2 recipe is on
    for r in report["runs"]:
        c = r["curve"][-1]
        assert r["split"] == "test" and 1.0 < c["val_ppl"] < 100 and 0.0 <= c["val_ece"] <= 1.0
        assert abs(c["val_ppl"] - 2.718281828 ** c["val_loss"]) < 1e-6 * c["val_ppl"]
    assert "val_ppl_bma" in runs[("ivon", 0)]["final"] and "val_ppl_bma" not in runs[("adamw", 0)]["final"]
    # paired differences: the interval is the t-interval of the per-seed differences
    cmp = {(c["a"], c["b"]): c for c in report["summary"]["comparisons"]}
    d = cmp[("ivon", "adamw")]["steps"]
    want = [runs[("ivon", s)]["final"]["val_ppl"] - runs[("adamw", s)]["final"]["val_ppl"] for s in (0, 1)]
    assert d["diffs"] == pytest.approx(want)
    half = 12.706 * abs(want[0] - want[1]) / 2 ** 0.5 / 2 ** 0.5  # t(0.975, 1) * sd / sqrt(2)
    assert d["hi"] - d["mean"] == pytest.approx(half, rel=1e-3)
    md = (tmp_path / "lm.md").read_text()
    assert "| IVON-PoCoMo (equal grad. evals) |" in md and "**selected**" in md and "| IVON − AdamW |" in md
    for axis in ("steps", "evals", "wallclock"):
        assert (tmp_path / f"lm_{axis}.png").stat().st_size > 5000
    # the jobs are files: a rerun finds them all and trains nothing
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "lm_runs").glob("*.json"))
    assert lm.main(["--quick", "--no-progress", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "lm_runs").glob("*.json")) == before
    # other settings refuse the stored results instead of mixing them
    with pytest.raises(RuntimeError, match="other study settings"):
        lm.main(["--quick", "--no-progress", "--threads", "1", "--hess-init", "0.1", "--out", str(tmp_path)])
    # --from-json rebuilds the identical table (and the figures) without retraining
    (tmp_path / "lm.md").unlink()
    (tmp_path / "lm_steps.png").unlink()
    assert lm.main(["--from-json", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lm.md").read_text() == md and (tmp_path / "lm_steps.png").is_file()
    with pytest.raises(FileNotFoundError, match="lm.json"):
        lm.main(["--from-json", "--out", str(tmp_path / "nowhere")])


def test_lm_divergence_is_recorded_not_fatal():
    import lm

    def boom():
        raise FloatingPointError("ivon seed 0: loss nan at step 3")
    r = lm._guarded(boom, "ivon", 0, {"lr": 200.0}, "tune")
    assert r["final"]["val_ppl"] == float("inf") and "step 3" in r["diverged"] and r["config"] == {"lr": 200.0}
    assert lm.paired([1.0, float("inf"), 3.0], [0.5, 1.0, 2.0])["n"] == 2  # a diverged seed is not averaged in


def test_lm_grid_is_widened_when_the_best_sits_on_an_edge():
    import lm

    cfgs = [{"lr": lr, "beta2": b} for lr in (50.0, 100.0, 200.0) for b in (0.999, 0.99999)]
    assert lm.widen(cfgs, {"lr": 200.0, "beta2": 0.999}, "lr") == [{"lr": 400.0, "beta2": 0.999},
                                                                   {"lr": 400.0, "beta2": 0.99999}]
    assert lm.widen(cfgs, {"lr": 50.0, "beta2": 0.99999}, "lr")[0]["lr"] == 25.0
    assert lm.widen(cfgs, {"lr": 100.0, "beta2": 0.999}, "lr") == []  # interior: the grid brackets it
    assert lm.widen(cfgs[:2], {"lr": 50.0, "beta2": 0.999}, "lr") == []  # one value: no edge to speak of


def test_lm_interp_and_matched_steps():
    import argparse

    import lm

    curve = [{"step": 0, "v": 10.0}, {"step": 10, "v": 6.0}, {"step": 20, "v": 5.0}]
    assert lm.interp(curve, "step", 5, "v") == 8.0 and lm.interp(curve, "step", 20, "v") == 5.0
    assert lm.interp(curve, "step", 21, "v") != lm.interp(curve, "step", 21, "v")  # NaN beyond the end
    args = argparse.Namespace(batch_size=16, warmup=50, anchor_period=100, megabatch=512, steps=800, alpha=0.75,
                              alpha_schedule="linear")
    # 360 steps: K = 4 refreshes (at 50, 150, 250, 350), α = 0.75, 0.5, 0.25, 0 -> 300 corrected steps
    assert lm.pocomo_cost(args, 360) == 16 * 360 + 16 * 300 + 2 * 512 * 4
    s = lm.matched_steps(args)
    assert lm.pocomo_cost(args, s) <= 16 * 800 < min(lm.pocomo_cost(args, t) for t in range(s + 1, 801))
    args.alpha_schedule = "constant"  # every post-warm-up step corrected
    assert lm.pocomo_cost(args, 360) == 16 * 360 + 16 * 310 + 2 * 512 * 4


def test_readme_regeneration(tmp_path):
    import readme

    results = tmp_path / "results"
    results.mkdir()
    (results / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- results:a.md -->\nold table\n<!-- /results:a.md -->\n"
                   "<!-- results:b.md -->\nkept\n<!-- /results:b.md -->\nend\n")
    assert readme.blocks(doc.read_text()) == ["a.md", "b.md"]
    assert readme.update_readme(doc, results) == (["a.md"], ["b.md"])
    assert doc.read_text() == ("intro\n<!-- results:a.md -->\n| x |\n|---|\n| 1 |\n<!-- /results:a.md -->\n"
                               "<!-- results:b.md -->\nkept\n<!-- /results:b.md -->\nend\n")
    assert readme.update_readme(doc, results) == ([], ["b.md"])  # idempotent
    doc.write_text("<!-- results:../secret.md -->\nx\n<!-- /results:../secret.md -->\n")
    with pytest.raises(ValueError, match="outside"):
        readme.update_readme(doc, results)


def test_readme_blocks_all_have_result_files():
    import readme

    for page in (readme.ROOT / "README.md", readme.DOCS / "benchmarks.md"):
        for name in readme.blocks(page.read_text()):
            assert (readme.ROOT / "benchmarks" / "results" / name).is_file(), (page, name)
    # the documentation's benchmarks page shows every result table
    docs = set(readme.blocks((readme.DOCS / "benchmarks.md").read_text()))
    assert {"speed.md", "convex.md", "calibration.md", "lm.md", "ablation.md"} <= docs
    assert set(readme.result_files()) <= docs


def test_docs_benchmarks_page_regeneration(tmp_path):
    import readme

    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "quick").mkdir()
    (results / "a_runs").mkdir()
    (results / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    (results / "b.md").write_text("| y |\n")
    (results / "sub" / "fig.png").write_bytes(b"png-1")
    (results / "quick" / "q.png").write_bytes(b"quick")
    (results / "a_runs" / "r.png").write_bytes(b"run")
    page = tmp_path / "benchmarks.md"
    page.write_text("# B\n<!-- results:a.md -->\n<!-- /results:a.md -->\n![f](figures/sub/fig.png)\n"
                    "<!-- figures -->\nold\n<!-- /figures -->\n")
    figures = tmp_path / "figures"
    assert readme.update_docs(page, results, figures) == (["a.md"], [], ["b.md"])
    text = page.read_text()
    assert "<!-- results:a.md -->\n| x |\n|---|\n| 1 |\n<!-- /results:a.md -->" in text
    assert "<!-- figures -->\n* [sub/fig.png](figures/sub/fig.png)\n<!-- /figures -->" in text
    assert (figures / "sub" / "fig.png").read_bytes() == b"png-1"
    assert not (figures / "quick").exists() and not (figures / "a_runs").exists()
    mtime = (figures / "sub" / "fig.png").stat().st_mtime_ns
    assert readme.update_docs(page, results, figures) == ([], [], ["b.md"])  # a second run changes nothing
    assert page.read_text() == text and (figures / "sub" / "fig.png").stat().st_mtime_ns == mtime
    (results / "sub" / "fig.png").write_bytes(b"png-2")
    assert readme.copy_figures(results, figures) == ["sub/fig.png"]
    assert (figures / "sub" / "fig.png").read_bytes() == b"png-2"
