r"""``vbpc unlearn CHECKPOINT --forget SPEC``: forget training examples from a saved posterior
(docs/algorithms.md §8, eq. 32; docs/adaptation.md, "Unlearning").

The checkpoint must come from ``vbpc train`` (its config names the dataset and ``train_size``, so
the training data are known and a forget set can be checked against them).  ``SPEC`` is one of

* ``class=K``: every training example of class ``K``;
* ``random=F``: a uniformly random fraction ``F`` of the training examples (``--seed``);
* ``range=A:B``: training examples ``A`` to ``B-1``;
* ``indices=FILE``: a text file of example indices (whitespace or comma separated).

Indices outside the training data are warned about and dropped (their sites were never in the
posterior); repeats are dropped with a warning; an empty forget set is an error.  The output is a
checkpoint in the same format: the unlearned posterior, the model at its mean, the original prior
and config, ``extra["unlearned"]`` (what was forgotten, how, the clamp count and the cost) and the
forgotten indices as the tensor ``state["forget_index"]``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checkpoint as ckpt
from ..data import load_dataset
from ..inference.unlearning import check_forget_index, unlearn
from ..io import check_regular_file

__all__ = ["forget_indices", "unlearn_checkpoint"]


def forget_indices(spec: str, labels: Tensor, *, seed: int = 0) -> list[int]:
    """The example indices a ``--forget`` SPEC names (see the module docstring), in increasing order
    for ``class``/``random``/``range`` and as written for ``indices``."""
    kind, sep, value = spec.partition("=")
    n = len(labels)
    if not sep or not value:
        raise ValueError(f"--forget {spec!r}: expected class=K, random=F, range=A:B or indices=FILE")
    if kind == "class":
        if not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"--forget {spec!r}: class=K needs an integer class label")
        k = int(value)
        classes = sorted(int(c) for c in labels.unique())
        if k not in classes:
            raise ValueError(f"--forget {spec!r}: no training example has class {k} (classes: {classes})")
        return torch.nonzero(labels == k).flatten().tolist()
    if kind == "random":
        try:
            frac = float(value)
        except ValueError:
            raise ValueError(f"--forget {spec!r}: random=F needs a fraction in (0, 1)") from None
        if not 0 < frac < 1:
            raise ValueError(f"--forget {spec!r}: random=F needs a fraction in (0, 1), got {frac}")
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n, generator=g)[: max(1, round(frac * n))].tolist())
    if kind == "range":
        m = re.fullmatch(r"(\d+):(\d+)", value)
        if not m or int(m.group(1)) >= int(m.group(2)):
            raise ValueError(f"--forget {spec!r}: range=A:B needs integers 0 <= A < B")
        return list(range(int(m.group(1)), int(m.group(2))))
    if kind == "indices":
        check_regular_file(value, "--forget indices file")
        text = Path(value).read_text()
        tokens = [t for t in re.split(r"[\s,]+", text) if t]
        bad = [t for t in tokens if not re.fullmatch(r"-?\d+", t)]
        if bad:
            raise ValueError(f"--forget {spec!r}: {value} holds a non-integer entry {bad[0]!r}")
        return [int(t) for t in tokens]
    raise ValueError(f"--forget {spec!r}: unknown kind {kind!r}; expected class, random, range or indices")


def _training_data(ck: ckpt.Checkpoint, path: str, root: Optional[str]) -> tuple[Tensor, Tensor, dict[str, Any]]:
    cfg = ck.extra.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), dict) or "tasks" in cfg:
        raise ValueError(f"{path}: not a `vbpc train` checkpoint (no data section in its config), so its training "
                         "data are unknown; call vbpc.unlearn(posterior, model, loss_fn, forget_data) from Python")
    data = cfg["data"]
    ds = load_dataset(f"{data['name']}:train", root if root is not None else data.get("root"))
    x, y = ds.tensors[0], ds.tensors[1]
    size = data.get("train_size")
    if size:
        x, y = x[:size], y[:size]
    return x, y, data


def unlearn_checkpoint(
    checkpoint: str,
    forget: str,
    out: str,
    *,
    curvature: str = "ggn",
    mc_samples: int = 0,
    steps: int = 0,
    lr: float = 0.05,
    memory: int = 2000,
    batch_size: int = 500,
    seed: int = 0,
    root: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Forget ``forget`` from the posterior in ``checkpoint`` and write the result to ``out``.

    Everything is checked (the output path, the checkpoint, its posterior, the forget set) before
    ``out`` is written; ``out`` is written atomically and never replaces the input checkpoint."""
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--out {out} is the input checkpoint: write the unlearned posterior to a new file")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    if not (isinstance(steps, int) and steps >= 0) or not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"--steps must be >= 0 and --memory >= 1 (got {steps}, {memory})")
    ck = ckpt.load(checkpoint)
    if ck.posterior is None:
        learner = ck.extra.get("learner", "unknown")
        raise ValueError(f"{checkpoint} holds no posterior (saved by learner {learner!r}): eq. (32) needs the "
                         "posterior's mean and precision; train with an IVON-family learner or VON")
    if type(ck.posterior).__name__ not in ("DiagonalGaussian", "FullGaussian"):
        raise ValueError(f"{checkpoint}: a {type(ck.posterior).__name__} has no per-parameter precision to divide "
                         "sites out of; unlearning needs a diagonal (IVON) or full (VON) posterior")
    x, y, data = _training_data(ck, checkpoint, root)
    n_train = len(y)
    asked = forget_indices(forget, y, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idx = check_forget_index(asked, n_train)
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    idx = [i for i in idx if 0 <= i < n_train]
    if not idx:
        raise ValueError(f"--forget {forget!r}: no example of the training data is left to forget")
    model = ck.model
    assert model is not None
    model.eval()  # no dropout in the statistics pass
    sel = torch.tensor(idx)
    forget_data = [(x[sel[i:i + batch_size]], y[sel[i:i + batch_size]]) for i in range(0, len(sel), batch_size)]

    def loss_fn(batch: Any) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    retain = None
    if steps:
        keep = torch.ones(n_train, dtype=torch.bool)
        keep[sel] = False
        kept = torch.nonzero(keep).flatten()
        g = torch.Generator().manual_seed(seed)
        mem = kept[torch.randperm(len(kept), generator=g)[:memory]]
        retain = [(x[mem[i:i + 128]], y[mem[i:i + 128]]) for i in range(0, len(mem), 128)]
    result = unlearn(ck.posterior, model, loss_fn, forget_data, curvature=curvature, mc_samples=mc_samples,
                     data_size=float(n_train), retain_data=retain, retain_size=n_train - len(idx), steps=steps, lr=lr,
                     seed=seed, progress=progress)
    post = result.posterior
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, m in post.mean.items():
            params[name].copy_(m)
    record = {**result.record, "forget": forget, "asked": len(asked), "train_examples": n_train,
              "dataset": data["name"], "source": str(checkpoint)}
    ckpt.save(out, model, post, spec=ck.spec, prior=ck.prior, extra={**ck.extra, "unlearned": record},
              state={"forget_index": sel})
    return {"out": out, **record}
