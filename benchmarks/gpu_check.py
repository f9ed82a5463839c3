"""GPU check: CUDA, bf16 and a single-GPU run of the character-LM benchmark (issue 7).

Run on a machine with an NVIDIA GPU:  python benchmarks/gpu_check.py [--steps 1000]

1. device, torch and CUDA versions;
2. correctness on the GPU: IVON and IVON-PoCo steps on CUDA, the fp32 state under bf16 autocast
   and with bf16 weights (h moves at β2 = 0.99999), a GradScaler (fp16) overflow step that leaves
   the posterior bitwise unchanged, sampling restored bit for bit;
3. whole-step time ratios (median of interleaved rounds) vbpc.IVON ÷ AdamW and IVON-PoCo ÷ IVON
   on a GPT-2 4 x 256 at batch 16 x 128, and ``torch.cuda.max_memory_allocated`` per learner;
4. the uncertainty study's ResNet-20 (FRN) scale check on Fashion-MNIST (``calibration.py --no-lenet``):
   AdamW, IVON, AdamW + temperature and AdamW + last-layer Laplace, selected on the validation
   split, 10 epochs, BMA over 16 samples, written to ``benchmarks/results/gpu/calibration.*``;
5. the ``lm`` benchmark at a larger scale (GPT-mini 6 x 384, batch 64 x 256, bf16 autocast, seed 0):
   AdamW, IVON and IVON-PoCoMo curves against steps, gradient evaluations and GPU wall clock,
   written to ``benchmarks/results/gpu/``.

On a machine without CUDA it prints why and exits with status 0 (nothing to check).
Writes benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vbpc
from vbpc.io import atomic_write_text


def _sync() -> None:
    torch.cuda.synchronize()


def correctness(dev: torch.device) -> dict:
    out = {}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(dev)
    x, y = torch.randn(256, 64, device=dev), torch.randint(0, 10, (256,), device=dev)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=256, beta2=0.99999, hess_init=0.5)
    saved = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params():
        pass
    out["restore_bitwise"] = all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))
    for _ in range(3):
        def closure():
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            return loss
        opt.step(closure)
    hs = [opt.state[p]["hess"] for p in model.parameters()]
    out["bf16_autocast_state_fp32"] = all(h.dtype == torch.float32 for h in hs)
    out["h_moves_beta2_0.99999"] = any(bool((h != 0.5).any()) for h in hs)
    poco = vbpc.IVONPoCo(model.parameters(), lr=0.05, ess=256, alpha=0.75, anchor_period=2)
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    for _ in range(4):
        if poco.refresh_due:
            poco.refresh(loss_fn, [(x, y)], progress=False)

        def pclosure():
            poco.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        poco.step(pclosure)
    out["ivon_poco_finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(train=True, skip_nonfinite=True):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y) * 1e36
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    out["fp16_overflow_posterior_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return out


def speed(dev: torch.device, rounds: int) -> dict:
    from vbpc.models import char_gpt2

    res = {}
    x = torch.randint(0, 100, (16, 128), device=dev)

    def make(kind):
        torch.manual_seed(0)
        model = char_gpt2(100, block_size=128, n_layer=4, n_embd=256, n_head=4).to(dev)
        if kind == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        elif kind == "ivon":
            opt = vbpc.IVON(model.parameters(), lr=0.1, ess=1e6, hess_init=1e-2)
        else:
            opt = vbpc.IVONPoCo(model.parameters(), lr=0.1, ess=1e6, hess_init=1e-2, alpha=0.75,
                                anchor_period=10 ** 6)
            opt.refresh(lambda b: model(input_ids=b, labels=b).loss, [x], progress=False)

        def step():
            def closure():
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()
                return loss
            opt.step(closure)
        return step

    steps = {k: make(k) for k in ("adamw", "ivon", "ivon-poco")}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for f in steps.values():  # warm-up
        for _ in range(3):
            f()
    for _ in range(rounds):
        for k, f in steps.items():
            _sync()
            t0 = time.perf_counter()
            for _ in range(5):
                f()
            _sync()
            times[k].append((time.perf_counter() - t0) / 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["median_step_s"] = med
    res["ivon_over_adamw"] = med["ivon"] / med["adamw"]
    res["poco_over_ivon"] = med["ivon-poco"] / med["ivon"]
    for k in ("adamw", "ivon", "ivon-poco"):
        torch.cuda.reset_peak_memory_stats()
        f = make(k)
        f()
        res[f"max_memory_allocated_MiB_{k}"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def lm_curves(steps: int, out: Path) -> dict:
    """The ``lm`` study (``benchmarks/lm.py``) at a larger scale on the GPU under bf16 autocast:
    GPT-mini 6 x 384, batch 64 x 256; the same grids selected on the validation split (one selection
    seed, ``steps // 4`` steps), then AdamW / IVON / IVON-PoCoMo / evaluation-matched IVON-PoCoMo
    over 3 paired seeds of ``steps`` steps, paired differences on the three axes; results go to ``out``
    (sized to finish in about 10 minutes on one H200)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lm as lm_bench

    lm_bench.main(["--device", "cuda", "--bf16", "--seeds", "0", "1", "2", "--select-seeds", "0",
                   "--n-layer", "6", "--n-embd", "384", "--n-head", "6", "--batch-size", "64", "--block-size", "256",
                   "--steps", str(steps), "--select-steps", str(max(8, steps // 4)),
                   "--warmup", str(max(1, steps // 16)), "--megabatch", "2048",
                   "--eval-every", str(max(1, steps // 20)),
                   "--eval-blocks", "256", "--tune-blocks", "256", "--no-progress", "--out", str(out)])
    return json.loads((out / "lm.json").read_text())["summary"]


def calibration_scale(epochs: int, out: Path) -> dict:
    """The ResNet-20 scale check of ``benchmarks/calibration.py`` on the GPU (the LeNet-5 study stays a
    CPU benchmark): the same selection rule, ``epochs`` epochs, one seed; returns its rows' metrics."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import calibration

    res = calibration.main(["--no-lenet", "--device", "cuda", "--workers", "1", "--resnet-epochs", str(epochs),
                            "--resnet-samples", "16", "--out", str(out / "calibration")])
    rows = res["report"]["scale_check"]["rows"]
    return {name: {k: r[0][k] for k in ("accuracy", "nll", "ece", "brier", "train_seconds")}
            for name, r in rows.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="LM steps per final run (selection: a quarter)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calibration-epochs", type=int, default=10, help="ResNet-20 scale check epochs (0: skip)")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a machine with an NVIDIA GPU.")
        return 0
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "bf16_supported": torch.cuda.is_bf16_supported()}
    report["correctness"] = correctness(dev)
    print(json.dumps(report, indent=1), flush=True)
    report["speed"] = speed(dev, args.rounds)
    print(json.dumps(report["speed"], indent=1), flush=True)
    if args.calibration_epochs:
        report["calibration"] = calibration_scale(args.calibration_epochs, Path(args.out).parent / "gpu")
        print(json.dumps(report["calibration"], indent=1), flush=True)
    report["lm"] = lm_curves(args.steps, Path(args.out).parent / "gpu")
    print(json.dumps(report["lm"], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1))
    return 0 if all(report["correctness"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
