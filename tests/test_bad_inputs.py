"""The bad-input catalogue: every case asserts a clear error type and message *and* that the state
(parameters, optimizer state, posterior, anchor, files on disk) is unchanged afterwards."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vbpc
from vbpc import checkpoint
from vbpc.config import ConfigError, load_config
from vbpc.errors import CorruptCheckpointError, NonFiniteError, SamplingError, StateDictMismatchError
from vbpc.io import atomic_path


def _setup(cls=vbpc.IVON, steps: int = 2, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = cls(model.parameters(), lr=0.1, ess=32, **kw)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(steps):
        if getattr(opt, "refresh_due", False):
            opt.refresh(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)], progress=False)
        opt.step(_closure(model, opt, x, y))
    return model, opt, x, y


def _closure(model, opt, x, y, scale=1.0):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * scale
        loss.backward()
        return loss
    return closure


def _snap(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b or (a != a and b != b)


def _unchanged(model, opt, snap) -> bool:
    return _same(model.state_dict(), snap[0]) and _same(opt.state_dict(), snap[1])


POCO = dict(cls=vbpc.IVONPoCo, alpha=1.0, anchor_period=5)


# ---------------------------------------------------------------------------- learners
@pytest.mark.parametrize("kind", ["ivon", "poco"])
def test_01_nan_loss(kind):
    model, opt, x, y = _setup(**({} if kind == "ivon" else POCO))
    snap = _snap(model, opt)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        opt.step(_closure(model, opt, x, y, scale=float("nan")))
    assert _unchanged(model, opt, snap)


def test_02_inf_gradient_names_the_parameter():
    model, opt, x, y = _setup()
    snap = _snap(model, opt)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model[2].weight.grad[0, 0] = float("inf")
        return loss.detach()
    with pytest.raises(NonFiniteError, match="gradient for parameter"):
        opt.step(closure)
    assert _unchanged(model, opt, snap)


def test_03_step_without_samples():
    model, opt, _, _ = _setup()
    snap = _snap(model, opt)
    with pytest.raises(SamplingError, match="no collected sample"):
        opt.step()
    assert _unchanged(model, opt, snap)


def test_04_nested_sampling_contexts():
    model, opt, _, _ = _setup()
    snap = _snap(model, opt)
    with pytest.raises(SamplingError, match="already active"):
        with opt.sampled_params():
            with opt.sampled_params():
                pass
    assert _unchanged(model, opt, snap)


def test_05_exception_inside_the_sampling_context_restores_the_means():
    model, opt, x, _ = _setup()
    snap = _snap(model, opt)
    with pytest.raises(KeyError, match="user error"):
        with opt.sampled_params(train=True):
            model(x).sum().backward()
            raise KeyError("user error")
    assert _unchanged(model, opt, snap) and opt._count == 0


def test_06_invalid_hyperparameter_names_it():
    model, opt, x, y = _setup()
    snap = _snap(model, opt)
    opt.param_groups[0]["beta2"] = 1.5  # e.g. a broken scheduler
    with pytest.raises(ValueError, match="invalid beta2=1.5 in param group 0"):
        opt.step(_closure(model, opt, x, y))
    opt.param_groups[0]["beta2"] = snap[1]["param_groups"][0]["beta2"]
    assert _unchanged(model, opt, snap)


def test_07_integer_parameters_are_refused():
    with pytest.raises(TypeError, match="floating-point parameters.*int64"):
        vbpc.IVON([torch.zeros(3, dtype=torch.int64)], lr=0.1, ess=1)


def test_08_wrong_input_dtype_leaves_no_sample_behind():
    model, opt, x, y = _setup()
    snap = _snap(model, opt)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step(_closure(model, opt, x.double(), y))
    assert _unchanged(model, opt, snap) and opt._count == 0


def test_09_optimizer_state_of_another_model():
    model, opt, _, _ = _setup()
    snap = _snap(model, opt)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    _, other_opt, _, _ = _setup()
    bad = vbpc.IVON(other.parameters(), lr=0.1, ess=32)
    torch.manual_seed(0)
    bad.step(_closure(other, bad, torch.randn(4, 4), torch.randint(0, 3, (4,))))
    with pytest.raises((StateDictMismatchError, ValueError), match="shape|size|parameter"):
        opt.load_state_dict(bad.state_dict())
    assert _unchanged(model, opt, snap)


def test_10_refresh_due_but_not_done():
    model, opt, x, y = _setup(steps=0, **POCO)
    snap = _snap(model, opt)
    with pytest.raises(SamplingError, match="refresh is due at step 0"):
        opt.step(_closure(model, opt, x, y))
    assert _unchanged(model, opt, snap)


def test_11_refresh_over_an_empty_loader():
    model, opt, _, _ = _setup(**POCO)
    snap = _snap(model, opt)
    with pytest.raises(ValueError, match="empty iterable"):
        opt.refresh(lambda b: F.cross_entropy(model(b[0]), b[1]), [], progress=False)
    assert _unchanged(model, opt, snap)


def test_12_anchor_of_the_wrong_shape():
    model, opt, _, _ = _setup(**POCO)
    snap = _snap(model, opt)
    sd = copy.deepcopy(opt.state_dict())
    sd["vbpc"]["poco"]["anchor"]["mean"][0] = torch.zeros(3, 3)
    with pytest.raises(StateDictMismatchError, match=r"anchor mean\[0\] has shape \(3, 3\)"):
        opt.load_state_dict(sd)
    assert _unchanged(model, opt, snap)


def test_13_nan_at_the_anchor_pass():
    model, opt, x, y = _setup(**POCO)
    snap = _snap(model, opt)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("nan") if len(calls) == 2 else 1.0)
        loss.backward()
        return loss
    with pytest.raises(NonFiniteError, match="anchor sample"):
        opt.step(closure)
    assert _unchanged(model, opt, snap)


def test_14_continual_correction_without_memory():
    model, opt, x, y = _setup()
    cont = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=32, prior=opt.posterior(model), correction=True,
                              memory_weight=10)
    snap = _snap(model, cont)
    with pytest.raises(ValueError, match="replay memory"):
        cont.step(_closure(model, cont, x, y))
    assert _unchanged(model, cont, snap)


# ---------------------------------------------------------------------------- posterior
def test_15_posterior_state_of_another_model():
    model, opt, _, _ = _setup()
    post = opt.posterior(model)
    before = copy.deepcopy(post.state_dict())
    other = copy.deepcopy(before)
    other["mean"]["0.weight"] = torch.zeros(2, 2)
    other["hess"]["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(StateDictMismatchError, match="0.weight: saved mean shape"):
        post.load_state_dict(other)
    assert _same(post.state_dict(), before)


def test_16_nested_posterior_sampling():
    model, opt, _, _ = _setup()
    post = opt.posterior(model)
    snap = _snap(model, opt)
    with pytest.raises(SamplingError, match="cannot be nested"):
        with post.sampled():
            with post.sampled():
                pass
    assert _unchanged(model, opt, snap)


# ---------------------------------------------------------------------------- metrics
def test_17_metrics_reject_bad_probabilities_labels_and_shapes():
    with pytest.raises(ValueError, match="do not sum to 1"):
        vbpc.metrics.ece(torch.tensor([[0.5, 0.6]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels out of range: found 3"):
        vbpc.metrics.nll(torch.tensor([[0.5, 0.5]]), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"labels has shape \(1,\)"):
        vbpc.metrics.accuracy(torch.tensor([[0.5, 0.5], [0.2, 0.8]]), torch.tensor([0]))


# ---------------------------------------------------------------------------- checkpoints and files
def test_18_truncated_and_corrupt_checkpoints(tmp_path):
    model, opt, _, _ = _setup()
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model, opt.posterior(model))
    data = path.read_bytes()
    target = copy.deepcopy(model)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    before = copy.deepcopy(target.state_dict())
    for name, blob in (("trunc", data[: len(data) // 2]), ("junk", b"\x00garbage" * 20)):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
            checkpoint.load(bad, target)
        assert _same(target.state_dict(), before)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.safetensors", target)


def test_19_checkpoint_from_another_architecture(tmp_path):
    model, opt, _, _ = _setup()
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model, opt.posterior(model))
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(StateDictMismatchError, match="do not fit Sequential.*shape mismatch"):
        checkpoint.load(path, other)
    assert _same(other.state_dict(), before)


def test_20_interrupted_write_keeps_the_previous_file(tmp_path):
    model, opt, _, _ = _setup()
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model, opt.posterior(model))
    data = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
    assert path.read_bytes() == data and sorted(os.listdir(tmp_path)) == ["c.safetensors"]
    assert checkpoint.load(path, copy.deepcopy(model)).posterior is not None


# ---------------------------------------------------------------------------- data, models, configs, CLI
def test_21_model_input_checks_name_the_mismatch():
    from vbpc.models import LeNet5

    with pytest.raises(ValueError, match="channel"):
        LeNet5()(torch.randn(2, 3, 28, 28))


def test_22_configs_unknown_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'learner.lr'"):
        load_config(None, ["learner.lrr=0.1"])
    with pytest.raises(ConfigError, match="schedule.epochs: expected an integer"):
        load_config(None, ["schedule.epochs=two"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_23_cli_reports_a_config_error(tmp_path, capsys):
    from vbpc.cli import main

    assert main(["continual", "--set", "tasks.epoch=2", "--set", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == ("vbpc: error: unknown config key 'tasks.epoch'; did you mean 'tasks.epochs'? "
                   "(vbpc continual)\n")  # one line, no traceback
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(ConfigError, match="unknown config key 'tasks.epoch'"):  # --debug: the exception itself
        main(["continual", "--set", "tasks.epoch=2", "--set", f"out={tmp_path}", "--debug"])


def test_24_empty_dataset_for_prediction():
    model, opt, _, _ = _setup()
    with pytest.raises(ValueError, match="empty|no batch"):
        vbpc.predictive.predict(model, [], opt.posterior(model), 2)
