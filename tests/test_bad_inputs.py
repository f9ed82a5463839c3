"""The bad-input catalogue: every case asserts a clear error type and message *and* that the state
(parameters, optimizer state, posterior, anchor, files on disk) is unchanged afterwards."""

from __future__ import annotations

import copy
import json
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
        # IVON-PoCo evaluates the anchor pass first, then the current pass
        loss = F.cross_entropy(model(x), y) * (float("nan") if len(calls) == 1 else 1.0)
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
    assert err == ("vbpc: error: unknown config key 'tasks.epoch'; did you mean 'tasks.epochs'? (valid keys: "
                   "tasks.scenario, tasks.n_tasks, tasks.train_size, tasks.test_size, tasks.batch_size, tasks.epochs, "
                   "tasks.memory_per_task, tasks.memory_batch_size, tasks.memory_weight, tasks.tempered_weight, "
                   "tasks.old_posterior, tasks.old_mean, tasks.old_posterior_mc, tasks.converge_tol, "
                   "tasks.converge_max_epochs, tasks.clamp_memory_curvature, tasks.memory_curvature_every, tasks.ess, "
                   "tasks.memory_curvature_mc, tasks.root) (vbpc continual)\n")  # one line, no traceback
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(ConfigError, match="unknown config key 'tasks.epoch'"):  # --debug: the exception itself
        main(["continual", "--set", "tasks.epoch=2", "--set", f"out={tmp_path}", "--debug"])


def test_24_empty_dataset_for_prediction():
    model, opt, _, _ = _setup()
    with pytest.raises(ValueError, match="empty|no batch"):
        vbpc.predictive.predict(model, [], opt.posterior(model), 2)


# ---------------------------------------------------------------------------- hyperparameters
BAD_LEARNER_VALUES = [("lr", float("inf")), ("lr", float("nan")), ("lr", -1.0), ("ess", float("inf")),
                      ("ess", float("nan")), ("ess", 0.0)]


@pytest.mark.parametrize("cls", [vbpc.IVON, vbpc.IVONPoCo, vbpc.IVONPoCoMo], ids=lambda c: c.__name__)
@pytest.mark.parametrize("key,value", BAD_LEARNER_VALUES, ids=lambda v: str(v))
def test_25_infinite_or_nan_hyperparameters_refused_at_construction(cls, key, value):
    model = nn.Linear(4, 3)
    kw = {"lr": 0.1, "ess": 32.0, **({} if cls is vbpc.IVON else {"anchor_period": 5}), key: value}
    with pytest.raises(ValueError, match=f"invalid {key}={value!r} in the constructor"):
        cls(model.parameters(), **kw)


@pytest.mark.parametrize("kind", ["ivon", "poco"])
@pytest.mark.parametrize("key,value", [("lr", float("inf")), ("lr", float("nan")), ("ess", float("inf"))])
def test_26_infinite_hyperparameter_set_by_a_scheduler_changes_nothing(kind, key, value):
    model, opt, x, y = _setup(**({} if kind == "ivon" else POCO))
    snap = _snap(model, opt)
    opt.param_groups[0][key] = value  # what LambdaLR with a bad lambda or a user's loop does
    with pytest.raises(ValueError, match=f"invalid {key}={value!r} in param group 0"):
        opt.step(_closure(model, opt, x, y))
    opt.param_groups[0][key] = snap[1]["param_groups"][0][key]
    assert _unchanged(model, opt, snap)
    sched_model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    sched_opt = vbpc.IVON(sched_model.parameters(), lr=0.1, ess=32.0)
    sched = torch.optim.lr_scheduler.LambdaLR(sched_opt, lambda s: float("inf") if s >= 1 else 1.0)
    sched_opt.step(_closure(sched_model, sched_opt, x, y))
    sched.step()  # a scheduler sets lr = inf
    snap = _snap(sched_model, sched_opt)
    with pytest.raises(ValueError, match="invalid lr=inf in param group 0"):
        sched_opt.step(_closure(sched_model, sched_opt, x, y))
    assert _unchanged(sched_model, sched_opt, snap)


