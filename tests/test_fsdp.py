"""IVON and IVON-PoCo on a model sharded with PyTorch FSDP2 (``fully_shard``), two gloo ranks on CPU.

Each rank holds half of every parameter (FSDP2 shards dim 0: the 5- and 3-row layers split unevenly,
3+2 and 2+1 rows) and the learners' state is sharded the same way.  The reference is one process with
the unsharded model on the global batch (both ranks' batches concatenated; FSDP2 averages the ranks'
gradients, the mean over the global batch).

**What "equal" means.**  IVON draws its weight noise from the global torch RNG, one flat
``randn`` per step and MC sample for the tensors it updates; under FSDP2 those are the local shards,
so each rank draws the noise of its own shards from its own RNG (seeded ``NOISE_SEED + rank``: with one
seed every shard would get the same numbers, which the learner warns about).  The unsharded reference
would draw one flat ``randn`` over the full tensors, which no seeding can make equal, so the reference
gets the noise the ranks drew, reconstructed (:func:`_reconstructed_noise`: each rank's stream replayed
and its numbers put at that rank's rows); everything else in the reference is the unmodified learner.
The anchor refresh of IVON-PoCo draws from the anchor's own generator, seeded alike on every rank:
there each rank keeps its shard of the full draw, which is the unsharded draw itself.  Then the
sharded run equals the reference up to float32 rounding (reduction order): ``RTOL``/``ATOL``.

A learner that drew the full tensors' noise on each rank, or that drew identical noise on every shard,
fails :func:`test_sharded_training_equals_the_unsharded_run`; one whose state was not sharded fails
:func:`test_every_rank_holds_only_its_shard_of_the_state`.
"""

from __future__ import annotations

import datetime
import warnings
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn
from torch.nn import functional as F

import vbpc

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.6
    fully_shard = None
    pytestmark = pytest.mark.skip(reason="torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")
pytestmark = [pytestmark, pytest.mark.slow]  # the module fixture spawns two ranks

WORLD = 2
STEPS = 6
NOISE_SEED = 7
RTOL, ATOL = 1e-5, 1e-6  # float32

#: learner per scenario: IVON at 1 and 2 MC samples (with the global-norm clip), IVON-PoCo with
#: corrected steps (α=0.75) from the first step on and two anchor refreshes on a mega-batch
#: (β2 = 0.9 so that h moves visibly in a few steps)
IVON_KW = dict(lr=0.1, ess=32, beta2=0.9, weight_decay=1e-3)
POCO_KW = dict(IVON_KW, alpha=0.75, anchor_period=3)
KINDS: dict[str, Callable] = {
    "ivon-mc1": lambda ps: vbpc.IVON(ps, **IVON_KW),
    "ivon-mc2": lambda ps: vbpc.IVON(ps, **IVON_KW, mc_samples=2),
    "ivon-mc2-clip": lambda ps: vbpc.IVON(ps, **IVON_KW, mc_samples=2, clip_grad_norm=0.3),
    "poco": lambda ps: vbpc.IVONPoCo(ps, **POCO_KW),
    "poco-mc2-clip-indep-prox": lambda ps: vbpc.IVONPoCo(ps, **POCO_KW, mc_samples=2, clip_grad_norm=0.3,
                                                         anchor_noise="independent", proximal=True),
    "poco-optimal-running": lambda ps: vbpc.IVONPoCo(ps, **POCO_KW, alpha_mode="optimal", anchor_update="running"),
}


