"""vbpc.metrics streaming accumulators, merging, state dicts, distributed sync, token-level LM
metrics and bootstrap intervals (docs/algorithms.md §9)."""

from __future__ import annotations

import io
import math
import os
import time

import pytest
import torch

import vbpc.metrics as M
from vbpc.errors import StateDictMismatchError
from vbpc.metrics.bootstrap import resample_indices

F64 = torch.float64
TOL = 1e-12


def _data(n=1000, c=5, s=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    stack = (2.5 * torch.randn(s, n, c, generator=g, dtype=F64)).softmax(-1)
    probs = stack.mean(0)
    y = torch.where(torch.rand(n, generator=g) < 0.7, torch.multinomial(probs, 1, generator=g).squeeze(1),
                    torch.randint(0, c, (n,), generator=g))
    return probs, y, stack


def _one_shot(probs, y, stack):
    u = M.uncertainty_decomposition(stack, probs)
    return {"accuracy": M.accuracy(probs, y), "nll": M.nll(probs, y), "brier": M.brier(probs, y),
            "ece": M.ece(probs, y), "mce": M.mce(probs, y), "adaptive_ece": M.adaptive_ece(probs, y),
            "entropy": float(u.total.mean()), "aleatoric": float(u.aleatoric.mean()), "mi": float(u.epistemic.mean()),
            "aurc": M.aurc(probs, y), "misclassification_auroc": M.misclassification_auroc(probs, y),
            "n": float(len(y))}


def _assert_close(a: dict, b: dict, tol=TOL):
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol), k


# ----------------------------------------------------------------------------- classification
def test_streaming_equals_one_shot():
    probs, y, stack = _data()
    acc = M.ClassificationMetrics()
    for lo, hi in [(0, 1), (1, 100), (100, 457), (457, 1000)]:
        acc.update(probs[lo:hi], y[lo:hi], stack[:, lo:hi])
    _assert_close(acc.compute(), _one_shot(probs, y, stack))
    _assert_close(M.classification_metrics(probs, y, sample_stack=stack), _one_shot(probs, y, stack))


def test_streaming_log_probs_as_predict_streams_them():
    """``ClassificationMetrics(inputs="log_probs").update`` fits predict(on_batch=...) (log p̄, y, log stack)."""
    probs, y, stack = _data(300)
    log_stack = stack.float().log()
    log_bar = torch.logsumexp(log_stack, 0) - math.log(stack.shape[0])  # eq. 33
    acc = M.ClassificationMetrics(inputs="log_probs")
    for i in range(0, 300, 64):
        acc.update(log_bar[i:i + 64], y[i:i + 64], log_stack[:, i:i + 64])
    got = acc.compute()
    assert got["nll"] == pytest.approx(M.nll_from_log_probs(log_bar, y), abs=TOL)
    assert got["nll"] == pytest.approx(M.nll(probs, y), abs=1e-6)
    assert got["mi"] == pytest.approx(float(M.uncertainty_decomposition(stack).epistemic.mean()), abs=1e-6)


def test_saturated_float32_log_mean_exp_is_accepted():
    """eq. 33 on 7 identical saturated members: logsumexp(0, ..., 0) - log 7 rounds to +1.2e-7 in float32."""
    log_stack = torch.log_softmax(torch.tensor([[[60.0, -60.0]]] * 7), -1)
    log_bar = torch.logsumexp(log_stack, 0) - math.log(7)
    assert log_bar[0, 0] > 0
    m = M.ClassificationMetrics(inputs="log_probs").update(log_bar, torch.tensor([0]), log_stack).compute()
    assert m["accuracy"] == 1.0 and abs(m["nll"]) < 1e-6 and m["ece"] < 1e-6 and m["mi"] == 0.0


def test_merge_equals_concatenation_and_state_dict_round_trip():
    probs, y, stack = _data(700, seed=1)
    a, b, whole = M.ClassificationMetrics(10), M.ClassificationMetrics(10), M.ClassificationMetrics(10)
    a.update(probs[:300], y[:300], stack[:, :300])
    b.update(probs[300:], y[300:], stack[:, 300:])
    whole.update(probs, y, stack)
    merged = a.merge(b)
    _assert_close(merged.compute(), whole.compute())
    for k, v in whole.examples().items():
        assert torch.equal(merged.examples()[k], v), k
    for k in ("bin_count", "bin_correct"):  # integer sums: exact
        assert torch.equal(merged._sums[k], whole._sums[k])
    buf = io.BytesIO()
    torch.save(merged.state_dict(), buf)
    buf.seek(0)
    fresh = M.ClassificationMetrics(10)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert fresh.compute() == merged.compute()
    with pytest.raises(StateDictMismatchError, match="settings"):
        M.ClassificationMetrics(15).load_state_dict(merged.state_dict())
    with pytest.raises(StateDictMismatchError, match="cannot be loaded"):
        M.OODMetrics().load_state_dict(merged.state_dict())
    with pytest.raises(ValueError, match="different settings"):
        M.ClassificationMetrics(15).merge(a)


