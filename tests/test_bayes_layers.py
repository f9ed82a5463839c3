"""vbpc.nn Bayesian layers: persisted precision, posterior interop, sampled forwards.

The precision buffers hold the sum-scale precision S = ess * (h + weight_decay) of
docs/algorithms.md eq. (3); a sampled forward uses m + z / sqrt(S) (eq. 5).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vbpc
from vbpc import DiagonalGaussian
from vbpc.nn import BayesConv2d, BayesEmbedding, BayesLinear, BayesModule, bayesian_layers, sampling
from vbpc.posterior import BAYES_PRECISION_SUFFIX


class Net(nn.Module):
    """Embedding -> conv -> linear, with one plain (non-Bayesian) layer in between."""

    def __init__(self, init_precision: float = 1e4):
        super().__init__()
        self.emb = BayesEmbedding(11, 4, padding_idx=0, init_precision=init_precision)
        self.conv = BayesConv2d(1, 3, 3, padding=1, init_precision=init_precision)
        self.plain = nn.Linear(3 * 4 * 6, 8)
        self.head = BayesLinear(8, 2, init_precision=init_precision)

    def forward(self, ids):
        x = self.emb(ids).unsqueeze(1)  # (B, 1, 6, 4)
        x = self.conv(x).flatten(1)
        return self.head(torch.tanh(self.plain(x)))


BAYES_PARAMS = ["emb.weight", "conv.weight", "conv.bias", "head.weight", "head.bias"]


def ids(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 11, (batch, 6))


def test_buffers_names_dtype_and_init():
    net = Net(init_precision=250.0)
    buffers = dict(net.named_buffers())
    assert sorted(buffers) == sorted(n + BAYES_PRECISION_SUFFIX for n in BAYES_PARAMS)
    params = dict(net.named_parameters())
    for n in BAYES_PARAMS:
        b = buffers[n + "_precision"]
        assert b.shape == params[n].shape and b.dtype == torch.float32
        assert torch.equal(b, torch.full_like(b, 250.0))
    lin = BayesLinear(3, 2, bias=False)
    assert [n for n, _ in lin.named_buffers()] == ["weight_precision"]
    assert torch.equal(lin.weight_precision, torch.full((2, 3), 1e4))
    assert lin.precision_names() == ["weight"] and lin.precision("weight") is lin.weight_precision
    assert isinstance(lin, nn.Linear) and isinstance(net.conv, nn.Conv2d) and isinstance(net.emb, nn.Embedding)
    assert [type(m) for m in bayesian_layers(net)] == [BayesEmbedding, BayesConv2d, BayesLinear]
    assert list(bayesian_layers(lin)) == [lin]


def test_mean_forward_equals_parent_layers():
    torch.manual_seed(1)
    lin, conv, emb = BayesLinear(5, 3), BayesConv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), \
        BayesEmbedding(7, 3, padding_idx=2)
    x, img, tok = torch.randn(4, 5), torch.randn(2, 2, 7, 7), torch.randint(0, 7, (2, 5))
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    ref_conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect")
    ref_conv.load_state_dict({"weight": conv.weight, "bias": conv.bias})
    assert torch.equal(conv(img), ref_conv(img))
    assert torch.equal(emb(tok), F.embedding(tok, emb.weight, padding_idx=2))
    pre = BayesEmbedding.from_pretrained(torch.randn(5, 2), freeze=True)
    assert not pre.weight.requires_grad and pre.weight_precision.shape == (5, 2)


def test_state_dict_round_trip_persists_precision():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for layer in bayesian_layers(net):
            for n in layer.precision_names():
                layer.precision(n).uniform_(1.0, 50.0)
    sd = net.state_dict()
    assert {n + "_precision" for n in BAYES_PARAMS} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = Net(init_precision=3.0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for n, t in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[n], t), n
    # a plain layer cannot silently swallow a Bayesian checkpoint (the buffers are unexpected keys)
    with pytest.raises(RuntimeError, match="weight_precision"):
        nn.Linear(8, 2).load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})


def test_from_module_shares_the_buffers():
    net = Net()
    post = DiagonalGaussian.from_module(net, precision=7.0)
    assert post.names == ["emb.weight", "conv.weight", "conv.bias", "plain.weight", "plain.bias",
                          "head.weight", "head.bias"]
    buffers, params = dict(net.named_buffers()), dict(net.named_parameters())
    for n in BAYES_PARAMS:
        assert post.hess[n] is buffers[n + "_precision"]
        assert post.mean[n] is params[n]
        assert torch.equal(post.precision[n], buffers[n + "_precision"])
    for n in ("plain.weight", "plain.bias"):  # plain layers get the scalar precision
        assert torch.equal(post.precision[n], torch.full_like(params[n], 7.0))
    with torch.no_grad():
        net.head.weight_precision.fill_(123.0)
    assert torch.equal(post.precision["head.weight"], torch.full((2, 8), 123.0))
    # scoped: only the head
    head = DiagonalGaussian.from_module(net, include=r"^head\.")
    assert head.names == ["head.weight", "head.bias"] and head.hess["head.bias"] is net.head.bias_precision


def test_to_module_writes_precision_from_ivon():
    torch.manual_seed(0)
    net = Net()
    opt = vbpc.IVON(vbpc.select_parameters(net), lr=0.05, ess=500.0, weight_decay=1e-3, beta2=0.9)
    batch, target = ids(8), torch.randn(8, 2)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(net(batch), target)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    post = opt.posterior(net)
    expected = post.precision  # ess * (h + weight_decay), a new tensor per name
    assert not torch.allclose(expected["head.weight"], torch.full((2, 8), 1e4))
    post.to_module(net)
    buffers = dict(net.named_buffers())
    for n in BAYES_PARAMS:
        assert torch.equal(buffers[n + "_precision"], expected[n]), n
    assert "plain.weight_precision" not in buffers  # plain layers have nowhere to write to
    # the written posterior round-trips through from_module (ess=1, weight_decay=0 there)
    back = DiagonalGaussian.from_module(net, include=r"^(emb|conv|head)\.")
    for n in back.names:
        torch.testing.assert_close(back.precision[n], expected[n], rtol=0, atol=0)

    # a posterior restored from a state dict writes mean and precision into a fresh net
    fresh = Net(init_precision=1.0)
    saved = DiagonalGaussian.from_state_dict(post.state_dict())
    saved.to_module(fresh)
    for n in BAYES_PARAMS:
        assert torch.equal(dict(fresh.named_parameters())[n], dict(net.named_parameters())[n])
        assert torch.equal(dict(fresh.named_buffers())[n + "_precision"], expected[n])


def test_sampling_context_draws_fresh_weights():
    net = Net(init_precision=100.0)
    x = ids()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    a, b = net(x), net(x)
    assert torch.equal(a, b)  # mean forward is deterministic
    with sampling(net) as m:
        assert m is net
        assert all(layer.sample_weights for layer in bayesian_layers(net))
        s1, s2 = net(x), net(x)
        assert not torch.equal(s1, s2) and not torch.equal(s1, a)
        with sampling(net, enabled=False):  # nested: mean forward again
            assert torch.equal(net(x), a)
        assert all(layer.sample_weights for layer in bayesian_layers(net))
        # gradients reach the means through the reparameterisation
        s1.square().sum().backward()
    assert all(net.get_parameter(n).grad is not None for n in BAYES_PARAMS)
    assert not any(layer.sample_weights for layer in bayesian_layers(net))
    assert torch.equal(net(x), a)
    for n, p in net.named_parameters():  # the stored parameters were never modified
        assert torch.equal(p.detach(), before[n]), n
    # a single layer can be switched by hand, too
    net.head.sample_weights = True
    assert not torch.equal(net(x), net(x))


def test_embedding_padding_row_is_not_sampled():
    emb = BayesEmbedding(6, 3, padding_idx=0, init_precision=1.0)
    tok = torch.tensor([[0, 1, 0, 5]])
    with sampling(emb):
        out = emb(tok)
    assert torch.equal(out[0, 0], torch.zeros(3)) and torch.equal(out[0, 2], torch.zeros(3))
    assert not torch.equal(out[0, 1], emb.weight[1].detach())


def test_sample_variance_matches_closed_form():
    torch.manual_seed(0)
    layer = BayesLinear(5, 3, init_precision=1.0)
    with torch.no_grad():
        layer.weight_precision.copy_(torch.linspace(0.5, 20.0, 15).reshape(3, 5))
        layer.bias_precision.copy_(torch.tensor([2.0, 8.0, 40.0]))
    x = torch.tensor([[0.3, -1.2, 2.0, 0.7, -0.4]])
    n = 20_000
    with torch.no_grad(), sampling(layer):
        draws = torch.cat([layer(x) for _ in range(n)]).double()  # one weight draw per forward
    # Var[sum_j w_ij x_j + b_i] = sum_j x_j^2 / S_ij + 1 / S_b,i
    var = (x.double().square() / layer.weight_precision.double()).sum(1) + 1 / layer.bias_precision.double()
    torch.testing.assert_close(draws.var(0), var, rtol=0.05, atol=0)
    mean = F.linear(x, layer.weight, layer.bias).detach().double()[0]
    assert ((draws.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()


def test_sampling_restores_flags_after_exception():
    net = Net()
    net.conv.sample_weights = True  # mixed previous flags are restored individually
    with pytest.raises(KeyError, match="inside"):
        with sampling(net):
            assert all(layer.sample_weights for layer in bayesian_layers(net))
            raise KeyError("inside")
    assert [layer.sample_weights for layer in bayesian_layers(net)] == [False, True, False]
    with pytest.raises(RuntimeError, match="inside"):
        with sampling(net, enabled=False):
            assert not any(layer.sample_weights for layer in bayesian_layers(net))
            raise RuntimeError("inside")
    assert [layer.sample_weights for layer in bayesian_layers(net)] == [False, True, False]
    with pytest.raises(ValueError, match="no Bayesian layer"):
        with sampling(nn.Sequential(nn.Linear(2, 2))):
            pass


@pytest.mark.parametrize(("bad", "error"), [(0.0, ValueError), (-1, ValueError), (float("nan"), ValueError),
                                            (float("inf"), ValueError), ("1e3", TypeError), (True, TypeError)])
def test_invalid_init_precision_raises(bad, error):
    for make in (lambda: BayesLinear(2, 2, init_precision=bad),
                 lambda: BayesConv2d(1, 1, 3, init_precision=bad),
                 lambda: BayesEmbedding(3, 2, init_precision=bad)):
        with pytest.raises(error, match="init_precision"):
            make()
    with pytest.raises(error, match="init_precision"):
        BayesLinear(2, 2).reset_precision(bad)


def test_reset_precision_and_dtype_conversion_keep_float32():
    net = Net()
    net.head.reset_precision(5.0)
    assert torch.equal(net.head.bias_precision, torch.full((2,), 5.0))
    net.head.reset_precision()
    assert torch.equal(net.head.bias_precision, torch.full((2,), 1e4))
    net.to(torch.float64)
    assert net.head.weight.dtype == torch.float64
    assert all(b.dtype == torch.float32 for _, b in net.named_buffers())
    with sampling(net):
        out = net(ids())
    assert out.dtype == torch.float64
    net.bfloat16()
    assert net.conv.weight.dtype == torch.bfloat16 and net.conv.weight_precision.dtype == torch.float32
    assert isinstance(net.head, BayesModule)


def test_posterior_sampled_uses_buffer_precision():
    """DiagonalGaussian.sampled on a Bayes net perturbs with std 1/sqrt(buffer) and restores."""
    layer = BayesLinear(200, 100, bias=False, init_precision=1.0)
    with torch.no_grad():
        layer.weight_precision[:50].fill_(4.0)  # std 0.5 in the first half of the rows
    post = DiagonalGaussian.from_module(layer)
    before = layer.weight.detach().clone()
    with post.sampled(layer):
        noise = layer.weight.detach() - before
    assert torch.equal(layer.weight.detach(), before)
    assert math.isclose(noise[:50].std().item(), 0.5, rel_tol=0.05)
    assert math.isclose(noise[50:].std().item(), 1.0, rel_tol=0.05)
