#!/usr/bin/env python
"""IVON on real Fashion-MNIST in a plain PyTorch loop: train an MLP, then score the posterior mean
and the Bayesian model average (BMA) over weight samples.

    python examples/fashion_mnist_ivon.py            # 2 epochs, about 0.85 test accuracy
    python examples/fashion_mnist_ivon.py --tiny     # seconds (5,000 images)

The same run, with checkpoints and resuming: ``vbpc train`` (its default config).
"""

import argparse

import torch
import torch.nn.functional as F

import vbpc
from vbpc.data import load_fashion_mnist, make_loader
from vbpc.metrics import accuracy, ece, nll
from vbpc.models import MLP
from vbpc.predictive import predict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="5,000 training images")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.tiny:
        train = torch.utils.data.TensorDataset(*(t[:5000] for t in train.tensors))
        test = torch.utils.data.TensorDataset(*(t[:1000] for t in test.tensors))

    model = MLP(hidden=[500, 300])
    # ess: the training-set size (the loss below is a mean over the batch)
    opt = vbpc.IVON(model.parameters(), lr=0.5, ess=len(train), hess_init=0.5, beta2=0.999, weight_decay=1e-4)
    loader = make_loader(train, 128, shuffle=True, generator=torch.Generator().manual_seed(0))
    for epoch in range(args.epochs):
        for x, y in loader:
            def closure():  # IVON samples weights, then calls this: loss and backward at the sample
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            loss = opt.step(closure)
        print(f"epoch {epoch + 1}: training loss {loss.item():.4f} (sampled weights)")

    y = test.tensors[1]
    post = opt.posterior(model)
    test_loader = make_loader(test, 1000)
    out = {}
    for name, samples in (("mean", 0), ("bma", 16)):
        probs = predict(model, test_loader, post, samples, generator=torch.Generator().manual_seed(0)).probs
        out[name] = {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "ece": ece(probs, y)}
        print(f"test {name:>4}: accuracy {out[name]['accuracy']:.4f}  NLL {out[name]['nll']:.4f}  "
              f"ECE {out[name]['ece']:.4f}")
    return out


if __name__ == "__main__":
    main()