def test_27_zero_draws_are_refused():
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="invalid mc_samples=0: must be an int >= 1"):
        vbpc.IVON(model.parameters(), lr=0.1, ess=10.0, mc_samples=0)
    with pytest.raises(ValueError, match="invalid mc_samples=0 in param group 1: must be an int >= 1"):
        opt = vbpc.IVON([{"params": [model.weight]}], lr=0.1, ess=10.0)
        opt.add_param_group({"params": [model.bias], "mc_samples": 0})
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="pretrained_posterior needs mc_samples >= 1"):
        vbpc.pretrained_posterior(model, lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)], ess=8.0,
                                  mc_samples=0, progress=False)
    prior = vbpc.IVON(model.parameters(), lr=0.1, ess=8.0).posterior(model)
    cont = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=8.0, prior=prior, model=model, correction=True,
                              memory_weight=8.0)
    with pytest.raises(ValueError, match=r"mc_samples must be an int >= 1, got 0"):
        cont.set_memory_curvature(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)], mc_samples=0)
    assert getattr(cont, "memory_hess", None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="tasks.memory_curvature_mc must be > 0, got 0"):
        load_config(None, ["tasks.memory_curvature_mc=0"], cls=vbpc.config.ContinualConfig)


# ---------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", "data.batch_size must be > 0, got 0"),
    ("data.train_size=-1999", "data.train_size must be > 0, got -1999"),
    ("data.test_batch_size=-5", "data.test_batch_size must be > 0, got -5"),
    ("schedule.epochs=0", "schedule.epochs must be > 0, got 0"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps must be >= 0, got -1"),
    ("run.log_every=0", "run.log_every must be > 0, got 0"),
    ("run.checkpoint_every=-3", "run.checkpoint_every must be > 0, got -3"),
    ("run.max_steps=0", "run.max_steps must be > 0, got 0"),
    ("eval.test_samples=-1", "eval.test_samples must be >= 0, got -1"),
    ("learner.lr=.inf", "learner.lr must be > 0 and finite, got inf"),
    ("learner.lr=.nan", "learner.lr must be > 0 and finite, got nan"),
    ("learner.weight_decay=-0.1", "learner.weight_decay must be >= 0 and finite, got -0.1"),
    ("anchor.alpha=1.5", r"anchor.alpha must be in \[0, 1\], got 1.5"),
    ("anchor.period=0", "anchor.period must be > 0, got 0"),
    ("learner.name=ivn", "learner.name must be one of .* did you mean 'ivon'"),
    ("schedule.scheduler=cosin", "schedule.scheduler must be one of .*did you mean 'cosine'"),
    ("run.seed=-1", r"run.seed must be in \[0, 2\*\*32\)"),
    ("data.root=/nonexistent/fmnist", "data.root: directory '/nonexistent/fmnist' does not exist"),
    ("data.name=digits", "'digits' has a single split of 1,797 images"),
])
def test_28_train_config_ranges_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("cls,override,message", [
    ("ContinualConfig", "tasks.batch_size=0", "tasks.batch_size must be > 0"),
    ("ContinualConfig", "tasks.epochs=0", "tasks.epochs must be > 0"),
    ("ContinualConfig", "tasks.n_tasks=-1", "tasks.n_tasks must be > 0"),
    ("ContinualConfig", "tasks.train_size=-5", "tasks.train_size must be > 0"),
    ("ContinualConfig", "test_samples=-1", "test_samples must be >= 0"),
    ("ContinualConfig", "seeds=[]", "seeds must not be empty"),
    ("ContinualConfig", "seeds=[1, 1]", "seeds lists a value twice"),
    ("ContinualConfig", "methods=[poco, ewc]", r"methods\[1\] must be one of"),
    ("ContinualConfig", "tasks.ess=al", "tasks.ess must be one of .*did you mean 'all'"),
    ("MergeConfig", "base_size=0", "base_size must be > 0"),
    ("MergeConfig", "base_epochs=-2", "base_epochs must be > 0"),
])
def test_29_workflow_config_ranges_name_the_key(cls, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], cls=getattr(vbpc.config, cls))


