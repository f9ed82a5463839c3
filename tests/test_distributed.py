"""Two-process gloo DDP on CPU (loopback only): the learners' ``sync`` averages the gradient and
Price statistics (and the anchor's mega-batch statistics) over ranks, so every rank holds the same
posterior; per-rank samples are extra MC samples; the drifting configuration is detected."""

from __future__ import annotations

import datetime
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn
from torch.nn import functional as F

import vbpc

pytestmark = [pytest.mark.slow,  # two spawned ranks, once for the module (pytest-xdist --dist loadfile)
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

STEPS = 5


def _data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(2, 16, 6, generator=g), torch.randint(0, 3, (2, 16), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


CLIP = 0.3  # small enough to be active on most steps (counted in counters["clipped_steps"])


def _learner(kind: str, model: nn.Module, sync: bool):
    """``kind`` with a ``-clip`` suffix: the same learner with ``clip_grad_norm=CLIP``."""
    kw = {"clip_grad_norm": CLIP} if kind.endswith("-clip") else {}
    kind = kind.removesuffix("-clip")
    if kind == "ivon":
        return vbpc.IVON(model.parameters(), lr=0.1, ess=32, sync=sync, **kw)
    if kind == "von-poco":
        return vbpc.VONPoCo(model.parameters(), lr=0.5, ess=32, weight_decay=1e-2, alpha=0.75, anchor_period=3,
                            hessian="price", sync=sync)
    if kind == "vsgd-poco":
        return vbpc.VSGDPoCo(model.parameters(), lr=0.1, sigma=0.01, weight_decay=1e-3, alpha=0.75, anchor_period=3,
                             sync=sync, **kw)
    return vbpc.IVONPoCo(model.parameters(), lr=0.1, ess=32, alpha=0.75, anchor_period=3, sync=sync, **kw)


def _train(model, opt, x, y):
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    for t in range(STEPS):
        if getattr(opt, "refresh_due", False):
            opt.refresh(loss_fn, [(x, y)], progress=False)
        i = (4 * t) % len(y)
        xb, yb = x[i:i + 8], y[i:i + 8]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            if not isinstance(opt, vbpc.VONPoCo):  # VON differentiates the loss itself
                loss.backward()
            return loss
        opt.step(closure)


def _state(model, opt):
    hess = [opt.state[p]["hess"].clone() for p in model.parameters() if "hess" in opt.state[p]]
    if isinstance(opt, vbpc.VONPoCo):
        hess = [opt.P.clone()]
    return {"params": [p.detach().clone() for p in model.parameters()], "hess": hess,
            "clipped": getattr(opt, "counters", {}).get("clipped_steps")}


RANKS_IDENTICAL = ["ivon", "poco", "vsgd-poco", "von-poco", "poco-clip"]
SAME_SAMPLES = ["ivon", "poco", "vsgd-poco", "ivon-clip", "vsgd-poco-clip"]
#: every (kind, same_seed, sync) run of this module: one spawn of two ranks runs them all in turn
#: (spawning a rank costs more than its runs), each from a fresh model, learner and seed.
RUNS = ([(k, False, True) for k in RANKS_IDENTICAL] + [(k, True, True) for k in SAME_SAMPLES]
        + [("ivon", False, False)])


def _one_run(rank: int, kind: str, same_seed: bool, sync: bool) -> dict:
    x, y = _data()
    model = _model()
    opt = _learner(kind, model, sync)
    torch.manual_seed(7 if same_seed else 7 + rank)  # the weight-sample noise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, x[rank], y[rank])
    res = _state(model, opt)
    res["warned"] = any("drift apart" in str(w.message) for w in caught)
    return res


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two ranks share the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))  # a stuck collective fails, not hangs
    try:
        results = {}
        for run in RUNS:
            try:
                results[run] = _one_run(rank, *run)
            except Exception:  # recorded for the test of this run; the ranks fail alike (same code, same data)
                results[run] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks done before teardown (a gloo teardown race aborts otherwise)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _run(ranks, kind, same_seed, sync):
    r0, r1 = (r[(kind, same_seed, sync)] for r in ranks)
    for r in (r0, r1):
        if "error" in r:
            pytest.fail(f"rank failed:\n{r['error']}")
    return r0, r1


@pytest.mark.parametrize("kind", RANKS_IDENTICAL)
def test_ranks_hold_the_identical_posterior(ranks, kind):
    r0, r1 = _run(ranks, kind, same_seed=False, sync=True)  # per-rank samples: extra MC samples
    for a, b in zip(r0["params"] + r0["hess"], r1["params"] + r1["hess"]):
        assert torch.equal(a, b)
    assert not r0["warned"]
    if kind.endswith("-clip"):  # the clip was active, and on the same steps of both ranks
        assert r0["clipped"] == r1["clipped"] and r0["clipped"] >= 1


@pytest.mark.parametrize("kind", SAME_SAMPLES)
def test_identical_samples_equal_one_process_on_the_concatenated_batch(ranks, kind):
    """With the same noise on both ranks, sync equals one process on the concatenated batch; with
    ``clip_grad_norm`` this holds only because the norm is taken after the all-reduce (a per-rank
    clip would scale each half by its own factor)."""
    r0, r1 = _run(ranks, kind, same_seed=True, sync=True)
    assert all(torch.equal(a, b) for a, b in zip(r0["params"] + r0["hess"], r1["params"] + r1["hess"]))
    x, y = _data()
    model = _model()
    opt = _learner(kind, model, sync=False)
    torch.manual_seed(7)
    # rank r's batch t is x[r][i:i+8]; one process sees both halves at once (same noise)
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    for t in range(STEPS):
        if getattr(opt, "refresh_due", False):
            opt.refresh(loss_fn, [(torch.cat([x[0], x[1]]), torch.cat([y[0], y[1]]))], progress=False)
        i = (4 * t) % 16
        xb, yb = torch.cat([x[0][i:i + 8], x[1][i:i + 8]]), torch.cat([y[0][i:i + 8], y[1][i:i + 8]])

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)
    single = _state(model, opt)
    for a, b in zip(r0["params"] + r0["hess"], single["params"] + single["hess"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert r0["clipped"] == r1["clipped"] == single["clipped"]
    if kind.endswith("-clip"):
        assert single["clipped"] >= 1


def test_the_drifting_configuration_is_detected(ranks):
    r0, r1 = _run(ranks, "ivon", same_seed=False, sync=False)
    assert r0["warned"] and r1["warned"]
    assert not all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))  # they did drift
