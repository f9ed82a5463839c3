"""``vbpc unlearn CHECKPOINT --forget SPEC`` on a real Fashion-MNIST checkpoint: what is forgotten, the
record it leaves, and the refusals (nothing is written when the input is bad)."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

import vbpc
from vbpc import checkpoint as ckpt
from vbpc.cli import main
from vbpc.data import load_fashion_mnist
from vbpc.models import build_model
from vbpc.workflows.unlearning import forget_indices

N_TRAIN = 300


def _checkpoint(path, posterior=True):
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[16])
    x, y = load_fashion_mnist("train").tensors
    opt = vbpc.IVON(model.parameters(), lr=0.2, ess=N_TRAIN, hess_init=0.5, weight_decay=1e-2)
    for i in range(0, N_TRAIN, 50):
        def closure(i=i):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i:i + 50]), y[i:i + 50])
            loss.backward()
            return loss
        opt.step(closure)
    post = opt.posterior(model) if posterior else None
    ckpt.save(path, model, post, spec={"name": "mlp", "kwargs": {"hidden": [16]}},
              extra={"config": {"data": {"name": "fashion_mnist", "train_size": N_TRAIN}},
                     "learner": "ivon" if posterior else "adamw"})
    return y[:N_TRAIN]


def test_forget_a_class_writes_a_checkpoint_that_records_it(tmp_path, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    y = _checkpoint(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert main(["unlearn", str(src), "--forget", "class=3", "--out", str(out), "--no-progress",
                 "--curvature", "ggn", "--mc-samples", "0"]) == 0
    want = torch.nonzero(y == 3).flatten()
    assert f"forgot {len(want)} of {N_TRAIN} training examples (class=3" in capsys.readouterr().out
    ck = ckpt.load(out)
    rec = ck.extra["unlearned"]
    assert rec["n_forget"] == len(want) and rec["forget"] == "class=3" and rec["curvature"] == "ggn"
    assert rec["dataset"] == "fashion_mnist" and rec["train_examples"] == N_TRAIN and rec["source"] == str(src)
    assert torch.equal(ck.state["forget_index"], want)
    old = ckpt.load(src)
    # the model holds the new mean, and the new precision is the old one minus a non-negative GGN
    for name, p in ck.model.named_parameters():
        assert torch.equal(p, ck.posterior.mean[name])
        assert bool((ck.posterior.precision[name] <= old.posterior.precision[name] + 1e-3).all())
    assert any(not torch.equal(ck.posterior.mean[n], old.posterior.mean[n]) for n in old.posterior.mean)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # the input is untouched


def test_forget_specs():
    y = torch.tensor([0, 1, 2, 1, 0, 1])
    assert forget_indices("class=1", y) == [1, 3, 5]
    assert forget_indices("range=2:4", y) == [2, 3]
    assert len(forget_indices("random=0.5", y, seed=1)) == 3
    assert forget_indices("random=0.5", y, seed=1) == forget_indices("random=0.5", y, seed=1)
    for bad, msg in [("class=7", "no training example has class 7"), ("random=1.5", "fraction"),
                     ("range=4:2", "0 <= A < B"), ("colour=red", "unknown kind"), ("class", "expected class=K")]:
        with pytest.raises(ValueError, match=msg):
            forget_indices(bad, y)


def test_refusals_write_nothing(tmp_path, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _checkpoint(src)
    # examples beyond the training data: warned about and dropped; none left is an error
    with pytest.warns(UserWarning, match="10 of 15 forget examples are not in the training data"):
        assert main(["unlearn", str(src), "--forget", f"range={N_TRAIN - 5}:{N_TRAIN + 10}", "--out", str(out),
                     "--no-progress"]) == 0
    assert ckpt.load(out).extra["unlearned"]["n_forget"] == 5
    out.unlink()
    with pytest.warns(UserWarning):
        assert main(["unlearn", str(src), "--forget", f"range={N_TRAIN}:{N_TRAIN + 3}", "--out", str(out)]) == 2
    assert "no example of the training data is left to forget" in capsys.readouterr().err
    bad = tmp_path / "idx.txt"
    bad.write_text("1, 2, x")
    assert main(["unlearn", str(src), "--forget", f"indices={bad}", "--out", str(out)]) == 2
    assert "non-integer entry 'x'" in capsys.readouterr().err
    assert main(["unlearn", str(src), "--forget", "class=1", "--out", str(src)]) == 2
    assert "is the input checkpoint" in capsys.readouterr().err
    assert not out.exists()
    adamw = tmp_path / "adamw.safetensors"
    _checkpoint(adamw, posterior=False)
    assert main(["unlearn", str(adamw), "--forget", "class=1", "--out", str(out)]) == 2
    assert "holds no posterior (saved by learner 'adamw')" in capsys.readouterr().err
    assert not out.exists()
    out.write_text("keep me")
    assert main(["unlearn", str(src), "--forget", "class=1", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
