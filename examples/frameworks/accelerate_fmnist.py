"""IVON inside an ``accelerate`` loop with gradient accumulation, on real Fashion-MNIST.

    python examples/frameworks/accelerate_fmnist.py           # ~30 s on a 2-core CPU
    python examples/frameworks/accelerate_fmnist.py --tiny    # what CI runs

``vbpc.integrations.accelerate.sample`` opens ``accelerator.accumulate(model)`` around one weight sample
with the gradients cleared, and undoes ``accelerator.backward``'s division of the loss: every
micro-batch is one Monte Carlo sample, as in the plain loop.  (accelerate's own loop without it is
refused: each sample would carry the previous micro-batch's gradient.)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.integrations.accelerate import sample
from vbpc.metrics import accuracy, ece, nll
from vbpc.predictive import predict


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    n_train, n_test = (512, 256) if args.tiny else (20000, 2000)
    train = Subset(load_fashion_mnist("train"), range(n_train))
    test = Subset(load_fashion_mnist("test"), range(n_test))
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=float(n_train), hess_init=0.5)
    acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model, opt, loader = acc.prepare(model, opt, DataLoader(train, batch_size=64, shuffle=True))
    for _ in range(1 if args.tiny else 3):
        for x, y in loader:
            with sample(acc, model, opt) as backward:
                backward(F.cross_entropy(model(x), y))   # the micro-batch's mean loss
            opt.step()                                   # steps at the accumulation boundary
            opt.zero_grad()
    post = opt.optimizer.posterior(model)               # opt is accelerate's wrapper of the IVON
    preds = predict(model, DataLoader(test, batch_size=256), post, 4 if args.tiny else 16,
                    generator=torch.Generator().manual_seed(0))
    res = {"accuracy": accuracy(preds.probs, preds.labels), "nll": nll(preds.probs, preds.labels),
           "ece": ece(preds.probs, preds.labels), "steps": opt.optimizer.current_step}
    print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
