#!/usr/bin/env python
"""IVON-PoCo (IVON with posterior correction) on Fashion-MNIST, in a plain PyTorch loop.

The corrected learner keeps an *anchor*: every ``anchor_period`` steps ``opt.refresh_due`` turns
true and ``opt.refresh(loss_fn, data)`` recomputes the anchor's mean gradient over a mega-batch;
each step then evaluates the closure twice (at the current and at the anchor sample), so the
closure must compute the loss of one fixed batch.

    python examples/ivon_poco_fmnist.py            # 1 epoch on 60,000 images (a few minutes on 2 cores)
    python examples/ivon_poco_fmnist.py --tiny     # seconds (5,000 images)

A CNN trained by IVON, AdamW and Bayes-by-backprop side by side: ``vbpc cnn``.
"""

import argparse

import torch
import torch.nn.functional as F

import vbpc
from vbpc.data import load_fashion_mnist, make_loader
from vbpc.metrics import accuracy, nll
from vbpc.models import MLP
from vbpc.predictive import predict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="5,000 training images")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.tiny:
        train = torch.utils.data.TensorDataset(*(t[:5000] for t in train.tensors))
        test = torch.utils.data.TensorDataset(*(t[:1000] for t in test.tensors))
    model = MLP(hidden=[256])
    loader = make_loader(train, 64, shuffle=True, generator=torch.Generator().manual_seed(0))
    megabatches = make_loader(train, 1000)  # what a refresh averages over (here: the whole training set)
    opt = vbpc.IVONPoCo(model.parameters(), lr=0.5, ess=len(train), hess_init=0.5, beta2=0.999,
                        alpha=0.75, anchor_period=len(loader) // 2)

    def loss_fn(batch):  # the mean loss of a mega-batch, for the refresh
        x, y = batch
        return F.cross_entropy(model(x), y)

    for step, (x, y) in enumerate(loader):
        if opt.refresh_due:
            opt.refresh(loss_fn, megabatches, progress=False)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    y = test.tensors[1]
    probs = predict(model, make_loader(test, 1000), opt.posterior(model), 8,
                    generator=torch.Generator().manual_seed(0)).probs
    out = {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "refreshes": opt.counters["refresh_passes"]}
    print(f"test BMA (8 samples): accuracy {out['accuracy']:.4f}  NLL {out['nll']:.4f}")
    return out


if __name__ == "__main__":
    main()
