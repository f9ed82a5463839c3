"""vbpc.evaluation: the one-call uncertainty report and `vbpc evaluate` on real data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vbpc
from vbpc import checkpoint
from vbpc.cli import main as cli
from vbpc.data import load_dataset, load_fashion_mnist, make_loader
from vbpc.evaluation import evaluate_uncertainty, markdown_table, write_report
from vbpc.metrics import accuracy, brier, ece, nll, ood_metrics
from vbpc.models import MLP
from vbpc.predictive import predict
from vbpc.training import train_epoch


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train = load_fashion_mnist("train")
    sub = torch.utils.data.TensorDataset(train.tensors[0][:2000], train.tensors[1][:2000])
    model = MLP(hidden=(64,))
    opt = vbpc.IVON(model.parameters(), lr=0.5, ess=2000, hess_init=0.5, beta2=0.999)
    train_epoch(model, opt, make_loader(sub, 100, shuffle=True, generator=torch.Generator().manual_seed(0)),
                F.cross_entropy, progress=False)
    test = load_fashion_mnist("test")
    in_ds = torch.utils.data.TensorDataset(test.tensors[0][:500], test.tensors[1][:500])
    digits = load_dataset("digits")
    ood_ds = torch.utils.data.TensorDataset(digits.tensors[0][:300], digits.tensors[1][:300])
    return model, opt.posterior(model), in_ds, ood_ds


def test_report_matches_functional_metrics(trained, tmp_path):
    model, post, in_ds, ood_ds = trained
    rep = evaluate_uncertainty(model, make_loader(in_ds, 250), post, 4, ood_data=make_loader(ood_ds, 250),
                               label="ivon", n_boot=100, seed=0, progress=False)
    # the same draws as predict() with the report's generator (seeded by `seed`)
    gen = torch.Generator().manual_seed(0)
    pin = predict(model, make_loader(in_ds, 250), post, 4, generator=gen, keep_samples=True)
    pout = predict(model, make_loader(ood_ds, 250), post, 4, generator=gen, keep_samples=True)
    y = pin.labels
    expect = {"accuracy": accuracy(pin.probs, y), "nll": nll(pin.probs, y), "brier": brier(pin.probs, y),
              "ece": ece(pin.probs, y)}
    for k, v in expect.items():
        assert rep.value(k) == pytest.approx(v, rel=1e-9, abs=1e-12), k
        assert rep.metrics[k]["low"] <= rep.metrics[k]["high"]
    assert rep.value("ood_auroc") == pytest.approx(ood_metrics(pin.probs, pout.probs)["auroc"], rel=1e-12)
    assert 0 <= rep.value("mi") and rep.value("accuracy") > 0.6
    mean_rep = evaluate_uncertainty(model, make_loader(in_ds, 250), None, ood_data=make_loader(ood_ds, 250),
                                    label="mean", n_boot=50, progress=False)
    assert "mi" not in mean_rep.metrics and mean_rep.n_samples == 0
    paths = write_report([rep, mean_rep], tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["label"] for r in data["reports"]] == ["ivon", "mean"]
    assert data["reports"][0]["metrics"]["ood_fpr95"]["value"] == pytest.approx(rep.value("ood_fpr95"))
    table = paths["markdown"].read_text()
    assert table == markdown_table([rep, mean_rep]) and "| ivon | 4 |" in table and "OOD AUROC" in table
    for key in ("reliability", "ood_scores", "risk_coverage"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="duplicate"):
        write_report([rep, rep], tmp_path)


@pytest.mark.slow
def test_cli_evaluate_checkpoint(trained, tmp_path, capsys):
    model, post, _, _ = trained
    path = tmp_path / "mlp.safetensors"
    checkpoint.save(path, model, post, spec={"name": "mlp", "kwargs": {"hidden": [64]}})
    out = tmp_path / "report"
    assert cli(["evaluate", str(path), "--ood", "digits", "--samples", "2", "--n-boot", "20", "--out", str(out),
                "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| model | 2 |" in printed and (out / "report.json").exists() and (out / "reliability.png").exists()
    rep = json.loads((out / "report.json").read_text())["reports"][0]
    assert rep["settings"]["n_in"] == 10000 and rep["settings"]["n_out"] == 1797
