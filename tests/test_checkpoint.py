"""vbpc.checkpoint: safetensors model + posterior checkpoints (serialization as an API)."""

from __future__ import annotations

import pytest
import torch

import vbpc
from vbpc import checkpoint
from vbpc.errors import StateDictMismatchError
from vbpc.models import LeNet5, build_model, char_gpt2


def trained_lenet():
    torch.manual_seed(0)
    model = LeNet5()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100, hess_init=0.3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return model, opt.posterior(model)


def test_round_trip_rebuilds_model_and_posterior(tmp_path):
    model, post = trained_lenet()
    path = tmp_path / "lenet.safetensors"
    checkpoint.save(path, model, post, spec={"name": "lenet", "kwargs": {"num_classes": 10}}, extra={"acc": 0.5})
    ck = checkpoint.load(path)
    assert isinstance(ck.model, LeNet5) and ck.extra == {"acc": 0.5} and ck.spec["name"] == "lenet"
    for (n, p), (n2, q) in zip(model.named_parameters(), ck.model.named_parameters()):
        assert n == n2 and torch.equal(p, q)
    assert isinstance(ck.posterior, vbpc.DiagonalGaussian)
    for n in post.names:
        assert torch.equal(ck.posterior.std[n], post.std[n])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 28, 28)
    with post.sampled(model, generator=g1):
        a = model(x)
    with ck.posterior.sampled(generator=g2):  # bound to the rebuilt model
        b = ck.model(x)
    assert torch.equal(a, b)


def test_tied_weights_and_isotropic(tmp_path):
    model = char_gpt2(20, block_size=8, n_layer=1, n_embd=16, n_head=2)
    post = vbpc.IsotropicGaussian.from_module(model, sigma=0.01)
    checkpoint.save(tmp_path / "gpt.safetensors", model, post)
    fresh = char_gpt2(20, block_size=8, n_layer=1, n_embd=16, n_head=2)
    ck = checkpoint.load(tmp_path / "gpt.safetensors", fresh)
    assert ck.model is fresh and float(ck.posterior.sigma) == pytest.approx(0.01)
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)


def test_errors(tmp_path):
    model, post = trained_lenet()
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, post)
    with pytest.raises(ValueError, match="no model spec"):
        checkpoint.load(path)
    other = LeNet5(num_classes=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match="shape mismatch.*classifier.4.weight"):
        checkpoint.load(path, other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing half-loaded
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a vbpc checkpoint"):
        checkpoint.load(tmp_path / "plain.safetensors", model)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet9000")
    with pytest.raises(ValueError, match="spec"):
        checkpoint.save(path, model, spec={"kwargs": {}})


def test_flatten_round_trip():
    state = {"a": torch.arange(3), "b": [1.5, float("inf"), None, (torch.ones(2), "s")], 3: {"d": torch.float16}}
    tensors: dict = {}
    sk = checkpoint.flatten_state(state, "s", tensors)
    back = checkpoint.unflatten_state(sk, tensors)
    assert torch.equal(back["a"], state["a"]) and back["b"][1] == float("inf") and back[3]["d"] is torch.float16
    assert isinstance(back["b"][3], tuple) and torch.equal(back["b"][3][0], torch.ones(2))
    with pytest.raises(TypeError, match="cannot serialise"):
        checkpoint.flatten_state({"f": object()}, "s", {})


def test_checkpoint_holds_the_prior(tmp_path):
    """The prior travels with the posterior: the isotropic IVON prior and a ContinualIVON's
    vector prior N(m_old, diag(p_old)^{-1}) round-trip exactly."""
    import vbpc
    from vbpc import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ivon = vbpc.IVON(model.parameters(), lr=0.1, ess=50, weight_decay=1e-3)
    post = ivon.posterior(model)
    opt = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=20, prior=post, model=model)
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model, opt.posterior(model), prior=opt.prior())
    ck = checkpoint.load(path, torch.nn.Linear(4, 3))
    assert ck.prior is not None
    for n in post.names:
        assert torch.equal(ck.prior.mean[n], post.mean[n])
        torch.testing.assert_close(ck.prior.precision[n], post.precision[n])  # λ δ_v = p_old
    checkpoint.save(path, model, post, prior=post.prior())
    assert torch.equal(checkpoint.load(path, torch.nn.Linear(4, 3)).prior.precision["weight"],
                       torch.full((3, 4), 50 * 1e-3))