def test_30_yaml_is_read_strictly(tmp_path, monkeypatch):
    dup = tmp_path / "dup.yaml"
    dup.write_text("learner:\n  lr: 0.1\n  lr: 0.3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'lr' \(line 3; first at line 2\)"):
        load_config(dup)
    sci = tmp_path / "sci.yaml"
    sci.write_text("learner:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    cfg = load_config(sci)
    assert cfg.learner.lr == 0.001 and cfg.learner.weight_decay == 0.0005  # numbers, not strings
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, ["run.out=~/x"]).run.out == str(tmp_path / "x")
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02\xff\xfe")
    with pytest.raises(ConfigError, match="is not a UTF-8 text file"):
        load_config(binary)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"a: 1\x00")
    with pytest.raises(ConfigError, match="holds NUL bytes"):
        load_config(nul)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("learner: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tagged)


# ---------------------------------------------------------------------------- loading state
def _ivon_state():
    model, opt, x, y = _setup()
    return model, opt, opt.state_dict()


@pytest.mark.parametrize("corrupt,err,message", [
    (lambda sd: sd["state"][0]["hess"].fill_(float("nan")), NonFiniteError, "state 'hess' of parameter 0 holds NaN"),
    (lambda sd: sd["state"][0]["hess"].fill_(-1.0), StateDictMismatchError, "h \\+ weight_decay <= 0"),
    (lambda sd: sd["state"][0]["momentum"].fill_(float("inf")), NonFiniteError, "'momentum' of parameter 0 holds"),
    (lambda sd: sd["vbpc"].update(state_dtype="float3"), StateDictMismatchError, "state_dtype='float3' is not a"),
    (lambda sd: sd["vbpc"].update(state_dtype="nn"), StateDictMismatchError, "state_dtype='nn' is not a floating"),
    (lambda sd: sd["vbpc"].update(mc_samples=0), StateDictMismatchError, "mc_samples=0 is not an int >= 1"),
    (lambda sd: sd["param_groups"][0].update(lr=float("inf")), ValueError, "invalid lr=inf in saved param group 0"),
])
def test_31_ivon_load_state_dict_validates_before_loading(corrupt, err, message):
    model, opt, sd = _ivon_state()
    bad = copy.deepcopy(sd)
    corrupt(bad)
    snap = _snap(model, opt)
    with pytest.raises(err, match=message):
        opt.load_state_dict(bad)
    assert _unchanged(model, opt, snap)


def test_32_ivon_opt_and_adamw_state_dicts_are_named():
    import ivon

    model, opt, x, y = _setup()
    ref = ivon.IVON(model.parameters(), lr=0.1, ess=32)
    with pytest.raises(StateDictMismatchError, match="state dict of the reference IVON \\(ivon-opt"):
        opt.load_state_dict(ref.state_dict())
    adamw = torch.optim.AdamW(model.parameters())
    _closure(model, adamw, x, y)()
    adamw.step()
    snap = _snap(model, opt)
    with pytest.raises(StateDictMismatchError, match="not an IVON state"):
        opt.load_state_dict(adamw.state_dict())
    assert _unchanged(model, opt, snap)


@pytest.mark.parametrize("corrupt,err,message", [
    (lambda s: s["hess"]["0.weight"].fill_(float("nan")), NonFiniteError, "mean or hess holds NaN"),
    (lambda s: s["hess"]["0.weight"].fill_(-1.0), ValueError, "negative entries or zero precision"),
    (lambda s: s["ess"].update({"0.weight": float("inf")}), ValueError, "ess must be a finite number > 0"),
    (lambda s: s["weight_decay"].update({"0.weight": -1.0}), ValueError, "weight_decay must be a finite number >= 0"),
    (lambda s: s["mean"].update({"0.weight": "x"}), StateDictMismatchError, "must be tensors"),
])
def test_33_posterior_from_state_dict_validates(corrupt, err, message):
    model, opt, _, _ = _setup()
    state = copy.deepcopy(opt.posterior(model).state_dict())
    corrupt(state)
    with pytest.raises(err, match=message):
        vbpc.DiagonalGaussian.from_state_dict(state)


# ---------------------------------------------------------------------------- closures and parameters
def test_34_closure_without_backward_or_returning_none(capsys):
    model, opt, x, y = _setup()
    snap = _snap(model, opt)

    def no_backward():
        opt.zero_grad()
        return F.cross_entropy(model(x), y)

    with pytest.raises(SamplingError, match="must call loss.backward\\(\\)"):
        opt.step(no_backward)
    assert _unchanged(model, opt, snap) and opt._count == 0

    def returns_none():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    with pytest.raises(TypeError, match="the closure returned None; it must return the loss"):
        opt.step(returns_none)
    assert _unchanged(model, opt, snap) and opt._count == 0


def test_35_frozen_only_and_meta_models():
    model = nn.Linear(4, 3).requires_grad_(False)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=10.0)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="no parameter of the learner requires grad \\(a frozen model\\)"):
        opt.step(lambda: model(x).sum())
    assert not opt.state
    with torch.device("meta"):
        meta = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="is on the meta device and holds no values; materialise"):
        vbpc.IVON(meta.named_parameters(), lr=0.1, ess=10.0)


