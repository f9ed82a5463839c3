"""IVON inside PyTorch Lightning on real Fashion-MNIST, with gradient accumulation and a BMA validation hook.

    python examples/frameworks/lightning_fmnist.py            # ~1 minute on a 2-core CPU
    python examples/frameworks/lightning_fmnist.py --tiny     # what CI runs

``VBCallback`` gives every micro-batch of ``accumulate_grad_batches`` its own weight sample (Lightning
alone would run the non-final ones at the mean weights, which vbpc refuses) and logs the Bayesian model
average's NLL, accuracy and ECE after each validation epoch.
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.integrations.lightning import VBCallback


class Classifier(pl.LightningModule):
    def __init__(self, ess: float):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
        self.ess = ess

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss_mean_weights", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return vbpc.IVON(self.parameters(), lr=0.1, ess=self.ess, hess_init=0.5)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a few hundred examples, one epoch (CI)")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    pl.seed_everything(0, workers=True)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    n_train, n_val = (512, 256) if args.tiny else (20000, 2000)
    train, val = Subset(train, range(n_train)), Subset(test, range(n_val))
    model = Classifier(ess=float(n_train))
    trainer = pl.Trainer(max_epochs=1 if args.tiny else args.epochs, accumulate_grad_batches=2,
                         callbacks=[VBCallback(bma_samples=4 if args.tiny else 16)], accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=not args.tiny)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


if __name__ == "__main__":
    main()