def test_streaming_consistency_errors_and_light_mode():
    probs, y, stack = _data(50)
    acc = M.ClassificationMetrics()
    with pytest.raises(ValueError, match="empty"):
        acc.compute()
    acc.update(probs[:20], y[:20])
    with pytest.raises(ValueError, match="for every batch or for none"):
        acc.update(probs[20:], y[20:], stack[:, 20:])
    with pytest.raises(ValueError, match="number of classes"):
        acc.update(torch.full((3, 4), 0.25, dtype=F64), torch.zeros(3, dtype=torch.long))
    light = M.ClassificationMetrics(keep_examples=False).update(probs, y)
    full = M.ClassificationMetrics().update(probs, y).compute()
    got = light.compute()
    assert set(got) == {"n", "accuracy", "nll", "brier", "ece", "mce", "entropy"}
    _assert_close(got, {k: full[k] for k in got})
    with pytest.raises(ValueError, match="keep_examples=False"):
        light.bootstrap()
    d = light.reliability_diagram()
    assert int(d.count.sum()) == 50 and d.ece == pytest.approx(full["ece"], abs=TOL)


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probs, y, stack = _data(400, seed=5)
        shard = slice(rank * 400 // world, (rank + 1) * 400 // world)
        acc = M.ClassificationMetrics().update(probs[shard], y[shard], stack[:, shard]).sync()
        ood = M.OODMetrics().update_in(probs[shard]).update_out(probs[shard].flip(1).softmax(1)).all_reduce()
        torch.save({"cls": acc.compute(), "ood": ood.compute()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before teardown
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_is_noop_without_distributed_and_merges_across_ranks(tmp_path):
    probs, y, stack = _data(400, seed=5)
    single = M.ClassificationMetrics().update(probs, y, stack)
    before = single.compute()
    assert single.sync().compute() == before  # not initialised: no-op
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0 == r1  # identical on every rank
    _assert_close(r0["cls"], before)
    ood = M.OODMetrics().update_in(probs).update_out(probs.flip(1).softmax(1)).compute()
    _assert_close(r0["ood"], ood)


# ----------------------------------------------------------------------------- OOD streaming
def test_ood_streaming_equals_one_shot_and_merge():
    probs_in, _, stack_in = _data(300, seed=2)
    probs_out = (0.5 * torch.randn(200, 5, dtype=F64)).softmax(-1)
    stack_out = (0.5 * torch.randn(4, 200, 5, dtype=F64)).softmax(-1)
    for score in ("max_prob", "entropy", "mi"):
        one = M.ood_metrics(probs_in, probs_out, score=score, sample_stack_in=stack_in, sample_stack_out=stack_out)
        a, b = M.OODMetrics(score), M.OODMetrics(score)
        a.update_in(probs_in[:100], stack_in[:, :100]).update_out(probs_out[:150], stack_out[:, :150])
        b.update_in(probs_in[100:], stack_in[:, 100:]).update_out(probs_out[150:], stack_out[:, 150:])
        got = a.merge(b).compute()
        assert got.pop("n_in") == 300 and got.pop("n_out") == 200
        _assert_close(got, one)
    with pytest.raises(ValueError, match="needs in-domain and OOD"):
        M.OODMetrics().update_in(probs_in).compute()


# ----------------------------------------------------------------------------- token-level LM metrics
def _lm_hand():
    probs = torch.tensor([
        [[.7, .2, .1], [.1, .6, .3], [.2, .2, .6], [.3, .3, .4]],
        [[.5, .25, .25], [.2, .5, .3], [.9, .05, .05], [1 / 3, 1 / 3, 1 / 3]],
    ], dtype=F64)
    logits = probs.log() + 2.0
    logits[0, 2] = math.inf  # predicts an ignored target (-100): never read
    logits[1, 3] = math.nan  # last position: no target after the shift
    labels = torch.tensor([[-100, 0, 2, -100], [1, 1, 0, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # b=1, t=3 masked: its target is dropped
    return probs, logits, labels, mask


def test_token_metrics_hand_case():
    _, logits, labels, mask = _lm_hand()
    m = M.token_metrics(logits, labels, mask)
    # kept (prediction -> target): b0 t0->0 (p .7, right), b0 t1->2 (p .3, argmax 1), b1 t0->1 (p .25,
    # argmax 0), b1 t1->0 (p .2, argmax 1)
    nll = -(math.log(.7) + math.log(.3) + math.log(.25) + math.log(.2)) / 4
    assert m["n_tokens"] == 4 and m["accuracy"] == 0.25
    assert m["nll"] == pytest.approx(nll, abs=1e-14)
    assert m["perplexity"] == pytest.approx(math.exp(nll), abs=1e-13)
    assert m["brier"] == pytest.approx((0.14 + 0.86 + 0.875 + 0.98) / 4, abs=1e-14)
    # conf .7 (bin 10, +.3), .6 (bin 9, -.6), .5 and .5 (bin 7, -1.0)
    assert m["ece"] == pytest.approx((0.3 + 0.6 + 1.0) / 4, abs=1e-14)
    assert m["mce"] == pytest.approx(0.6, abs=1e-14)


def test_token_metrics_inputs_shift_and_chunks():
    probs, logits, labels, mask = _lm_hand()
    ref = M.token_metrics(logits, labels, mask)
    log_probs = probs.log()
    _assert_close(M.token_metrics(log_probs, labels, mask, inputs="log_probs"), ref, 1e-14)
    _assert_close(M.token_metrics(probs, labels, mask, inputs="probs"), ref, 1e-14)
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    shifted_mask = torch.cat([mask[:, 1:], torch.zeros(2, 1, dtype=mask.dtype)], 1)
    _assert_close(M.token_metrics(logits, shifted, shifted_mask, shift=False), ref, 1e-14)
    one = M.token_stats(logits, labels, mask, chunk_size=1)
    full = M.token_stats(logits, labels, mask)
    assert torch.equal(one.nll, full.nll) and one.sequence.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="no target tokens"):
        M.token_metrics(logits, torch.full_like(labels, -100))


def test_token_metrics_equal_pooled_classification_metrics():
    g = torch.Generator().manual_seed(7)
    b, t, v = 6, 9, 11
    logits = 3 * torch.randn(b, t, v, generator=g, dtype=F64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.2] = -100
    mask = (torch.rand(b, t, generator=g) < 0.8).long()
    keep = (labels[:, 1:] != -100) & (mask[:, 1:] == 1)
    rows, y = logits[:, :-1][keep].softmax(-1), labels[:, 1:][keep]
    m = M.token_metrics(logits, labels, mask, n_bins=10)
    assert m["n_tokens"] == keep.sum()
    for k, fn in [("accuracy", M.accuracy), ("nll", M.nll), ("brier", M.brier)]:
        assert m[k] == pytest.approx(fn(rows, y), abs=TOL), k
    assert m["ece"] == pytest.approx(M.ece(rows, y, 10), abs=TOL)
    assert m["mce"] == pytest.approx(M.mce(rows, y, 10), abs=TOL)
    # streaming over batches and merging == one shot
    a, c = M.TokenMetrics(10), M.TokenMetrics(10)
    a.update(logits[:2], labels[:2], mask[:2]).update(logits[2:3], labels[2:3], mask[2:3])
    c.update(logits[3:], labels[3:], mask[3:])
    _assert_close(a.merge(c).compute(), m)
    fresh = M.TokenMetrics(10)
    fresh.load_state_dict(a.state_dict())
    assert fresh.compute() == a.compute() and fresh.sequences().shape == (b, 4 + 20)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_deterministic_and_contains_estimate():
    probs, y, stack = _data(2000, seed=3)
    ci = M.bootstrap_classification(probs, y, sample_stack=stack, n_boot=200, seed=11)
    again = M.bootstrap_classification(probs, y, sample_stack=stack, n_boot=200, seed=11)
    other = M.bootstrap_classification(probs, y, sample_stack=stack, n_boot=200, seed=12)
    assert ci == again and ci["accuracy"] != other["accuracy"]
    one = _one_shot(probs, y, stack)
    for k, v in ci.items():
        assert v.estimate == pytest.approx(one[k], abs=TOL), k
        assert v.low <= v.high and v.n_boot == 200 and v.level == 0.95
        if k not in ("ece", "mce", "adaptive_ece"):  # calibration errors are biased upward under resampling
            assert v.contains(v.estimate), k
    stream = M.ClassificationMetrics().update(probs, y, stack).bootstrap(n_boot=200, seed=11)
    assert stream == ci


def test_bootstrap_vectorised_equals_generic_loop():
    """The suite's vectorised statistics equal the functional metrics on the same resamples."""
    probs, y, _ = _data(300, seed=4)
    probs = (probs * 8).round() + 1  # many tied confidences: exercises stable-sort tie handling
    probs = probs / probs.sum(1, keepdim=True)
    suite = M.bootstrap_classification(probs, y, n_boot=40, seed=5)
    for name, fn in [("accuracy", M.accuracy), ("nll", M.nll), ("ece", M.ece), ("mce", M.mce),
                     ("adaptive_ece", M.adaptive_ece), ("aurc", M.aurc),
                     ("misclassification_auroc", M.misclassification_auroc)]:
        generic = M.bootstrap_ci(fn, probs, y, n_boot=40, seed=5)
        for f in ("estimate", "low", "high", "std"):
            assert getattr(generic, f) == pytest.approx(getattr(suite[name], f), abs=TOL), (name, f)


def test_bootstrap_ci_generic_batched_and_level():
    x = torch.arange(50, dtype=F64)
    plain = M.bootstrap_ci(lambda a: a.mean(), x, n_boot=100, seed=0)
    batched = M.bootstrap_ci(lambda a: a.mean(1), x, n_boot=100, seed=0, batched=True)
    assert plain == batched and plain.estimate == 24.5
    wide = M.bootstrap_ci(lambda a: a.mean(), x, n_boot=100, seed=0, level=0.99)
    assert wide.low <= plain.low and wide.high >= plain.high
    with pytest.raises(ValueError, match="level"):
        M.bootstrap_ci(lambda a: a.mean(), x, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci(lambda a: a.mean(), x, n_boot=0)
    with pytest.raises(ValueError, match="first dimension"):
        M.bootstrap_ci(lambda a, b: 0.0, x, x[:3])
    inf = M.bootstrap_ci(lambda a: a.mean(), torch.tensor([1.0, math.inf]), n_boot=100, seed=0)
    assert inf.high == math.inf and inf.estimate == math.inf and not math.isnan(inf.low)
    idx = next(resample_indices(7, 3, torch.Generator().manual_seed(0)))
    assert idx.shape == (3, 7) and torch.equal(idx, idx.sort(1).values)


def test_bootstrap_ood_independent_resampling_matches_loop():
    g = torch.Generator().manual_seed(6)
    s_in = (torch.randn(150, generator=g, dtype=F64) + 1).round(decimals=1)  # ties within and across sets
    s_out = torch.randn(90, generator=g, dtype=F64).round(decimals=1)
    ci = M.bootstrap_ood_scores(s_in, s_out, n_boot=60, seed=3)
    gen = torch.Generator().manual_seed(3)
    rows = max(1, 2 ** 21 // (150 + 90 + torch.unique(torch.cat([s_in, s_out])).numel()))
    it_in, it_out = resample_indices(150, 60, gen, rows), resample_indices(90, 60, gen, rows)
    vals: dict[str, list[float]] = {k: [] for k in ci}
    for idx_in in it_in:
        idx_out = next(it_out)
        for r in range(idx_in.shape[0]):
            for k, v in M.ood_metrics_from_scores(s_in[idx_in[r]], s_out[idx_out[r]]).items():
                vals[k].append(v)
    for k, v in vals.items():
        q = torch.quantile(torch.tensor(v, dtype=F64), torch.tensor([0.025, 0.975], dtype=F64))
        assert ci[k].low == pytest.approx(float(q[0]), abs=TOL) and ci[k].high == pytest.approx(float(q[1]), abs=TOL)
        assert ci[k].contains(ci[k].estimate), k
    probs_in = torch.stack([s_in.sigmoid(), 1 - s_in.sigmoid()], 1)
    probs_out = torch.stack([s_out.sigmoid(), 1 - s_out.sigmoid()], 1)
    via_probs = M.bootstrap_ood(probs_in, probs_out, n_boot=60, seed=3)
    assert via_probs["auroc"].estimate == M.ood_metrics(probs_in, probs_out)["auroc"]


def test_bootstrap_tokens_resamples_sequences():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(12, 7, 5, generator=g, dtype=F64)
    labels = torch.randint(0, 5, (12, 7), generator=g)
    ci = M.bootstrap_tokens(logits, labels, n_boot=50, seed=1)
    vals = []
    for idx in resample_indices(12, 50, torch.Generator().manual_seed(1)):
        vals += [M.token_metrics(logits[i], labels[i])["perplexity"] for i in idx]
    q = torch.quantile(torch.tensor(vals, dtype=F64), torch.tensor([0.025, 0.975], dtype=F64))
    assert ci["perplexity"].low == pytest.approx(float(q[0]), rel=1e-12)
    assert ci["perplexity"].high == pytest.approx(float(q[1]), rel=1e-12)
    assert ci["perplexity"].estimate == pytest.approx(M.token_metrics(logits, labels)["perplexity"], rel=1e-12)
    assert M.TokenMetrics().update(logits, labels).bootstrap(n_boot=50, seed=1) == ci


def test_bootstrap_speed_n10000():
    probs, y, _ = _data(10000, c=10, s=1, seed=9)
    t0 = time.perf_counter()
    ci = M.bootstrap_classification(probs, y, n_boot=1000, seed=0, metrics=["accuracy", "nll", "ece"])
    elapsed = time.perf_counter() - t0
    assert set(ci) == {"accuracy", "nll", "ece"}
    assert elapsed < 10.0, elapsed  # about 1 s on 2 CPU cores