# ---------------------------------------------------------------------------- evaluation
def test_36_prediction_on_non_finite_inputs():
    model, opt, x, y = _setup()
    bad = x.clone()
    bad[3, 1] = float("nan")
    for post, n in ((None, 0), (opt.posterior(model), 2)):
        with pytest.raises(NonFiniteError, match="inputs to predict hold NaN or inf \\(1 of 64 values\\)"):
            vbpc.predictive.predict(model, [(bad, y)], post, n)
    inf = x.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        vbpc.predictive.predict_batch(model, inf)


def test_37_evaluate_refuses_split_task_checkpoints_and_a_missing_gpu(tmp_path, capsys):
    from vbpc.cli import main

    model = vbpc.models.build_model("mlp", hidden=[8])
    path = tmp_path / "poco_seed0.safetensors"
    checkpoint.save(path, model, spec={"name": "mlp", "kwargs": {"hidden": [8]}},
                    extra={"method": "poco", "config": {"tasks": {"scenario": "split"}}})
    assert main(["evaluate", str(path), "--out", str(tmp_path / "report"), "--device", "cpu"]) == 2
    assert "is a split-task continual checkpoint: each task's logits are masked" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
    if not torch.cuda.is_available():
        assert main(["evaluate", str(path), "--device", "cuda", "--out", str(tmp_path / "report")]) == 2
        assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err


# ---------------------------------------------------------------------------- models from specs
@pytest.mark.slow
def test_38_torchvision_models_build_locally_and_never_download(tmp_path):
    from vbpc.models import build_model

    model = build_model("torchvision", name="resnet18", num_classes=10, in_channels=1)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 1
    with pytest.raises(ValueError, match="only loads local weight files \\(no downloads\\)"):
        build_model("torchvision", name="resnet18", weights="DEFAULT")
    weights = tmp_path / "r18.pth"
    torch.save(model.state_dict(), weights)
    again = build_model("torchvision", name="resnet18", num_classes=10, in_channels=1, weights=str(weights))
    assert torch.equal(again.fc.weight, model.fc.weight)
    # a checkpoint's spec never loads or downloads weights: the checkpoint holds them
    path = tmp_path / "tv.safetensors"
    checkpoint.save(path, model, spec={"name": "torchvision", "kwargs": {"name": "resnet18", "num_classes": 10,
                                                                         "in_channels": 1, "weights": "DEFAULT"}})
    ck = checkpoint.load(path)
    assert torch.equal(ck.model.fc.weight, model.fc.weight) and "weights" not in ck.spec["kwargs"]


def test_39_a_huge_model_spec_is_refused_before_allocation(tmp_path, monkeypatch):
    from vbpc.models import build_model

    with pytest.raises(ValueError, match="would hold 40,159,200,010 values, above the limit of 2,000,000,000"):
        build_model("mlp", hidden=[200000, 200000])
    monkeypatch.setenv("VBPC_MAX_PARAMS", "1000")
    with pytest.raises(ValueError, match="above the limit of 1,000 \\(set VBPC_MAX_PARAMS"):
        build_model("mlp", hidden=[64])
    monkeypatch.delenv("VBPC_MAX_PARAMS")
    path = tmp_path / "huge.safetensors"
    checkpoint.save(path, nn.Linear(2, 2), spec={"name": "mlp", "kwargs": {"hidden": [200000, 200000]}})
    with pytest.raises(ValueError, match="would hold 40,159,200,010 values"):
        checkpoint.load(path)
    with pytest.raises(ValueError, match="model 'mlp': .*unexpected keyword argument 'hiden'"):
        build_model("mlp", hiden=[3])


