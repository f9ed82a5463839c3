"""A generic test matrix over the learner registry, in the style of PyTorch's ``optim_db``/``OptimizerInfo``
(``torch/testing/_internal/common_optimizers.py``).

Every entry of :data:`vbpc.inference.registry.LEARNERS` (plus ``continual-ivon+memory``, the continual
learner with its replay-memory correction, whose step takes ``memory=``) runs the shared guarantees on a
tiny problem (a 3-4-2 MLP, ``small_options``).  Where an entry's capability flag says a feature is
unsupported the test asserts that the use is *refused* with an error (never silently wrong), and skips
with the reason where a refusal makes no sense (e.g. a ``torch.optim`` baseline cannot be made to refuse).

Guarantees: state_dict round trip, bitwise resume (6 steps straight = 3 + save/rebuild/load + 3),
non-finite losses and gradients refused with no state change, per-group learning rates, LR schedulers,
foreach = single-tensor, DDP ``sync`` (one spawn for every learner), the BatchNorm policy, ``torch.compile``,
bf16 parameters with fp32 state, ``needs_closure``, ``supports_sample``; and the named constructors as
user code writes them.

Known learner bugs are marked ``xfail(strict=True)`` in :data:`KNOWN_BUGS` with the precise reason.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn
from torch.nn import functional as F

import vbpc
from vbpc.errors import NonFiniteError, SamplingError
from vbpc.inference.registry import LEARNERS, LearnerInfo


# ----------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """A registry entry and the extra options of this variant (on top of ``small_options``)."""

    id: str
    info: LearnerInfo
    extra: dict = field(default_factory=dict)

    @property
    def memory(self) -> bool:
        """The step takes ``memory=`` (ContinualIVON with the replay-memory correction)."""
        return bool(self.extra.get("correction"))

    @property
    def baseline(self) -> bool:
        """A ``torch.optim`` baseline: vbpc cannot make it refuse anything or check finiteness."""
        return self.info.cls_name.startswith("torch.")

    def options(self, **over: Any) -> dict:
        return {**self.info.small_options, **self.extra, **over}

    def build(self, params: Any, **over: Any) -> Any:
        params = list(params)
        if self.info.cls_name == "vbpc.ContinualIVON" and "model" in over and "prior" not in over:
            over["prior"] = _named_prior(params, over["model"], self.options())
        return self.info.build(params, **self.options(**over))


def _named_prior(params: Any, model: nn.Module, options: dict) -> Any:
    """IVON's initial posterior at the parameters' values, named after ``model``'s parameters (ContinualIVON
    matches its prior by name when it is given ``model=``)."""
    params = list(params)
    kw = {k: options[k] for k in ("lr", "ess", "hess_init", "weight_decay") if k in options}
    return copy.deepcopy(vbpc.IVON(params, **kw).posterior(model)).bind(model)


#: VON's small options use the exact Hessian, which is indefinite on the tanh MLP (P + δI stops being positive
#: definite after a few steps): the Price Hessian with the PD correction keeps the full family usable here
_FULL = {"hessian": "price"}
CASES = [Case(name, info, dict(_FULL) if info.family == "full" else {}) for name, info in LEARNERS.items()]
if "continual-ivon" in LEARNERS:
    CASES.append(Case("continual-ivon+memory", LEARNERS["continual-ivon"],
                      {"correction": True, "memory_weight": 50.0}))

#: (test, case id) -> the reason of a known learner bug (the test is an xfail(strict=True) there)
KNOWN_BUGS: dict[tuple[str, str], str] = {}  # none open: VON's groups, VON's anchor count and bf16 refusals fixed


def cases(test: str, select: Optional[Callable[[Case], bool]] = None) -> list:
    out = []
    for c in CASES:
        if select is not None and not select(c):
            continue
        reason = KNOWN_BUGS.get((test, c.id))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (two spin-wait against each other on the shared CPUs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------- the problem
def _problem():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(24, 3, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(24, generator=g) > 0).long()
    xm = torch.randn(8, 3, generator=g) + 0.5  # the replay memory (another distribution, for the BN check)
    ym = (xm[:, 0] > 0.5).long()
    return x, y, xm, ym


X, Y, XM, YM = _problem()
BATCHES = [(X[i:i + 8], Y[i:i + 8]) for i in (0, 8, 16)]
MEGA = [(X[:12], Y[:12]), (X[12:], Y[12:])]  # the anchor's mega-batch, in two chunks
STEPS = 6  # the small options refresh at t = 0 and t = 5: the resume crosses a refresh


def _model(seed: int = 0, dtype: torch.dtype = torch.float32, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = ([nn.BatchNorm1d(3)] if bn else []) + [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)]
    return nn.Sequential(*layers).to(dtype)


def _closure(case: Case, model: nn.Module, opt: Any, xb, yb, fwd=None, poison: Optional[str] = None):
    """The learner's closure convention (``closure_backward``); ``poison`` makes the loss NaN or inf, or
    the loss finite with a NaN gradient (d sqrt(w - w) at 0 is inf - inf)."""
    fwd = model if fwd is None else fwd

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(fwd(xb).float(), yb)
        if poison == "nan-loss":
            loss = loss * float("nan")
        elif poison == "inf-loss":
            loss = loss * float("inf")
        elif poison == "nan-grad":
            w = next(model.parameters())
            loss = loss + torch.sqrt(w - w).sum()
        if case.info.closure_backward:
            loss.backward()
        return loss
    return closure


def _step(case: Case, model: nn.Module, opt: Any, t: int, fwd=None, poison: Optional[str] = None, **kw):
    xb, yb = BATCHES[t % len(BATCHES)]
    closure = _closure(case, model, opt, xb, yb, fwd, poison)
    if case.memory:
        kw["memory"] = _closure(case, model, opt, XM, YM, fwd)
    return opt.step(closure, **kw)


def _refresh_if_due(case: Case, opt: Any, fwd) -> bool:
    if case.info.anchored and opt.refresh_due:
        opt.refresh(lambda b: F.cross_entropy(fwd(b[0]).float(), b[1]), MEGA, progress=False)
        return True
    return False


def _drive(case: Case, model: nn.Module, opt: Any, t0: int, t1: int, fwd=None) -> None:
    """Steps ``t0..t1-1`` over the fixed batches, refreshing the anchor when it is due."""
    fwd = model if fwd is None else fwd
    for t in range(t0, t1):
        _refresh_if_due(case, opt, fwd)
        _step(case, model, opt, t, fwd)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: Any, b: Any, path: str = "state_dict") -> None:
    """Bitwise equality of nested state (tensors: dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs " \
                                                         f"{sorted(map(str, b)) if isinstance(b, dict) else b}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _differs(a: Any, b: Any) -> bool:
    try:
        _assert_same(a, b)
    except AssertionError:
        return True
    return False


def _tensors(tree: Any):
    """Every tensor in a nested state."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def test_the_matrix_covers_the_registry():
    assert len(LEARNERS) >= 10
    assert {c.info.name for c in CASES} == set(LEARNERS)
    for c in CASES:  # the small options build, and the learner is a torch optimizer
        opt = c.build(_model().parameters())
        assert isinstance(opt, torch.optim.Optimizer)
        if c.info.anchored:
            assert opt.refresh_due and not opt.anchor.ready


# ----------------------------------------------------------------------------------------- 1. state_dict
@pytest.mark.parametrize("case", cases("state_dict"))
def test_state_dict_round_trip(case):
    model = _model()
    opt = case.build(model.parameters())
    torch.manual_seed(1)
    _drive(case, model, opt, 0, 3)
    if case.info.anchored:
        assert opt.anchor.ready
    sd = copy.deepcopy(opt.state_dict())
    model2 = _model(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = case.build(model2.parameters())
    opt2.load_state_dict(copy.deepcopy(sd))
    _assert_same(opt2.state_dict(), sd)
    _assert_same(opt.state_dict(), sd)  # state_dict() has no side effect
    rng = torch.get_rng_state()
    _step(case, model, opt, 3)
    torch.set_rng_state(rng)
    _step(case, model2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    _assert_same(opt2.state_dict(), opt.state_dict())
    assert _differs(opt.state_dict(), sd)  # the step did change the state


# ----------------------------------------------------------------------------------------- 2. resume
@pytest.mark.parametrize("case", cases("resume"))
def test_bitwise_resume(case):
    model = _model()
    opt = case.build(model.parameters())
    torch.manual_seed(1)
    _drive(case, model, opt, 0, STEPS)
    straight, straight_sd = _params(model), opt.state_dict()

    model = _model()
    opt = case.build(model.parameters())
    torch.manual_seed(1)
    _drive(case, model, opt, 0, STEPS // 2)
    saved = copy.deepcopy({"opt": opt.state_dict(), "model": model.state_dict(), "rng": torch.get_rng_state()})
    del model, opt
    torch.manual_seed(99)  # the process state the resumed run starts from is irrelevant
    model = _model(seed=7)
    model.load_state_dict(saved["model"])
    opt = case.build(model.parameters())
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    _drive(case, model, opt, STEPS // 2, STEPS)
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)
    _assert_same(opt.state_dict(), straight_sd)
    if case.info.anchored:
        assert opt.anchor.refreshes >= 1 and opt.anchor.step == 5  # the resumed run refreshed at t = 5


# ----------------------------------------------------------------------------------------- 3. non-finite
@pytest.mark.parametrize("case", cases("nonfinite"))
def test_nonfinite_loss_or_gradient_is_refused_and_changes_nothing(case):
    if case.baseline:
        pytest.skip("torch.optim baseline: it has no non-finite check (not vbpc code)")
    model = _model()
    opt = case.build(model.parameters())
    torch.manual_seed(1)
    _drive(case, model, opt, 0, 3)
    rng = torch.get_rng_state()
    ref = copy.deepcopy((model, opt))  # the clean continuation
    _step(case, ref[0], ref[1], 3)
    clean = _params(ref[0])
    before, sd = _params(model), copy.deepcopy(opt.state_dict())
    for poison in ("nan-loss", "inf-loss", "nan-grad"):
        with pytest.raises(NonFiniteError):
            _step(case, model, opt, 3, poison=poison)
        for a, b in zip(before, model.parameters()):
            assert torch.equal(a, b), poison
        _assert_same(opt.state_dict(), sd, f"{poison}: state_dict")
    torch.set_rng_state(rng)  # nothing left over: the next clean step is the clean run's
    _step(case, model, opt, 3)
    for a, b in zip(clean, model.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- 4. param groups
@pytest.mark.parametrize("case", cases("param_groups"))
def test_param_groups_lr_zero_group_does_not_move(case):
    model = _model()
    params = list(model.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.0}]
    if not case.info.supports_param_groups:
        with pytest.raises((ValueError, TypeError), match="group"):
            opt = case.build(groups)
            torch.manual_seed(1)
            _drive(case, model, opt, 0, 3)
        return
    opt = case.build(groups)
    assert [g["lr"] for g in opt.param_groups] == [case.options()["lr"], 0.0]
    before = _params(model)
    torch.manual_seed(1)
    _drive(case, model, opt, 0, STEPS)
    for a, b in zip(before[2:], params[2:]):
        assert torch.equal(a, b)  # lr = 0: the mean stays put
    assert all(not torch.equal(a, b) for a, b in zip(before[:2], params[:2]))  # the other group trains


# ----------------------------------------------------------------------------------------- 5. LR scheduler
@pytest.mark.parametrize("case", cases("scheduler"))
def test_lr_scheduler_sets_the_lr_the_step_uses(case):
    lr = case.options()["lr"]
    runs = []
    for scheduled in (True, False):
        model = _model()
        opt = case.build(model.parameters(), **({} if scheduled else {"lr": lr * 0.5}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 if e == 0 else 0.0) if scheduled else None
        assert opt.param_groups[0]["lr"] == lr * 0.5
        torch.manual_seed(1)
        _drive(case, model, opt, 0, 3)
        runs.append((model, opt, sched))
    (m1, o1, sched), (m2, o2, _) = runs
    for p, q in zip(m1.parameters(), m2.parameters()):  # scheduled lr*0.5 == constructed with lr*0.5
        assert torch.equal(p, q)
    sched.step()  # the factor drops to 0
    assert all(g["lr"] == 0.0 for g in o1.param_groups)
    before, sd = _params(m1), copy.deepcopy(o1.state_dict())
    _step(case, m1, o1, 3)
    for a, b in zip(before, m1.parameters()):
        assert torch.equal(a, b)  # lr 0: the mean does not move ...
    assert _differs(o1.state_dict(), sd)  # ... but the step ran


# ----------------------------------------------------------------------------------------- 6. foreach
@pytest.mark.parametrize("case", cases("foreach"))
def test_foreach_equals_single_tensor(case):
    if not case.info.supports_foreach:
        if case.baseline:
            pytest.skip("torch.optim baseline")
        with pytest.raises(TypeError, match="foreach"):
            case.build(_model().parameters(), foreach=True)
        return
    out = []
    for fe in (True, False):
        model = _model()
        opt = case.build(model.parameters(), foreach=fe)
        torch.manual_seed(1)
        _drive(case, model, opt, 0, STEPS)
        out.append((_params(model), opt.state_dict()))
    (p1, sd1), (p2, sd2) = out
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    s1, s2 = list(_tensors(sd1["state"])), list(_tensors(sd2["state"]))
    assert len(s1) == len(s2) > 0
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- 7. DDP sync
def _sync_cases() -> list[Case]:
    return [c for c in CASES if c.info.supports_sync and not c.baseline]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        res = {}
        for case in _sync_cases():
            for phase, seed in (("same", 7), ("per-rank", 7 + rank)):  # the weight-sample noise
                model = _model()
                opt = case.build(model.parameters(), sync=True)
                torch.manual_seed(seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("error", RuntimeWarning)  # no "ranks drift apart" warning
                    _drive(case, model, opt, 0, STEPS)
                res[case.id, phase] = _params(model)
        torch.save(res, f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks done before teardown
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """ONE spawn of two gloo ranks that runs every sync-capable learner (same data on each rank)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", cases("sync", lambda c: c.info.supports_sync and not c.baseline))
def test_ddp_sync_equals_one_process(case, ddp_results):
    """Same data and noise on both ranks: the all-reduced mean is one process's update (a sum would double
    it); per-rank noise: the ranks still hold the identical posterior (only if sync averages)."""
    r0, r1 = ddp_results
    model = _model()
    opt = case.build(model.parameters())
    torch.manual_seed(7)
    _drive(case, model, opt, 0, STEPS)
    for a, b, c in zip(r0[case.id, "same"], r1[case.id, "same"], model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(r0[case.id, "per-rank"], r1[case.id, "per-rank"]):
        assert torch.equal(a, b)
    if case.options().get("sigma", 1.0) != 0.0 and case.info.family != "none":  # noisy: per-rank samples differ
        assert any(not torch.equal(a, b) for a, b in zip(r0[case.id, "per-rank"], r0[case.id, "same"]))


@pytest.mark.parametrize("case", cases("sync_refused", lambda c: not c.info.supports_sync))
def test_sync_refused_where_unsupported(case):
    with pytest.raises(TypeError, match="sync"):
        case.build(_model().parameters(), sync=True)


# ----------------------------------------------------------------------------------------- 8. BatchNorm
def _bn_update(rm, rv, n, xb, momentum=0.1):
    return (1 - momentum) * rm + momentum * xb.mean(0), (1 - momentum) * rv + momentum * xb.var(0, unbiased=True), n + 1


@pytest.mark.parametrize("case", cases("batchnorm"))
def test_batchnorm_running_stats_follow_the_policy(case):
    """BatchNorm on the input, so a pass's statistics update depends on the batch only: with ``model=``
    every step updates the running statistics exactly once (the first current pass: its batch, then the
    memory batch for the replay correction, which evaluates both at the current sample), never by extra
    MC passes, anchor passes or refreshes."""
    model = _model(bn=True)
    bn = model[0]
    if not case.info.supports_model_norm:
        if case.baseline:
            pytest.skip("torch.optim baseline: no model= (plain PyTorch BatchNorm semantics)")
        with pytest.raises(TypeError, match="model"):
            case.build(model.parameters(), model=model)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the model has BatchNorm"
        try:  # two MC samples where the learner takes them: the extra pass must not count either
            opt = case.build(model.parameters(), model=model, mc_samples=2)
        except TypeError:
            opt = case.build(model.parameters(), model=model)
    torch.manual_seed(1)
    rm, rv, n = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    anchor_steps = 0
    for t in range(3):
        _refresh_if_due(case, opt, model)
        anchor_steps += int(case.info.anchored and opt.alpha != 0.0)
        _step(case, model, opt, t)
        rm, rv, n = _bn_update(rm, rv, n, BATCHES[t % 3][0])
        if case.memory:
            rm, rv, n = _bn_update(rm, rv, n, XM)
        assert int(bn.num_batches_tracked) == n
        torch.testing.assert_close(bn.running_mean, rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, rv, rtol=1e-5, atol=1e-6)
    assert anchor_steps >= 2 or not case.info.anchored  # the anchor passes did run (and were undone)


def _bn_forward(model: nn.Module, theta: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """The running mean of ``model``'s BatchNorm after train-mode forwards of ``inputs`` at weights ``theta``."""
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, t in zip(m.parameters(), theta):
            p.copy_(t.reshape(p.shape))
        for x in inputs:
            m(x)
    return m[1].running_mean.clone()


def _anchor_means(opt: Any, model: nn.Module) -> list[torch.Tensor]:
    means = [t.detach().float() for t in opt.anchor.mean]
    params = list(model.parameters())
    if len(means) == 1 and len(params) > 1:  # VON: one flat vector
        return list(torch.split(means[0], [p.numel() for p in params]))
    return means


@pytest.mark.parametrize("case", cases("batchnorm_pass", lambda c: c.info.supports_model_norm and (
    c.info.anchored or c.memory)))
def test_batchnorm_the_current_pass_updates_not_the_anchor_pass(case):
    """BatchNorm after the first layer, the mean moved far from the anchor: the statistics a step leaves are
    those of a forward at the current mean (up to the weight noise), not at the anchor's."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = case.build(model.parameters(), model=model)
    torch.manual_seed(1)
    _drive(case, model, opt, 0, 1)  # the refresh at t = 0 and one step
    with torch.no_grad():
        model[0].bias.add_(3.0)  # the (fp32) mean is the parameter itself for every learner here
    n = int(model[1].num_batches_tracked)
    xb = BATCHES[1][0]
    cur = _bn_forward(model, _params(model), [xb, XM] if case.memory else [xb])
    out = _bn_forward(model, _anchor_means(opt, model), [XM] if case.memory else [xb])
    assert (cur - out).norm() > 0.5  # the two passes would leave clearly different statistics
    assert opt.alpha != 0.0 if case.info.anchored else True  # the anchor pass runs
    _step(case, model, opt, 1)
    assert int(model[1].num_batches_tracked) == n + (2 if case.memory else 1)
    assert (model[1].running_mean - cur).norm() < 0.25 * (model[1].running_mean - out).norm()


def test_registry_continual_default_prior_with_model():
    model = _model()
    opt = LEARNERS["continual-ivon"].build(model.parameters(), model=model, **LEARNERS["continual-ivon"].small_options)
    assert isinstance(opt, vbpc.ContinualIVON)


# ----------------------------------------------------------------------------------------- 9. compile
@pytest.mark.slow
@pytest.mark.parametrize("case", cases("compile"))
def test_compiled_model_gives_the_eager_step(case):
    if not case.info.supports_compile:
        pytest.skip(f"{case.id} does not support torch.compile'd models (the registry's supports_compile)")
    runs = []
    for compiled in (False, True):
        model = _model()
        fwd = torch.compile(model, backend="aot_eager") if compiled else model
        opt = case.build(model.parameters())
        torch.manual_seed(1)
        _drive(case, model, opt, 0, 4, fwd=fwd)
        runs.append(_params(model))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], _params(_model())))  # it trained


# ----------------------------------------------------------------------------------------- 10. bf16
@pytest.mark.parametrize("case", cases("bf16"))
def test_bf16_parameters_keep_fp32_state(case):
    model = _model(dtype=torch.bfloat16)
    xs = [(x.bfloat16(), y) for x, y in BATCHES]

    def run(opt):
        torch.manual_seed(1)
        for t in range(3):
            if case.info.anchored and opt.refresh_due:
                opt.refresh(lambda b: F.cross_entropy(model(b[0].bfloat16()).float(), b[1]), MEGA, progress=False)
            closure = _closure(case, model, opt, *xs[t])
            opt.step(closure, **({"memory": _closure(case, model, opt, XM.bfloat16(), YM)} if case.memory else {}))

    if not case.info.supports_bf16:
        if case.baseline:
            pytest.skip("torch.optim baseline: keeps its state in the parameters' dtype; vbpc cannot refuse")
        with pytest.raises((TypeError, ValueError), match="bf16|bfloat16"):
            run(case.build(model.parameters()))
        return
    opt = case.build(model.parameters())
    run(opt)
    sd = opt.state_dict()
    floats = [t for t in _tensors(sd) if t.is_floating_point()]
    assert floats and all(t.dtype in (torch.float32, torch.float64) for t in floats)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        master = opt.state[p]["mean"]
        assert master.dtype == torch.float32 and torch.equal(p, master.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------- closure, sample
@pytest.mark.parametrize("case", cases("needs_closure", lambda c: c.info.needs_closure))
def test_step_without_closure_is_refused(case):
    model = _model()
    opt = case.build(model.parameters())
    torch.manual_seed(1)
    _drive(case, model, opt, 0, 2)
    before, sd = _params(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(SamplingError, match="closure"):
        opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    _assert_same(opt.state_dict(), sd)


@pytest.mark.parametrize("case", cases("no_closure", lambda c: not c.info.needs_closure and not c.baseline))
def test_samples_collected_by_hand_equal_the_closure_step(case):
    """``needs_closure=False``: ``sampled_params(train=True)`` + ``step()`` is the step with a closure."""
    out = []
    for by_hand in (False, True):
        model = _model()
        opt = case.build(model.parameters())
        torch.manual_seed(1)
        for t in range(3):
            closure = _closure(case, model, opt, *BATCHES[t])
            if by_hand:
                with opt.sampled_params(train=True):
                    closure()
                opt.step()
            else:
                opt.step(closure)
        out.append(_params(model))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", cases("sample", lambda c: not c.baseline))
def test_sample_then_step_equals_step_with_closure(case):
    model = _model()
    opt = case.build(model.parameters())
    if not case.info.supports_sample:
        if hasattr(opt, "sample"):
            with pytest.raises(SamplingError):
                opt.sample(_closure(case, model, opt, *BATCHES[0]))
        return
    torch.manual_seed(1)
    _drive(case, model, opt, 0, 2)
    ref = copy.deepcopy((model, opt))
    rng = torch.get_rng_state()
    _step(case, ref[0], ref[1], 2)
    torch.set_rng_state(rng)
    opt.sample(_closure(case, model, opt, *BATCHES[2]))
    opt.step()
    for a, b in zip(ref[0].parameters(), model.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- named constructors
def _fit(model, opt, steps, refresh=True, backward=True):
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    for t in range(steps):
        if refresh and getattr(opt, "refresh_due", False):
            opt.refresh(loss_fn, MEGA, progress=False)
        xb, yb = BATCHES[t % 3]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            if backward:
                loss.backward()
            return loss
        opt.step(closure)


def _svrg_expected(model, lr, alpha, x, y, theta_out):
    """θ - lr [∇ℓ_B(θ) - α ∇ℓ_B(θ_out) + α ∇ℓ(θ_out)] (eq. 19 with α; full-data anchor MEGA, no decay)."""
    def grad_at(theta, xs, ys):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(m.parameters(), theta):
                p.copy_(t)
        return torch.autograd.grad(F.cross_entropy(m(xs), ys), list(m.parameters()))
    theta = _params(model)
    g_in, g_out = grad_at(theta, x, y), grad_at(theta_out, x, y)
    full = [(a * 12 + b * 12) / 24 for a, b in zip(grad_at(theta_out, *MEGA[0]), grad_at(theta_out, *MEGA[1]))]
    return [t - lr * ((gi - alpha * go) + alpha * gf) for t, gi, go, gf in zip(theta, g_in, g_out, full)]


def test_named_constructors_as_user_code_writes_them():
    # IVONPoCo: keyword form; α after the first refresh, two passes per corrected step
    model = _model()
    opt = vbpc.IVONPoCo(model.parameters(), lr=0.05, ess=100.0, alpha=0.5, anchor_period=5)
    assert opt.refresh_due and opt.alpha == 0.0 and opt.param_groups[0]["beta1"] == 0.0
    torch.manual_seed(1)
    _fit(model, opt, 3)
    assert opt.alpha == 0.5 and opt.t == 3 and opt.counters["inner_passes"] == 6 and opt.anchor.refreshes == 1

    # IVONPoCoMo: momentum 0.9 by default, else IVONPoCo
    model = _model()
    opt = vbpc.IVONPoCoMo(model.parameters(), lr=0.05, ess=100.0, alpha=0.5, anchor_period=5)
    assert opt.param_groups[0]["beta1"] == 0.9
    ref_model = _model()
    ref = vbpc.IVONPoCo(ref_model.parameters(), lr=0.05, ess=100.0, alpha=0.5, anchor_period=5, beta1=0.9)
    for m, o in ((model, opt), (ref_model, ref)):
        torch.manual_seed(1)
        _fit(m, o, 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))

    # SVRG (positional lr) and AlphaSVRG: one corrected step against eq. (19) by hand
    for name in ("SVRG", "AlphaSVRG"):
        model = _model()
        if name == "SVRG":
            opt, alpha = vbpc.SVRG(model.parameters(), 0.05, anchor_period=5), 1.0
        else:
            opt, alpha = vbpc.AlphaSVRG(model.parameters(), 0.05, anchor_period=5, alpha=0.75, total_steps=20), 0.75
        torch.manual_seed(1)
        _fit(model, opt, 2)  # refresh at t=0, two steps
        theta_out = [t.clone() for t in opt.anchor.mean]
        expected = _svrg_expected(model, 0.05, alpha, *BATCHES[2], theta_out)
        xb, yb = BATCHES[2]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
        assert opt.alpha == alpha

    # VONPoCo / VON: the closure returns the loss with its graph; P is d x d
    for name in ("VONPoCo", "VON"):
        model = _model()
        if name == "VONPoCo":
            opt = vbpc.VONPoCo(model.parameters(), lr=0.5, ess=100.0, alpha=0.5, anchor_period=5, hessian="price")
        else:
            opt = vbpc.VON(model.parameters(), lr=0.5, ess=100.0, hessian="price")
        torch.manual_seed(1)
        before = _params(model)
        _fit(model, opt, 3, backward=False)
        assert opt.P.shape == (26, 26) and opt.t == 3
        assert opt.counters["inner_passes"] == (6 if name == "VONPoCo" else 3)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    # ContinualIVON: prior from a first task, replay-memory correction (three passes per step)
    model = _model()
    first = vbpc.IVON(model.parameters(), lr=0.05, ess=100.0)
    torch.manual_seed(1)
    _fit(model, first, 3)
    prior = copy.deepcopy(first.posterior(model)).bind(model)
    opt = vbpc.ContinualIVON(model.parameters(), lr=0.05, ess=24.0, prior=prior, model=model, correction=True,
                             memory_weight=100.0)
    assert torch.equal(opt.prior().mean[next(iter(opt.prior().mean))], next(model.parameters()).detach())
    xb, yb = BATCHES[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    def memory():
        opt.zero_grad()
        loss = F.cross_entropy(model(XM), YM)
        loss.backward()
        return loss
    before = _params(model)
    for _ in range(2):
        opt.step(closure, memory=memory)
    assert opt.counters["inner_passes"] == 6 and opt.last_memory_loss is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="memory"):
        opt.step(closure)