def _data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(WORLD, 16, 6, generator=g), torch.randint(0, 3, (WORLD, 16), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (FSDP2 keeps each rank's own shard)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch(x, y, ranks, t):
    """Step ``t``'s batch of ``ranks`` (one rank's, or every rank's concatenated: the global batch)."""
    i = (3 * t) % 9
    return torch.cat([x[r, i:i + 8] for r in ranks]), torch.cat([y[r, i:i + 8] for r in ranks])


def _megabatch(x, y, ranks):
    """The anchor's mega-batch in two chunks (the chunk-weighted mean is exercised)."""
    return [(torch.cat([x[r, j:j + 8] for r in ranks]), torch.cat([y[r, j:j + 8] for r in ranks])) for j in (0, 8)]


def _train(model, opt, x, y, ranks) -> list[float]:
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    losses = []
    for t in range(STEPS):
        if getattr(opt, "refresh_due", False):
            opt.refresh(loss_fn, _megabatch(x, y, ranks), progress=False)
        xb, yb = _batch(x, y, ranks, t)

        def closure():
            opt.zero_grad()
            loss = loss_fn((xb, yb))
            loss.backward()
            return loss
        kw = {"batch_size": len(yb)} if isinstance(opt, vbpc.IVONPoCo) else {}
        losses.append(float(opt.step(closure, **kw)))
    return losses


def _sharded_model():
    """The test MLP with ``fully_shard`` on each linear layer and at the root, and its parameters."""
    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model, list(model.parameters())


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


# ----------------------------------------------------------------------------- the ranks
def _sharded_run(rank: int, kind: str, seed: int) -> dict:
    x, y = _data()
    model, params = _sharded_model()
    opt = KINDS[kind](params)
    torch.manual_seed(seed)  # the weight noise: this rank's shards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model, opt, x, y, [rank])
    layout = []
    for p in params:
        st = opt.state[p]
        layout.append({"param": (p.numel(), p.to_local().numel()),
                       **{k: (type(st[k]).__name__, st[k].numel(), st[k].to_local().numel(),
                              st[k].placements == p.placements) for k in ("hess", "momentum")}})
    anchor = getattr(opt, "anchor", None)
    # the state dict holds the DTensors (each rank its shards) and loads into a new learner
    again = KINDS[kind](params)
    again.load_state_dict(opt.state_dict())
    reloaded = all(isinstance(again.state[p][k], DTensor) and torch.equal(again.state[p][k].to_local(),
                                                                          opt.state[p][k].to_local())
                   for p in params for k in ("hess", "momentum"))
    if anchor is not None:
        reloaded = reloaded and all(torch.equal(u.to_local(), v.to_local())
                                    for u, v in zip(again.anchor.grad + again.anchor.hess, anchor.grad + anchor.hess))
    res = {
        "reloaded": reloaded,
        "losses": losses, "layout": layout, "noise_numel": sum(b.numel() for b in opt._ws[0]["z"].values()),
        "warnings": [str(w.message) for w in caught],
        "params": [_full(p.detach()) for p in params],
        "hess": [_full(opt.state[p]["hess"]) for p in params],
        "momentum": [_full(opt.state[p]["momentum"]) for p in params],
        "clipped": opt.counters["clipped_steps"],
    }
    if anchor is not None:
        res["anchor"] = {k: [_full(t) for t in getattr(anchor, k)] for k in ("mean", "grad", "hess")}
        res["anchor_local"] = [(type(t).__name__, t.to_local().numel()) for t in anchor.grad + anchor.hess]
        res["alpha"] = opt.alpha_estimates()
    return res


def _nonfinite_run(rank: int) -> dict:
    """Rank 0's closure returns a NaN loss with finite gradients: only rank 0 sees it, yet every rank
    must skip the step and raise (a rank that went on alone would wait forever in the next collective)."""
    x, y = _data()
    model, params = _sharded_model()
    opt = KINDS["ivon-mc1"](params)
    torch.manual_seed(NOISE_SEED + rank)
    _train(model, opt, x, y, [rank])
    before = [_full(p.detach()) for p in params]
    xb, yb = _batch(x, y, [rank], 0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss * float("nan") if rank == 0 else loss
    try:
        opt.step(closure)
        error = None
    except vbpc.NonFiniteError as e:
        error = str(e)
    return {"error": error, "unchanged": all(torch.equal(a, _full(p.detach())) for a, p in zip(before, params))}


def _missing_collectives() -> str:
    """FSDP2's collectives on this gloo build ('' when all work): the all-gather of the parameters into
    one flat tensor (forward and backward) and the reduce-scatter of the flat gradients (backward),
    under the names this torch's FSDP2 calls (the ``*_single`` forms where they exist)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    missing = []
    for op, out, inp in ((gather, torch.empty(WORLD * 2), torch.ones(2)),
                         (scatter, torch.empty(2), torch.ones(WORLD * 2))):
        try:
            op(out, inp)
        except Exception as e:  # noqa: BLE001 - the backend's exact error is the reason
            missing.append(f"{op.__name__}: {type(e).__name__}: {e}")
    return "; ".join(missing)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails instead of blocking
    try:
        res: dict = {"missing": _missing_collectives()}
        if not res["missing"]:
            for kind in KINDS:
                res[kind] = _sharded_run(rank, kind, NOISE_SEED + rank)
            res["same-seed"] = _sharded_run(rank, "ivon-mc1", NOISE_SEED)  # identically seeded ranks
            res["nonfinite"] = _nonfinite_run(rank)
        torch.save(res, f"{out}/rank{rank}.pt")
        dist.barrier()  # both ranks done before teardown
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    res = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    if res[0]["missing"]:
        pytest.skip(f"gloo lacks FSDP2's collectives: {res[0]['missing']}")
    return res


# ----------------------------------------------------------------------------- the reference
def _reconstructed_noise(params: list[torch.Tensor]) -> Callable:
    """A stand-in for the reference learner's noise draw: the numbers each rank drew for its shards
    (rank r's global RNG, seeded ``NOISE_SEED + r``, one flat ``randn`` over its shards in parameter
    order), each placed at the rows FSDP2 gives rank r (``torch.chunk`` of dim 0)."""
    gens = [torch.Generator().manual_seed(NOISE_SEED + r) for r in range(WORLD)]
    rows = [[c for c in torch.arange(p.shape[0]).chunk(WORLD)] + [torch.arange(0)] * WORLD for p in params]

    def draw(gi, group, ps, ws):
        z = [torch.empty_like(p) for p in ps]
        for r, g in enumerate(gens):
            idx = [rows[j][r] for j in range(len(ps))]
            flat = torch.randn(sum(len(i) * p[0].numel() for i, p in zip(idx, ps)), generator=g)
            off = 0
            for zj, i in zip(z, idx):
                n = len(i) * zj[0].numel()
                zj[i] = flat[off:off + n].view(len(i), *zj.shape[1:])
                off += n
        return z
    return draw


def _reference(kind: str) -> dict:
    x, y = _data()
    model = _model()
    params = list(model.parameters())
    opt = KINDS[kind](params)
    opt._draw_noise = _reconstructed_noise(params)
    losses = _train(model, opt, x, y, list(range(WORLD)))
    res = {"losses": losses, "params": [p.detach().clone() for p in params],
           "hess": [opt.state[p]["hess"].clone() for p in params],
           "momentum": [opt.state[p]["momentum"].clone() for p in params],
           "clipped": opt.counters["clipped_steps"]}
    if hasattr(opt, "anchor"):
        res["anchor"] = {k: [t.clone() for t in getattr(opt.anchor, k)] for k in ("mean", "grad", "hess")}
        res["alpha"] = opt.alpha_estimates()
    return res


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", list(KINDS))
def test_sharded_training_equals_the_unsharded_run(sharded, kind):
    r0, r1 = sharded[0][kind], sharded[1][kind]
    ref = _reference(kind)
    for key in ("params", "hess", "momentum"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b)  # the ranks assemble one model
        torch.testing.assert_close(r0[key], ref[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
    # the step's loss: each rank's is the mean over its half of the global batch
    torch.testing.assert_close([(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])], ref["losses"],
                               rtol=RTOL, atol=ATOL)
    assert r0["clipped"] == r1["clipped"] == ref["clipped"]
    if "clip" in kind:
        assert ref["clipped"] >= 1  # the clip acted, on the norm over both shards
    if "anchor" in ref:
        for key in ("mean", "grad", "hess"):
            torch.testing.assert_close(r0["anchor"][key], ref["anchor"][key], rtol=RTOL, atol=ATOL)
        assert r0["alpha"].keys() == ref["alpha"].keys()
        torch.testing.assert_close(list(r0["alpha"].values()), list(ref["alpha"].values()), rtol=1e-4, atol=1e-6)
    # the posterior moved away from its initial value (the comparison is not vacuous)
    assert _max_diff(r0["params"], [p.detach() for p in _model().parameters()]) > 1e-3
    assert _max_diff(r0["hess"], [torch.ones_like(h) for h in r0["hess"]]) > 1e-3
    for r in (r0, r1):
        assert not any("drift apart" in w or "identical weight noise" in w for w in r["warnings"]), r["warnings"]


def test_every_rank_holds_only_its_shard_of_the_state(sharded):
    for kind in KINDS:
        per_rank = [sharded[r][kind]["layout"] for r in range(WORLD)]
        for j in range(len(per_rank[0])):
            full = per_rank[0][j]["param"][0]
            assert sum(rank[j]["param"][1] for rank in per_rank) == full
            for k in ("hess", "momentum"):
                entries = [rank[j][k] for rank in per_rank]
                assert all(e[0] == "DTensor" and e[1] == full and e[3] for e in entries), entries
                assert [e[2] for e in entries] == [rank[j]["param"][1] for rank in per_rank]  # local = the shard
                assert max(e[2] for e in entries) < full
        # the noise buffer is as large as the rank's shards, not the full model
        for r in range(WORLD):
            assert sharded[r][kind]["noise_numel"] == sum(e["param"][1] for e in per_rank[r])
            assert all(typ == "DTensor" for typ, _ in sharded[r][kind].get("anchor_local", []))
            assert sharded[r][kind]["reloaded"]  # state_dict() -> load_state_dict() keeps the shards


def test_identically_seeded_ranks_are_warned_about(sharded):
    for r in range(WORLD):
        assert any("identical weight noise" in w for w in sharded[r]["same-seed"]["warnings"])


def test_a_non_finite_loss_on_one_rank_stops_the_step_on_every_rank(sharded):
    r0, r1 = sharded[0]["nonfinite"], sharded[1]["nonfinite"]
    assert r0["error"] is not None and "non-finite loss" in r0["error"]
    assert r1["error"] is not None and "another rank" in r1["error"]
    assert r0["unchanged"] and r1["unchanged"]
