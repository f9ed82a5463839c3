"""Model merging, docs/algorithms.md eq. (31) and oracle §10.23: quadratic tasks merge to the joint posterior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vbpc.errors import StateDictMismatchError
from vbpc.posterior import DiagonalGaussian, Entry, merge_posteriors, task_arithmetic


def gaussian(mean: dict, precision: dict) -> DiagonalGaussian:
    return DiagonalGaussian([Entry(n, mean[n], precision[n], 1.0, 0.0) for n in mean])


def test_quadratic_tasks_merge_to_joint_posterior():
    """Task t: ℓ_t = ½ Σ A_t (θ - a_t)²; with prior N(m0, p0⁻¹) each task posterior is exact Gaussian,
    and (31) of the task posteriors equals the joint posterior of all tasks (1e-10)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (3, 4), "b": (4,)}
    m0 = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    p0 = {n: torch.rand(s, generator=g, dtype=torch.float64) + 0.1 for n, s in shapes.items()}
    tasks = [({n: torch.rand(s, generator=g, dtype=torch.float64) * 3 for n, s in shapes.items()},
              {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}) for _ in range(3)]
    posts = []
    for A, a in tasks:
        p = {n: p0[n] + A[n] for n in shapes}
        posts.append(gaussian({n: (p0[n] * m0[n] + A[n] * a[n]) / p[n] for n in shapes}, p))
    merged = merge_posteriors(gaussian(m0, p0), posts)
    for n in shapes:
        pj = p0[n] + sum(A[n] for A, _ in tasks)
        mj = (p0[n] * m0[n] + sum(A[n] * a[n] for A, a in tasks)) / pj
        torch.testing.assert_close(merged.precision[n], pj, rtol=1e-10, atol=0)
        torch.testing.assert_close(merged.mean[n], mj, rtol=1e-10, atol=1e-12)


def test_special_cases_and_errors():
    m0 = {"w": torch.zeros(5, dtype=torch.float64)}
    tiny = {"w": torch.full((5,), 1e-12, dtype=torch.float64)}
    ts = [{"w": torch.full((5,), float(t), dtype=torch.float64)} for t in (1, 2, 4)]
    equal = [gaussian(t, {"w": torch.full((5,), 7.0, dtype=torch.float64)}) for t in ts]
    # equal precisions, p0 → 0: the mean of the task means = task arithmetic with α = 1/T
    merged = merge_posteriors(gaussian(m0, tiny), equal, weights="hessian")
    ta = task_arithmetic(m0, ts)
    torch.testing.assert_close(merged.mean["w"], ta["w"])
    torch.testing.assert_close(ta["w"], torch.full((5,), 7 / 3, dtype=torch.float64))
    avg = merge_posteriors(gaussian(m0, tiny), equal, weights="average")
    torch.testing.assert_close(avg.mean["w"], ta["w"])
    assert torch.equal(task_arithmetic(m0, ts, scale=1.0)["w"], torch.full((5,), 7.0, dtype=torch.float64))
    with pytest.raises(StateDictMismatchError, match="one architecture"):
        merge_posteriors(gaussian(m0, tiny), [gaussian({"v": m0["w"]}, {"v": tiny["w"]})])
    with pytest.raises(StateDictMismatchError, match="shape"):
        merge_posteriors(gaussian(m0, tiny), [gaussian({"w": torch.zeros(4, dtype=torch.float64)},
                                                       {"w": torch.ones(4, dtype=torch.float64)})])
    with pytest.raises(ValueError, match="weights"):
        merge_posteriors(gaussian(m0, tiny), equal, weights="median")
    with pytest.raises(ValueError, match="no posterior"):
        merge_posteriors(gaussian(m0, tiny), [])
    with pytest.raises(StateDictMismatchError, match="no matching"):
        task_arithmetic(m0, [{"v": m0["w"]}])


def test_merged_posterior_samples_into_a_model():
    net = nn.Linear(3, 2)
    base = DiagonalGaussian.from_module(net, precision=10.0)
    tuned = [DiagonalGaussian.from_module(nn.Linear(3, 2), precision=20.0) for _ in range(2)]
    merged = merge_posteriors(base, tuned)
    with merged.sampled(net, generator=torch.Generator().manual_seed(0)):
        out = net(torch.randn(4, 3))
    assert out.shape == (4, 2)
    for n in merged.names:  # 10 + (20 - 10) * 2
        torch.testing.assert_close(merged.precision[n], torch.full_like(merged.precision[n], 30.0))


def test_cli_merge_checkpoints(tmp_path, capsys):
    from vbpc import checkpoint
    from vbpc.cli import main as cli
    from vbpc.models import MLP

    spec = {"name": "mlp", "kwargs": {"in_features": 4, "hidden": [3], "out_features": 2}}
    paths = []
    for i, prec in enumerate((10.0, 20.0, 40.0)):
        torch.manual_seed(i)
        net = MLP(4, (3,), 2)
        checkpoint.save(tmp_path / f"m{i}.safetensors", net, DiagonalGaussian.from_module(net, precision=prec),
                        spec=spec)
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    out = tmp_path / "merged.safetensors"
    assert cli(["merge", *paths, "--out", str(out)]) == 0
    assert "merged 2 posteriors" in capsys.readouterr().out
    ck = checkpoint.load(out)
    base, t1, t2 = (checkpoint.load(p) for p in paths)
    expect = merge_posteriors(base.posterior, [t1.posterior, t2.posterior])
    for n, p in ck.model.named_parameters():
        torch.testing.assert_close(p.double(), expect.mean[n].double(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ck.posterior.precision[n], torch.full_like(p, 10.0 + 10.0 + 30.0))
    other = tmp_path / "other.safetensors"
    net = MLP(4, (5,), 2)
    checkpoint.save(other, net, DiagonalGaussian.from_module(net, precision=1.0),
                    spec={"name": "mlp", "kwargs": {"in_features": 4, "hidden": [5], "out_features": 2}})
    assert cli(["merge", paths[0], str(other)]) == 2  # a one-line error, exit 2
    with pytest.raises(StateDictMismatchError, match="one architecture"):
        cli(["--debug", "merge", paths[0], str(other)])
