"""IVON as a torch.optim.Optimizer: groups, schedulers, closures, state dicts, and bad input.

Every bad input gets a clear error naming the problem and leaves optimizer and model
state untouched (issue: foundation, "Bad input").
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ce_closure
from torch import nn

import vbpc


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


_closure = ce_closure


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in model.parameters() if p in opt.state}
    return params, state


def _assert_unchanged(model, opt, snap):
    params, state = snap
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    for p in model.parameters():
        if id(p) in state:
            for k, v in state[id(p)].items():
                cur = opt.state[p][k]
                assert (torch.equal(cur, v) if torch.is_tensor(v) else cur == v), k


# ----------------------------------------------------------------------------- API
def test_drop_in_constructor_defaults_match_reference():
    import inspect

    sig = inspect.signature(vbpc.IVON.__init__)
    expected = dict(hess_init=1.0, beta1=0.9, beta2=0.99999, weight_decay=1e-4, mc_samples=1, hess_approx="price",
                    clip_radius=float("inf"), sync=False, debias=True, rescale_lr=True)
    for k, v in expected.items():
        assert sig.parameters[k].default == v, k
    names = list(sig.parameters)[1:14]
    assert names == ["params", "lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "mc_samples",
                     "hess_approx", "clip_radius", "sync", "debias", "rescale_lr"]


def test_step_closure_samples_itself_and_returns_mean_loss():
    model = _mlp()
    x, y = _data()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0, mc_samples=4, hess_init=0.1)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(model[0].weight.detach().clone())
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    mean_before = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert len(seen) == 4
    assert all(not torch.equal(s, mean_before) for s in seen)  # the closure ran at weight samples
    assert not torch.equal(seen[0], seen[1])
    assert loss.shape == () and torch.isfinite(loss)


def test_lr_scheduler_acts_immediately():
    x, y = _data()
    runs = []
    for use_sched in (False, True):
        model = _mlp()
        opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if use_sched else 1.0)
        torch.manual_seed(1)
        opt.step(_closure(model, opt, x, y))
        sched.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    before = [p.detach().clone() for p in _mlp().parameters()]
    # lr=0 from the start (LambdaLR sets lr at construction): the mean does not move
    assert all(torch.equal(a, b) for a, b in zip(runs[1], before))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], before))


def test_param_groups_and_named_parameters():
    model = _mlp()
    opt = vbpc.IVON(vbpc.select_parameters(model), lr=0.1, ess=10.0)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert opt.posterior().names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    opt2 = vbpc.IVON([{"params": model[0].parameters()}, {"params": model[2].parameters(), "ess": 5.0}],
                     lr=0.1, ess=10.0)
    post = opt2.posterior(model)
    assert post.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [e.ess for e in post._entries] == [10.0, 10.0, 5.0, 5.0]


def test_posterior_is_a_view_without_copy():
    model = _mlp()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=10.0, weight_decay=0.01)
    post = opt.posterior(model)
    for p, (name, m) in zip(model.parameters(), post.mean.items()):
        assert m is p
        assert post.hess[name] is opt.state[p]["hess"]
    x, y = _data()
    opt.step(_closure(model, opt, x, y))
    p = model[0].weight
    torch.testing.assert_close(post.precision["0.weight"], 10.0 * (opt.state[p]["hess"] + 0.01), rtol=0, atol=0)


def test_load_state_dict_keeps_fp32_state_for_bf16_params_and_moves_device():
    model = _mlp(dtype=torch.bfloat16)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
    x, y = _data()
    opt.step(_closure(model, opt, x.bfloat16(), y))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = vbpc.IVON(model2.parameters(), lr=0.1, ess=100.0)
    opt2.load_state_dict(sd)
    for p, q in zip(model.parameters(), model2.parameters()):
        for k in ("hess", "momentum", "mean"):
            assert opt2.state[q][k].dtype == torch.float32
            assert torch.equal(opt2.state[q][k], opt.state[p][k])
    assert sd["vbpc"]["state_dtype"] == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_state_dict_moves_state_to_cuda():  # pragma: no cover - GPU only
    model = _mlp()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
    x, y = _data()
    opt.step(_closure(model, opt, x, y))
    sd = opt.state_dict()
    model.cuda()
    opt2 = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
    opt2.load_state_dict(sd)
    assert all(opt2.state[p]["hess"].is_cuda for p in model.parameters())
    opt2.step(_closure(model, opt2, x.cuda(), y.cuda()))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
def test_non_finite_loss_or_gradient_raises_and_leaves_state(kind):
    model = _mlp()
    x, y = _data()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
    opt.step(_closure(model, opt, x, y))
    snap = _snapshot(model, opt)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if kind == "nan_loss":
            loss = loss * float("nan")
        elif kind == "inf_loss":
            loss = loss + float("inf")
        loss.backward()
        if kind == "nan_grad":
            model[2].weight.grad[0, 0] = float("nan")
        elif kind == "inf_grad":
            model[0].bias.grad[1] = float("-inf")
        return loss

    with pytest.raises(vbpc.NonFiniteError, match="non-finite") as info:
        opt.step(closure)
    if kind.endswith("grad"):
        assert ("2.weight" in str(info.value)) or ("params[" in str(info.value))
    _assert_unchanged(model, opt, snap)
    assert opt._count == 0
    opt.step(_closure(model, opt, x, y))  # the optimizer is still usable


def test_non_finite_in_manual_sample_names_parameter():
    model = _mlp()
    opt = vbpc.IVON(vbpc.select_parameters(model), lr=0.1, ess=100.0)
    with opt.sampled_params(train=True):
        model(torch.randn(2, 4)).sum().backward()
        model[0].weight.grad.fill_(float("nan"))
    snap = _snapshot(model, opt)
    with pytest.raises(vbpc.NonFiniteError, match="'0.weight'"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_step_without_samples_and_context_misuse():
    model = _mlp()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
    with pytest.raises(vbpc.SamplingError, match="no collected sample"):
        opt.step()
    with opt.sampled_params(train=True):
        with pytest.raises(vbpc.SamplingError, match="nested"):
            with opt.sampled_params():
                pass
        with pytest.raises(vbpc.SamplingError, match="inside sampled_params"):
            opt.step()
        with pytest.raises(vbpc.SamplingError, match="already holds a weight sample"):
            with opt.posterior(model).sampled():
                pass
        model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(vbpc.SamplingError, match="pending"):
        with opt.sampled_params(train=True):
            model(torch.randn(2, 4)).sum().backward()
        opt.state_dict()  # pending samples would be lost
    opt.step()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(ess=0.0), "ess"),
        (dict(ess=float("nan")), "ess"),
        (dict(hess_init=0.0), "hess_init"),
        (dict(beta1=1.5), "beta1"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=-0.1), "beta2"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(mc_samples=0), "mc_samples"),
        (dict(hess_approx="fisher"), "hess_approx"),
        (dict(clip_radius=0.0), "clip_radius"),
        (dict(gradsq_scale="sum"), "gradsq_scale"),
        (dict(parity="jax"), "parity"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    base = dict(lr=0.1, ess=10.0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        vbpc.IVON(_mlp().parameters(), **base)


def test_invalid_group_and_scheduler_values_are_caught_before_update():
    model = _mlp()
    x, y = _data()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "ess": -1.0})
    opt.step(_closure(model, opt, x, y))
    snap = _snapshot(model, opt)
    opt.param_groups[0]["lr"] = -0.5  # e.g. a broken scheduler
    with pytest.raises(ValueError, match="lr"):
        opt.step(_closure(model, opt, x, y))
    _assert_unchanged(model, opt, snap)


def test_weight_decay_change_rechecks_positivity():
    p = nn.Parameter(torch.zeros(3))
    opt = vbpc.IVON([p], lr=0.1, ess=10.0, weight_decay=0.5)
    opt.posterior()  # creates the state
    opt.state[p]["hess"].fill_(-0.4)  # h + δ = 0.1 > 0: legal (h may go negative, §2)
    with opt.sampled_params(train=True):
        p.grad = torch.zeros(3)
    opt.step()
    opt.param_groups[0]["weight_decay"] = 0.1  # now h + δ <= 0
    h_before = opt.state[p]["hess"].clone()
    with pytest.raises(ValueError, match="not positive"):
        with opt.sampled_params(train=True):
            p.grad = torch.zeros(3)
    assert torch.equal(opt.state[p]["hess"], h_before) and torch.equal(p, torch.zeros(3))
    opt.param_groups[0]["weight_decay"] = 0.5
    with opt.sampled_params(train=True):
        p.grad = torch.zeros(3)
    opt.param_groups[0]["weight_decay"] = 0.1  # changed between sampling and step
    with pytest.raises(ValueError, match="not positive"):
        opt.step()
    assert torch.equal(opt.state[p]["hess"], h_before)


def test_parity_mode_rejects_mixed_dtypes():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = vbpc.IVON([a, b], lr=0.1, ess=10.0, parity=True)
    with pytest.raises(ValueError, match="one dtype and device"):
        with opt.sampled_params():
            pass
    assert torch.equal(a, torch.zeros(2)) and torch.equal(b, torch.zeros(2, dtype=torch.float64))
    # outside parity mode mixed dtypes are supported (per-parameter state)
    opt2 = vbpc.IVON([a, b], lr=0.1, ess=10.0)
    with opt2.sampled_params(train=True):
        (a.sum() + b.sum()).backward()
    opt2.step()
    assert opt2.state[a]["hess"].dtype == torch.float32 and opt2.state[b]["hess"].dtype == torch.float64


def test_mismatched_state_dict_is_rejected_without_change():
    model = _mlp()
    x, y = _data()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0)
    opt.step(_closure(model, opt, x, y))
    good = opt.state_dict()
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    oopt = vbpc.IVON(other.parameters(), lr=0.3, ess=7.0)
    oopt.step(_closure(other, oopt, x, y))
    snap = _snapshot(other, oopt)
    with pytest.raises(vbpc.StateDictMismatchError, match="shape"):
        oopt.load_state_dict(good)
    _assert_unchanged(other, oopt, snap)
    assert oopt.param_groups[0]["lr"] == 0.3
    with pytest.raises(vbpc.StateDictMismatchError, match="param groups"):
        vbpc.IVON([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                  lr=0.1, ess=1.0).load_state_dict(good)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sgd.step()
    with pytest.raises(vbpc.StateDictMismatchError, match="not an IVON state"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(vbpc.StateDictMismatchError, match="lacks"):
        opt.load_state_dict({"state": {}})


def test_deepcopy_and_pickle_keep_flags_and_state():
    import pickle

    model = _mlp()
    x, y = _data()
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=100.0, mc_samples=2, hess_approx="gradsq")
    opt.step(_closure(model, opt, x, y))
    m2, o2 = copy.deepcopy((model, opt))
    assert o2.mc_samples == 2 and o2.hess_approx == "gradsq" and o2.current_step == 1
    torch.manual_seed(0)
    opt.step(_closure(model, opt, x, y))
    torch.manual_seed(0)
    o2.step(_closure(m2, o2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))
    o3 = pickle.loads(pickle.dumps(opt))
    assert o3.mc_samples == 2
