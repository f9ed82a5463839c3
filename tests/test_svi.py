"""Pyro interoperability: Bayes-by-backprop via SVI and vbpc posteriors exported as Pyro guides."""

from __future__ import annotations

import copy
import math
import time

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.integrations.pyro import (
    FLAT_SITE,
    OBS_SITE,
    PROBS_SITE,
    BayesByBackprop,
    PosteriorGuide,
    PyroNetModel,
    to_pyro,
    to_pyro_guide,
    to_pyro_model,
)
from vbpc.models import MLP
from vbpc.training import evaluate, make_loader, train_epoch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny ops (one per Monte-Carlo draw): a single intra-op thread is as fast when the
    machine is idle and avoids 10-50x slowdowns from OpenMP oversubscription when it is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist("train"), load_fashion_mnist("test")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


@torch.no_grad()
def _vbpc_probs(post: vbpc.GaussianPosterior, model: torch.nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` BMA draws of softmax(model(x)) with vbpc's own sampler: shape (n, N, C)."""
    out = []
    for _ in range(n):
        with post.sampled(model):
            out.append(F.softmax(model(x), dim=-1))
    return torch.stack(out)


@torch.no_grad()
def _pyro_probs(pyro_model: PyroNetModel, guide, x: torch.Tensor, n: int, chunk: int = 250) -> torch.Tensor:
    """``n`` draws of the ``probs`` site from ``pyro.infer.Predictive``: shape (n, N, C)."""
    parts = []
    for k in range(0, n, chunk):
        pred = pyro.infer.Predictive(pyro_model, guide=guide, num_samples=min(chunk, n - k), return_sites=(PROBS_SITE,))
        parts.append(pred(x)[PROBS_SITE])
    return torch.cat(parts)


def _max_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |mean difference| in units of its Monte-Carlo standard error (per entry)."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    return float(((a.mean(0) - b.mean(0)).abs() / (se + 1e-7)).max())


# ----------------------------------------------------------------------------- BBB on real data
@pytest.mark.slow
def test_bbb_fashion_mnist_accuracy(fmnist):
    """BBB (Pyro SVI, TraceMeanField_ELBO) trains vbpc's MLP to >= 80% test accuracy in one epoch.

    Measured (hidden 128, batch 256, lr 3e-3, init_scale 1e-2, ess 60000, seeds 0-4): mean
    predictor 0.843-0.849, 8-sample BMA 0.842-0.849; about 3.5 s of training on 2 idle cores."""
    train, test = fmnist
    torch.manual_seed(0)
    model = MLP(784, (128,), 10)
    before = _state(model)
    bbb = BayesByBackprop(model, ess=len(train), weight_decay=1e-4, init_scale=1e-2, lr=3e-3)
    loader = make_loader(train, 256, shuffle=True, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    history = bbb.fit(loader, epochs=1, progress=False)
    seconds = time.perf_counter() - t0
    assert len(history) == 1 and math.isfinite(history[0])
    xt, yt = test.tensors
    acc_mean = float((bbb.predict(xt, 0).argmax(-1) == yt).float().mean())
    probs = bbb.predict(xt, 16)
    acc_bma = float((probs.argmax(-1) == yt).float().mean())
    assert torch.allclose(probs.sum(-1), torch.ones(len(xt)), atol=1e-5)
    # the same posterior scored by vbpc's own evaluation code on the untouched source module
    post = bbb.posterior()
    assert _same_state(model, before)  # BBB trained a copy
    acc_vbpc = evaluate(model, make_loader(test, 2000), post, n_samples=4)["accuracy"]
    print(f"BBB: {seconds:.1f}s train, test acc mean {acc_mean:.4f}, BMA16 {acc_bma:.4f}, vbpc BMA4 {acc_vbpc:.4f}")
    assert acc_mean >= 0.80 and acc_bma >= 0.80 and acc_vbpc >= 0.80
    # copy_to writes the mean into the source: vbpc's mean predictor equals BBB's
    bbb.copy_to()
    with torch.no_grad():
        assert torch.allclose(F.softmax(model(xt[:256]), -1), bbb.predict(xt[:256], 0), atol=1e-6)


# ----------------------------------------------------------------------------- BBB objective
def test_bbb_elbo_scaling_and_analytic_kl():
    r"""-ELBO = (ess/|B|) Σ_B NLL + KL(q‖p), the KL unscaled and in closed form: with σ → 0 the
    likelihood is at the mean, and the KL equals vbpc's DiagonalGaussian KL to the prior."""
    torch.manual_seed(1)
    model = MLP(5, (4,), 3)
    ess, wd = 250.0, 0.02
    bbb = BayesByBackprop(model, ess=ess, weight_decay=wd, init_scale=1e-6)
    post = bbb.posterior()
    kl = float(post.kl(post.prior()))
    assert kl > 0
    with torch.no_grad():
        for n in (8, 32):
            x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
            expected = ess * float(F.cross_entropy(model(x), y)) + kl
            assert bbb.loss(x, y) * ess == pytest.approx(expected, rel=1e-5)
            tr = poutine.trace(bbb.model).get_trace(x, y)
            assert tr.nodes[OBS_SITE]["scale"] == pytest.approx(ess / n)
            for name in bbb.site_names:
                assert tr.nodes[name]["scale"] == 1.0 and not tr.nodes[name]["cond_indep_stack"]
    # the guide has no auxiliary sites, so TraceMeanField_ELBO uses kl_divergence(Normal, Normal)
    gtr = poutine.trace(bbb.guide).get_trace()
    assert [n for n, s in gtr.nodes.items() if s["type"] == "sample"] == bbb.site_names
    assert all(isinstance(gtr.nodes[n]["fn"].base_dist, pyro.distributions.Normal) for n in bbb.site_names)


def test_bbb_posterior_matches_guide_and_prior():
    torch.manual_seed(2)
    model = MLP(6, (5,), 3)
    ess = 1000.0
    bbb = BayesByBackprop(model, ess=ess, prior_std=0.3, init_scale=0.05, lr=1e-2)
    assert bbb.weight_decay == pytest.approx(1.0 / (ess * 0.09))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    for _ in range(20):
        assert math.isfinite(bbb.step(x, y))
    post = bbb.posterior()
    assert isinstance(post, vbpc.DiagonalGaussian)
    assert post.names == [n for n, _ in model.named_parameters()]
    for n in post.names:
        assert torch.allclose(post.std[n], bbb.guide.scale(n), rtol=1e-6, atol=0)
        assert torch.equal(post.mean[n], bbb.guide.loc(n))
        assert not torch.allclose(bbb.guide.scale(n), torch.full_like(post.std[n], 0.05))  # it learned
    for e in post._entries:
        assert e.ess == ess and e.weight_decay == pytest.approx(bbb.weight_decay)
        assert e.target is dict(model.named_parameters())[e.name]
    for s in post.prior().std.values():
        assert torch.allclose(s, torch.full_like(s, 0.3), rtol=1e-6)
    # the snapshot is unaffected by further training
    m0 = {n: t.clone() for n, t in post.mean.items()}
    bbb.step(x, y)
    assert all(torch.equal(post.mean[n], m0[n]) for n in m0)


def test_bbb_keeps_global_param_store_clean_and_instances_apart():
    pyro.clear_param_store()
    torch.manual_seed(3)
    model = MLP(4, (3,), 2)
    a = BayesByBackprop(model, ess=100.0, scope="last_layer", lr=0.05)
    b = BayesByBackprop(model, ess=100.0, scope="last_layer", lr=0.05)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for _ in range(5):
        a.step(x, y)
    assert len(pyro.get_param_store()) == 0
    # b never stepped: its point-estimated first layer is still the source's value
    w0 = dict(model.named_parameters())["layers.0.weight"].detach()
    assert torch.equal(b.model.net.layers[0].weight.detach(), w0)
    assert not torch.equal(a.model.net.layers[0].weight.detach(), w0)  # a trained it (point estimate)
    # plain Pyro calls on a learner's model and guide work too, still without the global store
    with torch.no_grad():
        probs = pyro.infer.Predictive(a.model, guide=a.guide, num_samples=3, return_sites=(PROBS_SITE,))(x)
    assert probs[PROBS_SITE].shape == (3, 16, 2)
    svi = pyro.infer.SVI(b.model, b.guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.TraceMeanField_ELBO())
    svi.step(x, y)
    assert len(pyro.get_param_store()) == 0
    assert not torch.equal(b.model.net.layers[0].weight.detach(), w0)
    assert pyro.settings.get("module_local_params") is False  # the caller's setting is restored
    assert a.site_names == ["layers.2.weight", "layers.2.bias"]
    # copy_to writes the point estimates and the last-layer mean into another copy
    target = copy.deepcopy(model)
    a.copy_to(target)
    with torch.no_grad():
        assert torch.equal(target.layers[0].weight, a.model.net.layers[0].weight)
        assert torch.equal(target.layers[2].bias, a.guide.loc("layers.2.bias"))


def test_bbb_gaussian_likelihood_and_arguments():
    torch.manual_seed(4)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(64)
    net = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
    bbb = BayesByBackprop(net, ess=64.0, likelihood="gaussian", noise_std=0.1, weight_decay=1e-2, lr=0.05,
                          init_scale=1e-3, num_particles=2)
    first = bbb.step(x, y)
    for _ in range(150):
        last = bbb.step(x, y)
    assert last < first
    pred = bbb.predict(x, 8)
    assert pred.shape == y.shape and float((pred - y).pow(2).mean()) < 0.1
    with pytest.raises(ValueError, match="not both"):
        BayesByBackprop(net, ess=10.0, weight_decay=1e-3, prior_std=1.0)
    with pytest.raises(ValueError, match="likelihood"):
        BayesByBackprop(net, ess=10.0, likelihood="poisson")
    with pytest.raises(ValueError, match="ess"):
        BayesByBackprop(net, ess=0.0)
    with pytest.raises(ValueError, match="init_scale"):
        BayesByBackprop(net, ess=10.0, init_scale=0.0)


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def ivon_posterior(fmnist):
    """A briefly IVON-trained MLP on real Fashion-MNIST with non-trivial stds (small ess)."""
    train, test = fmnist
    torch.manual_seed(5)
    model = MLP(784, (32,), 10)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=500, hess_init=1.0)
    sub = torch.utils.data.TensorDataset(*(t[:3840] for t in train.tensors))
    train_epoch(model, opt, make_loader(sub, 128, shuffle=True), F.cross_entropy, progress=False)
    return model, opt.posterior(model), test.tensors[0][:64]


@pytest.mark.slow
def test_predictive_matches_vbpc_diagonal(ivon_posterior):
    """Pyro's Predictive with the exported guide samples vbpc's own BMA (same distribution)."""
    model, post, x = ivon_posterior
    before, mean0 = _state(model), {n: t.clone() for n, t in post.mean.items()}
    pyro_model, guide = to_pyro(post, model)
    assert _same_state(model, before)
    n = 2000
    pv, pp = _vbpc_probs(post, model, x, n), _pyro_probs(pyro_model, guide, x, n)
    spread = float(pv.std(0).mean())
    z = _max_z(pv, pp)
    print(f"diagonal: max |vbpc - pyro| = {z:.2f} standard errors (S={n}, mean sample std {spread:.3f})")
    assert spread > 0.01  # the test is not vacuous
    assert z < 5.0
    assert _same_state(model, before)
    assert all(torch.equal(post.mean[k], mean0[k]) for k in mean0)


def test_predictive_delta_limit_is_the_mean_predictor(ivon_posterior):
    model, _, x = ivon_posterior
    post = vbpc.DiagonalGaussian.from_module(model, precision=1e16)  # σ = 1e-8
    with torch.no_grad():
        mean_probs = F.softmax(model(x), dim=-1)
    pyro_model, guide = to_pyro(post, model)
    pp = _pyro_probs(pyro_model, guide, x, 3)
    pv = _vbpc_probs(post, model, x, 3)
    assert (pp - mean_probs).abs().max() < 1e-5
    assert (pv - mean_probs).abs().max() < 1e-5
    iso = vbpc.IsotropicGaussian.from_module(model, sigma=0.0)  # delta guide
    pi = _pyro_probs(to_pyro_model(model, iso), to_pyro_guide(iso, model), x, 2)
    assert (pi - mean_probs).abs().max() < 1e-6


@pytest.mark.slow
def test_predictive_matches_vbpc_isotropic_and_full(ivon_posterior):
    model, _, x = ivon_posterior
    x = x[:16]
    before = _state(model)
    iso = vbpc.IsotropicGaussian.from_module(model, sigma=0.03)
    n = 400
    z_iso = _max_z(_vbpc_probs(iso, model, x, n), _pyro_probs(*to_pyro(iso, model), x, n))
    # full Gaussian over the last layer (330 parameters), a random SPD precision
    last = [(k, p) for k, p in model.named_parameters() if k.startswith("layers.2")]
    d = sum(p.numel() for _, p in last)
    a = torch.randn(d, d, dtype=torch.float64) / math.sqrt(d)
    full = vbpc.FullGaussian.from_module(model, "last_layer", precision=400 * (a @ a.T + 0.5 * torch.eye(d,
                                                                                                      dtype=torch.float64)))
    pyro_model, guide = to_pyro(full, model)
    assert pyro_model.site_names == [k for k, _ in last]
    z_full = _max_z(_vbpc_probs(full, model, x, n), _pyro_probs(pyro_model, guide, x, n))
    print(f"isotropic: {z_iso:.2f} SE, full: {z_full:.2f} SE (S={n})")
    assert z_iso < 5.0 and z_full < 5.0
    # the guide's joint site has the full covariance: check the per-site samples' second moments
    with torch.no_grad():
        draws = pyro.infer.Predictive(pyro_model, guide=guide, num_samples=600,
                                      return_sites=("layers.2.bias",))(x)["layers.2.bias"].double().reshape(600, 10)
    cov = torch.cov((draws - full.mean["layers.2.bias"].double()).T, correction=0)
    true = full.covariance()[-10:, -10:]
    assert (cov - true).abs().max() < 6 * true.diagonal().max() / math.sqrt(600)
    assert _same_state(model, before)


def test_site_names_shapes_and_buffers(ivon_posterior):
    model, post, x = ivon_posterior
    pyro_model, guide = to_pyro(post, model)
    assert isinstance(guide, PosteriorGuide) and guide.site_names == post.names == pyro_model.site_names
    tr = poutine.trace(poutine.replay(pyro_model, trace=poutine.trace(guide).get_trace(x))).get_trace(x)
    for n, p in model.named_parameters():
        assert tr.nodes[n]["type"] == "sample" and not tr.nodes[n]["is_observed"]
        assert tuple(tr.nodes[n]["value"].shape) == tuple(p.shape)
        assert tr.nodes[n]["fn"].event_shape == p.shape
    assert tr.nodes[OBS_SITE]["value"].shape == (len(x),)
    # a last-layer model keeps the other parameters as fixed buffers (no Pyro params at all)
    ll = to_pyro_model(model, "last_layer", prior_std=1.0)
    assert ll.site_names == ["layers.2.weight", "layers.2.bias"]
    assert list(ll.parameters()) == []
    assert torch.equal(dict(ll.net.named_buffers())["layers.0.weight"], model.layers[0].weight)
    assert FLAT_SITE not in tr.nodes


def test_mismatched_posterior_raises(ivon_posterior):
    model, post, x = ivon_posterior
    before = _state(model)
    other = MLP(784, (16,), 10)  # same names, other shapes
    with pytest.raises(ValueError, match="shape"):
        to_pyro_guide(post, other)
    with pytest.raises(ValueError, match="shape"):
        to_pyro_model(other, post)
    renamed = vbpc.DiagonalGaussian.from_module(torch.nn.Sequential(torch.nn.Linear(784, 32)))  # "0.weight"
    with pytest.raises(ValueError, match="not parameters"):
        to_pyro_guide(renamed, model)
    full_model = to_pyro_model(model)  # latent sites: all four tensors
    last = vbpc.DiagonalGaussian.from_module(model, "last_layer")
    with pytest.raises(ValueError, match="does not cover|not match"):
        to_pyro_guide(last, full_model)
    with pytest.raises(ValueError, match="not match"):
        to_pyro_guide(post, to_pyro_model(model, "last_layer"))
    with pytest.raises(TypeError):
        to_pyro_guide({"layers.0.weight": torch.zeros(1)}, model)  # type: ignore[arg-type]
    assert _same_state(model, before)


def test_tied_parameters_rejected():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    with pytest.raises(ValueError, match="tied"):
        to_pyro_model(Tied())
    with pytest.raises(ValueError, match="tied"):
        BayesByBackprop(Tied(), ess=10.0)