# ---------------------------------------------------------------------------- files and checkpoints
def test_40_a_fifo_or_directory_is_not_a_checkpoint(tmp_path):
    fifo = tmp_path / "ck.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a FIFO, not a regular checkpoint"):  # and no hang
        checkpoint.load(fifo)
    with pytest.raises(IsADirectoryError, match="is a directory, not a checkpoint"):
        checkpoint.load(tmp_path)


def _crafted(tmp_path, header):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "crafted.safetensors"
    text = header if isinstance(header, str) else json.dumps(header)
    save_file({"model/weight": torch.zeros(2, 2)}, str(path), metadata={"vbpc": text})
    return path


@pytest.mark.parametrize("model_skeleton,message", [
    ({"__dict__": [["weight", {"__tensor__": "model/nowhere"}]]}, "names a tensor 'model/nowhere'"),
    ({"__dict__": [["weight"]]}, "malformed '__dict__' entry"),
    ({"__dict__": "x"}, "malformed '__dict__' entry"),
    ({"__list__": 5}, "malformed '__list__' entry"),
    ({"__dict__": [["weight", {"__dtype__": "load"}]]}, "unknown dtype 'load'"),
    ({"__dict__": [["weight", {"__dtype__": "nn"}]]}, "unknown dtype 'nn'"),
    ({"__dict__": [["weight", {"__dtype__": ["float32"]}]]}, "unknown dtype"),
    (["not", "a", "mapping"], "the model weights and 'extra' must be mappings"),
])
def test_41_crafted_checkpoint_headers_are_corrupt_checkpoints(tmp_path, model_skeleton, message):
    header = {"format": checkpoint.FORMAT, "model": model_skeleton, "posterior": None, "spec": None, "extra": {},
              "state": None, "prior": None}
    target = nn.Linear(2, 2)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(CorruptCheckpointError, match=message):
        checkpoint.load(_crafted(tmp_path, header), target)
    assert _same(target.state_dict(), before)


def test_42_deeply_nested_headers_and_bad_specs(tmp_path):
    deep = ('{"format": "' + checkpoint.FORMAT + '", "model": {"__dict__": [["weight", '
            + '{"__list__": [' * 100_000 + '{"__tensor__": "model/weight"}' + ']}' * 100_000 + ']]}, "extra": {}}')
    with pytest.raises(CorruptCheckpointError, match="corrupt vbpc header: RecursionError"):
        checkpoint.load(_crafted(tmp_path, deep), nn.Linear(2, 2))
    shallow: object = {"__tensor__": "model/weight"}
    for _ in range(100):  # parses as JSON, but deeper than any state vbpc writes
        shallow = {"__list__": [shallow]}
    header = {"format": checkpoint.FORMAT, "model": {"__dict__": [["weight", shallow]]}, "spec": None, "extra": {}}
    with pytest.raises(CorruptCheckpointError, match="nested deeper than 64 levels"):
        checkpoint.load(_crafted(tmp_path, header), nn.Linear(2, 2))
    for spec in ({"name": 3}, {"name": "mlp", "kwargs": [1]}, "mlp"):
        header = {"format": checkpoint.FORMAT, "model": {"__dict__": []}, "spec": spec, "extra": {}}
        with pytest.raises(CorruptCheckpointError, match="malformed model spec"):
            checkpoint.load(_crafted(tmp_path, header))
    for skeleton in ([1, 2], "text", 3):
        with pytest.raises(CorruptCheckpointError, match="corrupt vbpc header"):
            checkpoint.load(_crafted(tmp_path, json.dumps(skeleton) if skeleton == "text" else skeleton))


