"""Cost of the foreign-gradient check (tensor hooks while a weight sample is loaded): IVON ``step(closure)``
with the check on ÷ off, interleaved rounds in one process (median, min, max).  No timing is asserted.

    python benchmarks/gradwatch_overhead.py
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import vbpc
from vbpc.models import char_gpt2


def bench(name: str, model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
          rounds: int = 9, n: int = 20) -> float:
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=1e4)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    watch = opt._watch
    ratios, t = [], {}
    for r in range(rounds):
        for mode in (("on", "off") if r % 2 else ("off", "on")):
            opt._watch = watch if mode == "on" else (lambda draw: None)
            for _ in range(2):
                opt.step(closure)
            s = time.perf_counter()
            for _ in range(n):
                opt.step(closure)
            t[mode] = (time.perf_counter() - s) / n
        ratios.append(t["on"] / t["off"])
    med = statistics.median(ratios)
    print(f"{name}: {sum(1 for _ in model.parameters())} tensors, step ~{t['off'] * 1e3:.1f} ms, check on ÷ off "
          f"median {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})", flush=True)
    return med


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    bench("mlp 784-128-10, batch 128", mlp, (torch.randn(128, 784), torch.randint(0, 10, (128,))),
          lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    gpt = char_gpt2(65, block_size=64, n_layer=4, n_embd=128, n_head=4)
    ids = torch.randint(0, 65, (8, 64))
    bench("char GPT-2 4x128, batch 8x64", gpt, ids,
          lambda m, b: F.cross_entropy(m(b[:, :-1]).logits.reshape(-1, 65), b[:, 1:].reshape(-1)), rounds=7, n=5)


if __name__ == "__main__":
    main()
