"""vbpc's learners inside real PyTorch Lightning: automatic optimization with accumulation, manual
optimization, IVON-PoCo's anchor pass and refresh, and the refusals.  Each scenario is compared with
the plain loop of the same learner, on Fashion-MNIST (a small MLP on 8x8-pooled images)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.metrics import accuracy, ece, nll
from vbpc.predictive import predict

pl = pytest.importorskip("pytorch_lightning")
from vbpc.integrations.lightning import VBCallback  # noqa: E402

pytestmark = pytest.mark.slow  # Lightning Trainer runs (and importing Lightning takes seconds)

N, BS = 96, 8


@pytest.fixture(scope="module")
def data() -> TensorDataset:
    ds = load_fashion_mnist("train")
    x = F.avg_pool2d(ds.tensors[0][:N], 4).flatten(1)  # (N, 49)
    return TensorDataset(x, ds.tensors[1][:N])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(49, 16), nn.Tanh(), nn.Linear(16, 10))


class Module(pl.LightningModule):
    def __init__(self, make_opt, manual: bool = False, record: bool = False):
        super().__init__()
        self.net = _net()
        self.make_opt = make_opt
        self.automatic_optimization = not manual
        self.seen: list[torch.Tensor] = []  # the first weight of each forward pass (record=True)
        self.record = record
        self.logged: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.record:
            self.seen.append(self.net[0].weight.detach().clone())
        if self.automatic_optimization:
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss
        opt = self.optimizers()
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


def _fit(module, data, callbacks=(), **kw) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", deterministic=True,
                         callbacks=list(callbacks), **kw)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LightningModule.log.*")
        trainer.fit(module, DataLoader(data, batch_size=BS, shuffle=False))
    return trainer


def _ivon(params):
    return vbpc.IVON(params, lr=0.1, ess=float(N), hess_init=0.1)


def _plain_ivon_loop(data, k: int) -> nn.Module:
    """The plain loop: one weight sample per micro-batch, undivided mean losses, a step every
    ``k`` micro-batches (and at the end of the epoch)."""
    net = _net()
    opt = _ivon(net.parameters())
    torch.manual_seed(123)
    batches = list(DataLoader(data, batch_size=BS, shuffle=False))
    for i, (x, y) in enumerate(batches):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        if (i + 1) % k == 0 or i + 1 == len(batches):
            opt.step()
    return net


@pytest.mark.parametrize("k", [1, 2, 4])
def test_automatic_accumulation_equals_the_plain_loop_bitwise(data, k):
    module = Module(_ivon, record=True)
    _fit(module, data, [VBCallback()], accumulate_grad_batches=k)
    ref = _plain_ivon_loop(data, k)
    for p, q in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    # every micro-batch ran at its own weight sample: no two forward passes saw the same weights
    seen = torch.stack(module.seen)
    assert len(seen) == N // BS
    assert all(not torch.equal(seen[i], seen[j]) for i in range(len(seen)) for j in range(i))


def test_accumulation_with_three_micro_batches_to_rounding(data):
    module = Module(_ivon)
    _fit(module, data, [VBCallback()], accumulate_grad_batches=3)
    ref = _plain_ivon_loop(data, 3)
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_without_the_callback_is_refused(data):
    """Lightning runs the non-final micro-batches at the mean weights: the safety net refuses."""
    with pytest.raises(vbpc.SamplingError, match="VBCallback"):
        _fit(Module(_ivon), data, accumulate_grad_batches=2)


def test_manual_optimization_through_lightnings_wrapper_equals_the_plain_loop(data):
    module = Module(_ivon, manual=True)
    _fit(module, data, [VBCallback()])
    ref = _plain_ivon_loop(data, 1)
    opt = module.trainer.optimizers[0]
    assert opt.current_step == N // BS and opt._count == 0
    for p, q in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_manual_optimization_works_without_the_callback(data):
    module = Module(_ivon, manual=True)
    _fit(module, data)
    ref = _plain_ivon_loop(data, 1)
    for p, q in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def _poco(params):
    return vbpc.IVONPoCo(params, lr=0.1, ess=float(N), hess_init=0.1, alpha=0.75, anchor_period=4,
                         megabatch_size=32)


class PocoModule(Module):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.calls = getattr(self, "calls", 0) + 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.logged.append(float(self.trainer.callback_metrics["train_loss_step"]))
        self.losses = getattr(self, "losses", [])
        self.losses.append(float(outputs["loss"]))


def test_ivon_poco_logs_the_current_pass_and_counts_examples(data):
    module = PocoModule(_poco)
    refresh = DataLoader(data, batch_size=16, shuffle=False)
    _fit(module, data, [VBCallback(refresh_data=refresh)])
    # the plain loop: refresh when due over the same mega-batch, step(closure) per batch
    net = _net()
    opt = _poco(net.parameters())
    torch.manual_seed(123)
    losses = []
    for x, y in DataLoader(data, batch_size=BS, shuffle=False):
        if opt.refresh_due:
            opt.refresh(lambda b: F.cross_entropy(net(b[0]), b[1]), refresh, progress=False)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure, batch_size=len(x))))
    for p, q in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(p, q)
    lopt = module.trainer.optimizers[0]
    assert lopt.counters == opt.counters
    assert lopt.counters["inner_examples"] == 2 * N  # two passes per example
    assert module.logged == losses  # the current pass's loss, never the anchor's
    assert module.losses == losses
    assert module.trainer.callback_metrics["train_loss_epoch"].item() == pytest.approx(sum(losses) / len(losses))


def test_refusals(data):
    with pytest.raises(ValueError, match="clip_grad_norm=1.0"):
        _fit(Module(_ivon), data, [VBCallback()], gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        _fit(PocoModule(_poco), data, [VBCallback()], accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="bma_samples"):
        VBCallback(bma_samples=-1)


class EvalModule(Module):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_bma_validation_hook_logs_the_model_average(data):
    module = EvalModule(_ivon)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                         callbacks=[VBCallback(bma_samples=4)])
    val = DataLoader(data, batch_size=32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, DataLoader(data, batch_size=BS), val)
    m = trainer.callback_metrics
    assert set(m) >= {"bma_nll", "bma_acc", "bma_ece", "val_loss"}
    # the hook's numbers equal vbpc.predictive over the same loader with a generator of the same seed
    opt = trainer.optimizers[0]
    preds = predict(module, val, opt.posterior(module), 4, generator=torch.Generator().manual_seed(0))
    p, y = preds.probs, preds.labels
    assert float(m["bma_nll"]) == pytest.approx(nll(p, y), rel=1e-6)
    assert float(m["bma_acc"]) == pytest.approx(accuracy(p, y), rel=1e-6)
    assert float(m["bma_ece"]) == pytest.approx(ece(p, y), rel=1e-6, abs=1e-7)
    # not the mean predictor's
    mean = predict(module, val)
    assert float(m["bma_nll"]) != pytest.approx(nll(mean.probs, y), rel=1e-4)
    assert opt.current_step == N // BS
    copy.deepcopy(opt)  # no pending samples are left behind


class SkipFirst(Module):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            return None  # Lightning skips this micro-batch: no sample for it
        return super().training_step(batch, batch_idx)


def test_a_skipped_micro_batch_gives_no_sample(data):
    module = SkipFirst(_ivon)
    _fit(module, data, [VBCallback()], accumulate_grad_batches=2)
    net = _net()
    opt = _ivon(net.parameters())
    torch.manual_seed(123)
    for i, (x, y) in enumerate(DataLoader(data, batch_size=BS, shuffle=False)):
        if i == 0:  # the callback opened a sample (its noise drawn) and dropped it
            with pytest.raises(KeyError):
                with opt.sampled_params(train=True):
                    raise KeyError
            continue
        with opt.sampled_params(train=True):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        if (i + 1) % 2 == 0:
            opt.step()
    for p, q in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(p, q)