def test_43_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        vbpc.io.atomic_write_text(tmp_path / "private.txt", "x")
        model = nn.Linear(2, 2)
        checkpoint.save(tmp_path / "private.safetensors", model)
    finally:
        os.umask(old)
    assert oct((tmp_path / "private.txt").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "private.safetensors").stat().st_mode & 0o777) == "0o600"
    old = os.umask(0o002)
    try:
        vbpc.io.atomic_write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "shared.txt").stat().st_mode & 0o777) == "0o664"


# ---------------------------------------------------------------------------- the command line
def test_44_cli_errors_are_one_line_and_unexpected_ones_point_to_debug(tmp_path, capsys, monkeypatch):
    from vbpc import cli

    assert cli.main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vbpc: error: {tmp_path} is a directory, not a checkpoint")
    assert cli.main(["train", "--set", "data.batch_size=0"]) == 2
    assert capsys.readouterr().err == "vbpc: error: data.batch_size must be > 0, got 0 (vbpc train)\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(["train", str(cfg)]) == 2
    assert "is not a UTF-8 text file" in capsys.readouterr().err

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_info", boom)
    parser = cli.build_parser  # the info subcommand binds _info at build time
    monkeypatch.setattr(cli, "build_parser", lambda *a: _with_func(parser(*a), "info", boom))
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err == ("vbpc: error: unexpected RuntimeError: a bug (vbpc info); rerun with --debug "
                                       "for the traceback\n")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["--debug", "info"])


def _with_func(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


@pytest.mark.slow
def test_45_continual_and_merge_validate_everything_before_touching_files(tmp_path, capsys):
    from vbpc.cli import main

    for command, extra in (("continual", []), ("merge-eval", [])):
        out = tmp_path / command
        out.mkdir()
        (out / "metrics.jsonl").write_text("precious\n")
        for bad in ("model.kwargs={hiden: [8]}", "learner.kwargs={bet2: 0.9}", "tasks.n_tasks=9",
                    "learner.lr=.inf", "tasks.root=/nonexistent"):
            rc = main([command, "--set", f"out={out}", "--set", "tasks.train_size=50", "--set", bad, *extra])
            assert rc == 2, bad
            assert capsys.readouterr().err.startswith("vbpc: error: ")
            assert (out / "metrics.jsonl").read_text() == "precious\n" and sorted(os.listdir(out)) == ["metrics.jsonl"]
        # a valid config does not replace earlier results without --overwrite
        rc = main([command, "--set", f"out={out}", "--set", "tasks.train_size=50", "--set", "seeds=[0]"])
        assert rc == 2 and "already holds results (metrics.jsonl); pass --overwrite" in capsys.readouterr().err
        assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_46_run_directory_lock_names_the_holder(tmp_path):
    from vbpc.errors import RunLockedError
    from vbpc.io import run_lock

    with run_lock(tmp_path, "vbpc train"):
        with pytest.raises(RunLockedError, match=f"is in use by PID {os.getpid()} \\(vbpc train\\)"):
            with run_lock(tmp_path, "vbpc continual"):
                pass
    with run_lock(tmp_path, "vbpc continual"):  # released on exit
        pass


def test_47_vsgd_poco_closures_and_learning_rates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match="invalid lr=inf"):
        vbpc.SVRG(model.parameters(), lr=float("inf"), anchor_period=5)
    opt = vbpc.SVRG(model.parameters(), lr=0.1, anchor_period=5)
    opt.refresh(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)], progress=False)
    opt.step(_closure(model, opt, x, y))
    snap = _snap(model, opt)

    def no_backward():
        opt.zero_grad()
        return F.cross_entropy(model(x), y)

    def returns_none():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    with pytest.raises(SamplingError, match="must call loss.backward\\(\\)"):
        opt.step(no_backward)
    with pytest.raises(TypeError, match="SVRG.step\\(closure\\): the closure returned None"):
        opt.step(returns_none)
    opt.param_groups[0]["lr"] = float("inf")
    with pytest.raises(ValueError, match="invalid lr=inf in param group 0"):
        opt.step(_closure(model, opt, x, y))
    opt.param_groups[0]["lr"] = 0.1
    assert _unchanged(model, opt, snap)
