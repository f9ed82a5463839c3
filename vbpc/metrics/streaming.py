r"""Streaming, mergeable metric accumulators (docs/algorithms.md §9).

Each accumulator keeps

* **sums** -- counts and float64 sums (per-bin counts and gap sums :math:`\sum_{I_k}(\mathrm{corr}-c)`
  of eq. 34, NLL/Brier/entropy sums): :meth:`merge` adds them, so streaming over batches,
  merging shards and the one-shot functions agree up to float64 summation order (≈1e-15);
* **kept** per-example data for the statistics that need ranks or sorting (adaptive ECE, AURC,
  misclassification AUROC, OOD AUROC/AUPR/FPR95) and for bootstrap intervals: :meth:`merge`
  concatenates them (``merge(a, b)`` equals updating with ``a``'s batches, then ``b``'s).

Memory of the kept data (CPU): :class:`ClassificationMetrics` with ``keep_examples=True`` (the
default) 6 float64 + 1 bool per example (8 float64 with sample stacks), ≈ 50–70 MB per million
examples; ``keep_examples=False`` keeps only ``O(n_bins)`` sums (no adaptive ECE, AURC,
misclassification AUROC or bootstrap).  :class:`OODMetrics` keeps one float64 score per example.
:class:`TokenMetrics` keeps ``4 + 2·n_bins`` float64 per **sequence** (``keep_sequences``), never
per token.

Per-batch statistics are computed on the inputs' device; the accumulated state lives on the CPU.
:meth:`sync` (alias :meth:`all_reduce`) merges the states of all ``torch.distributed`` ranks
(``all_gather_object``, merged in rank order, so every rank ends with the same state); it is
a no-op when ``torch.distributed`` is not initialised.  It is a collective: call it once, on
every rank, after the last update.

The accumulators plug into :func:`vbpc.predictive.predict`'s ``on_batch(log_p̄, labels, stack)``::

    metrics = ClassificationMetrics(inputs="log_probs")
    predict(model, loader, posterior, n_samples=8, on_batch=metrics.update)
    metrics.compute()
"""

from __future__ import annotations

import math
from typing import Any, Optional, TypeVar, Union

import torch
from torch import Tensor

from ..errors import StateDictMismatchError
from ._checks import Inputs, as_enum, check_n_bins, check_stack, to_probs
from .bootstrap import BootstrapCI, bootstrap_example_stats, bootstrap_ood_scores, bootstrap_sequence_sums
from .classification import (
    Binning,
    CalibrationNorm,
    ReliabilityDiagram,
    bin_index,
    bin_sums,
    calibration_from,
    ece_from_sums,
    example_stats,
    mce_from_sums,
    prepare,
)
from .lm import sequence_sums, token_metrics_from_sums, token_stats
from .ood import OODScore, binary_metrics, check_scores, scores_from
from .selective import risks_from

__all__ = ["ClassificationMetrics", "OODMetrics", "TokenMetrics", "classification_metrics"]

A = TypeVar("A", bound="_Accumulator")


class _Accumulator:
    """Shared machinery: ``_sums`` (added by :meth:`merge`), ``_kept`` (concatenated), ``_meta``
    (must agree), a config (must be equal), state dicts and distributed sync."""

    _SUM_SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    _KEPT: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    # -- to be provided by subclasses
    def config(self) -> dict[str, Any]:
        """The constructor arguments (equal configs are required to merge or load)."""
        raise NotImplementedError

    def _sum_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._SUM_SHAPES)

    # -- state
    def reset(self) -> None:
        """Forget all updates."""
        self._sums = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in self._sum_shapes().items()}
        self._kept: dict[str, list[Tensor]] = {k: [] for k in self._KEPT}
        self._meta: dict[str, Any] = {}

    def _set_meta(self, key: str, value: Any, what: str) -> None:
        old = self._meta.get(key)
        if old is not None and value is not None and old != value:
            raise ValueError(f"{type(self).__name__}: {what} changed from {old!r} to {value!r} between updates")
        if value is not None:
            self._meta[key] = value

    def _kept_tensor(self, key: str) -> Tensor:
        parts = self._kept[key]
        if len(parts) > 1:  # consolidate once, keep the result
            self._kept[key] = parts = [torch.cat(parts)]
        return parts[0] if parts else torch.zeros(0, dtype=torch.float64)

    def merge(self: A, other: A) -> A:
        """Add ``other``'s state into this one (exact: sums add, kept data concatenate) and return ``self``."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.config() != self.config():
            raise ValueError(f"cannot merge {type(self).__name__} with different settings: "
                             f"{self.config()} vs {other.config()}")
        for k, v in other._meta.items():
            self._set_meta(k, v, k)
        for k in self._sums:
            self._sums[k] = self._sums[k] + other._sums[k]
        for k in self._kept:
            if other._kept[k]:
                self._kept[k].append(other._kept_tensor(k))
        return self

    def state_dict(self) -> dict[str, Any]:
        """Config, metadata, sums and kept data (CPU tensors; picklable, ``torch.save``-able)."""
        return {
            "type": type(self).__name__,
            "config": self.config(),
            "meta": dict(self._meta),
            "sums": {k: v.clone() for k, v in self._sums.items()},
            "kept": {k: self._kept_tensor(k).clone() for k in self._kept if self._kept[k]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the state by ``state`` (from :meth:`state_dict` of an accumulator with the same settings)."""
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            got = state.get("type") if isinstance(state, dict) else type(state).__name__
            raise StateDictMismatchError(f"state dict of {got!r} cannot be loaded into {type(self).__name__}")
        if state["config"] != self.config():
            raise StateDictMismatchError(f"{type(self).__name__} settings {self.config()} differ from the state "
                                         f"dict's {state['config']}")
        want = self._sum_shapes()
        sums = state["sums"]
        if set(sums) != set(want) or any(tuple(sums[k].shape) != want[k][0] for k in want):
            raise StateDictMismatchError(f"{type(self).__name__} state dict has sums "
                                         f"{ {k: tuple(v.shape) for k, v in sums.items()} }, expected "
                                         f"{ {k: s for k, (s, _) in want.items()} }")
        unknown = set(state["kept"]) - set(self._KEPT)
        if unknown:
            raise StateDictMismatchError(f"{type(self).__name__} state dict has unknown kept data {sorted(unknown)}")
        self._sums = {k: sums[k].to(dtype=want[k][1], device="cpu").clone() for k in want}
        self._kept = {k: ([state["kept"][k].cpu().clone()] if k in state["kept"] else []) for k in self._KEPT}
        self._meta = dict(state["meta"])

    def sync(self: A, group: Optional[Any] = None) -> A:
        """Merge the states of all ranks of ``group`` (default: the world) into every rank's
        accumulator, in rank order; a no-op unless ``torch.distributed`` is initialised.  Collective."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        states: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        merged = type(self)(**self.config())
        for st in states:
            part = type(self)(**self.config())
            part.load_state_dict(st)
            merged.merge(part)
        self._sums, self._kept, self._meta = merged._sums, merged._kept, merged._meta
        return self

    all_reduce = sync


class ClassificationMetrics(_Accumulator):
    r"""Streaming classification suite (§9): accuracy, NLL, Brier, ECE/MCE (eq. 34), mean
    predictive entropy and, with sample stacks, mean aleatoric uncertainty and MI (eq. 35);
    with ``keep_examples`` also adaptive ECE, AURC and misclassification AUROC, and bootstraps.

    Args:
        n_bins: equal-width bins :math:`M` (and adaptive groups).
        inputs: what :meth:`update` receives -- ``"probs"``, ``"log_probs"`` (e.g. eq. 33's
            logsumexp, as :func:`vbpc.predictive.predict` streams it) or ``"logits"``; sample
            stacks are of the same kind.
        keep_examples: keep per-example statistics (module docstring: memory).
    """

    def __init__(self, n_bins: int = 15, *, inputs: Union[str, Inputs] = "probs", keep_examples: bool = True):
        self.n_bins = check_n_bins(n_bins)
        self.inputs = as_enum(Inputs, inputs, "inputs")
        self.keep_examples = bool(keep_examples)
        super().__init__()

    def config(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "inputs": self.inputs.value, "keep_examples": self.keep_examples}

    _KEPT = ("confidence", "correct", "nll", "brier", "entropy", "aleatoric", "mi")

    def _sum_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        f, i, m = torch.float64, torch.long, (self.n_bins,)
        return {"n": ((), i), "correct": ((), i), "nll": ((), f), "brier": ((), f), "entropy": ((), f),
                "aleatoric": ((), f), "mi": ((), f),
                "bin_count": (m, i), "bin_correct": (m, i), "bin_confidence": (m, f), "bin_gap": (m, f)}

    def update(self, pred: Any, labels: Any, sample_stack: Optional[Any] = None) -> ClassificationMetrics:
        """Add a batch: predictive ``pred`` ``(N, C)``, integer ``labels`` ``(N,)`` and optionally the
        per-sample stack ``(S, N, C)``.  Stacks must be given for every batch or for none."""
        probs, log_probs, y = prepare(pred, labels, self.inputs)
        stack = None if sample_stack is None else check_stack(sample_stack, self.inputs, *probs.shape).to(
            probs.device)
        self._set_meta("n_classes", probs.shape[1], "the number of classes")
        if int(self._sums["n"]) > 0 and self._meta.get("sampled") != (stack is not None):
            raise ValueError("sample_stack must be given for every batch or for none "
                             f"(earlier batches: {'with' if self._meta.get('sampled') else 'without'})")
        self._meta["sampled"] = stack is not None
        st = {k: v.cpu() for k, v in example_stats(probs, log_probs, y, stack).items()}
        s = self._sums
        s["n"] += y.numel()
        s["correct"] += st["correct"].sum()
        for k in ("nll", "brier", "entropy", "aleatoric", "mi"):
            if k in st:
                s[k] += st[k].sum()
        bins = bin_sums(bin_index(st["confidence"], self.n_bins), st["confidence"], st["correct"], self.n_bins)
        for k in ("count", "correct", "confidence", "gap"):
            s[f"bin_{k}"] += bins[k]
        if self.keep_examples:
            for k, v in st.items():
                self._kept[k].append(v)
        return self

    def merge(self, other: ClassificationMetrics) -> ClassificationMetrics:
        if int(self._sums["n"]) and int(other._sums["n"]) and self._meta.get("sampled") != other._meta.get("sampled"):
            raise ValueError("cannot merge ClassificationMetrics with and without sample stacks")
        return super().merge(other)

    @property
    def n(self) -> int:
        """Number of examples seen."""
        return int(self._sums["n"])

    def examples(self) -> dict[str, Tensor]:
        """The kept per-example statistics (``keep_examples=True``), concatenated in update order."""
        if not self.keep_examples:
            raise ValueError("per-example statistics were not kept (keep_examples=False)")
        return {k: self._kept_tensor(k) for k in self._KEPT if self._kept[k]}

    def _check_nonempty(self) -> None:
        if self.n == 0:
            raise ValueError("ClassificationMetrics is empty: call update() first")

    def compute(self) -> dict[str, float]:
        """The metrics as floats: ``n``, ``accuracy``, ``nll``, ``brier``, ``ece``, ``mce``, ``entropy``;
        with sample stacks ``aleatoric``, ``mi``; with ``keep_examples`` ``adaptive_ece``, ``aurc`` and
        ``misclassification_auroc`` (NaN if all predictions are right or all wrong)."""
        self._check_nonempty()
        s, n = self._sums, float(self._sums["n"])
        out = {"n": n, "accuracy": float(s["correct"]) / n, "nll": float(s["nll"]) / n, "brier": float(s["brier"]) / n,
               "ece": float(ece_from_sums(s["bin_count"], s["bin_gap"])),
               "mce": float(mce_from_sums(s["bin_count"], s["bin_gap"])),
               "entropy": float(s["entropy"]) / n}
        if self._meta.get("sampled"):
            out["aleatoric"] = float(s["aleatoric"]) / n
            out["mi"] = float(s["mi"]) / n
        if self.keep_examples:
            conf, correct = self._kept_tensor("confidence"), self._kept_tensor("correct")
            out["adaptive_ece"] = calibration_from(conf, correct, self.n_bins, CalibrationNorm.L1, Binning.ADAPTIVE)
            out["aurc"] = float(risks_from(conf, correct).mean())
            out["misclassification_auroc"] = (binary_metrics(conf[correct], conf[~correct])["auroc"]
                                              if correct.any() and not correct.all() else math.nan)
        return out

    def reliability_diagram(self) -> ReliabilityDiagram:
        """Per-bin count, accuracy and mean confidence (eq. 34 bins) of everything seen."""
        self._check_nonempty()
        return ReliabilityDiagram.from_sums({k: self._sums[f"bin_{k}"] for k in ("count", "correct", "confidence",
                                                                                  "gap")})

    def bootstrap(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                  metrics: Optional[list[str]] = None) -> dict[str, BootstrapCI]:
        """Percentile-bootstrap intervals over examples (:func:`~vbpc.metrics.bootstrap.bootstrap_example_stats`)."""
        self._check_nonempty()
        return bootstrap_example_stats(self.examples(), self.n_bins, n_boot=n_boot, seed=seed, level=level,
                                       metrics=metrics)


class OODMetrics(_Accumulator):
    """Streaming OOD detection (§9, eq. 36): ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95`` of the
    in-domain-ness ``score`` (``"max_prob"``, ``"entropy"``, ``"mi"``); keeps one float64 score per
    example.  Feed in-domain batches to :meth:`update_in`, OOD batches to :meth:`update_out` (or
    precomputed scores to :meth:`update_scores`)."""

    _KEPT = ("scores_in", "scores_out")

    def __init__(self, score: Union[str, OODScore] = "max_prob", *, inputs: Union[str, Inputs] = "probs"):
        self.score = as_enum(OODScore, score, "score")
        self.inputs = as_enum(Inputs, inputs, "inputs")
        super().__init__()

    def config(self) -> dict[str, Any]:
        return {"score": self.score.value, "inputs": self.inputs.value}

    def _scores(self, pred: Any, sample_stack: Optional[Any], what: str) -> Tensor:
        probs, _ = to_probs(pred, self.inputs, what)
        self._set_meta("n_classes", probs.shape[1], "the number of classes")
        stack = None if sample_stack is None else check_stack(sample_stack, self.inputs, *probs.shape).to(
            probs.device)
        return scores_from(probs, stack, self.score).cpu()

    def update_in(self, pred: Any, sample_stack: Optional[Any] = None) -> OODMetrics:
        """Add in-domain predictives ``(N, C)`` (and per-sample stack ``(S, N, C)`` for ``score="mi"``)."""
        self._kept["scores_in"].append(self._scores(pred, sample_stack, "pred_in"))
        return self

    def update_out(self, pred: Any, sample_stack: Optional[Any] = None) -> OODMetrics:
        """Add OOD predictives ``(N, C)`` (and per-sample stack ``(S, N, C)`` for ``score="mi"``)."""
        self._kept["scores_out"].append(self._scores(pred, sample_stack, "pred_out"))
        return self

    def update_scores(self, scores_in: Optional[Any] = None, scores_out: Optional[Any] = None) -> OODMetrics:
        """Add precomputed 1-D scores (higher = more in-domain)."""
        if scores_in is not None:
            self._kept["scores_in"].append(check_scores(scores_in, "scores_in").cpu())
        if scores_out is not None:
            self._kept["scores_out"].append(check_scores(scores_out, "scores_out").cpu())
        return self

    def scores(self) -> tuple[Tensor, Tensor]:
        """All in-domain and OOD scores, in update order."""
        return self._kept_tensor("scores_in"), self._kept_tensor("scores_out")

    def _check_nonempty(self) -> tuple[Tensor, Tensor]:
        s_in, s_out = self.scores()
        if s_in.numel() == 0 or s_out.numel() == 0:
            raise ValueError(f"OODMetrics needs in-domain and OOD examples; have {s_in.numel()} in-domain "
                             f"(update_in) and {s_out.numel()} OOD (update_out)")
        return s_in, s_out

    def compute(self) -> dict[str, float]:
        """``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95`` (and ``n_in``, ``n_out``)."""
        s_in, s_out = self._check_nonempty()
        m = binary_metrics(s_in, s_out)
        return {"auroc": m["auroc"], "aupr_in": m["ap"], "aupr_out": m["ap_rev"], "fpr95": m["fpr"],
                "n_in": float(s_in.numel()), "n_out": float(s_out.numel())}

    def bootstrap(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, BootstrapCI]:
        """Intervals resampling in-domain and OOD examples independently."""
        s_in, s_out = self._check_nonempty()
        return bootstrap_ood_scores(s_in, s_out, n_boot=n_boot, seed=seed, level=level)


class TokenMetrics(_Accumulator):
    """Streaming token-level LM calibration (§9; :mod:`vbpc.metrics.lm`): ``accuracy``, ``nll``,
    ``perplexity``, ``brier``, ``ece``, ``mce``, ``n_tokens``; per-sequence sums are kept for the
    sequence bootstrap (``keep_sequences``, ``4 + 2·n_bins`` float64 per sequence)."""

    _KEPT = ("sequences",)

    def __init__(self, n_bins: int = 15, *, inputs: Union[str, Inputs] = "logits", ignore_index: int = -100,
                 shift: bool = True, keep_sequences: bool = True):
        self.n_bins = check_n_bins(n_bins)
        self.inputs = as_enum(Inputs, inputs, "inputs")
        self.ignore_index = int(ignore_index)
        self.shift = bool(shift)
        self.keep_sequences = bool(keep_sequences)
        super().__init__()

    def config(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "inputs": self.inputs.value, "ignore_index": self.ignore_index,
                "shift": self.shift, "keep_sequences": self.keep_sequences}

    def _sum_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"total": ((4 + 2 * self.n_bins,), torch.float64), "n_sequences": ((), torch.long)}

    def update(self, pred: Any, labels: Any, attention_mask: Optional[Any] = None) -> TokenMetrics:
        """Add a batch: ``pred`` ``(B, T, V)``, ``labels`` ``(B, T)``, optional ``attention_mask`` ``(B, T)``."""
        stats = token_stats(pred, labels, attention_mask, inputs=self.inputs, ignore_index=self.ignore_index,
                            shift=self.shift)
        seq = sequence_sums(stats, self.n_bins).cpu()
        self._sums["total"] += seq.sum(0)
        self._sums["n_sequences"] += seq.shape[0]
        if self.keep_sequences:
            self._kept["sequences"].append(seq)
        return self

    def sequences(self) -> Tensor:
        """Per-sequence sums ``(n_seq, 4 + 2·n_bins)`` (:func:`~vbpc.metrics.lm.sequence_sums`)."""
        if not self.keep_sequences:
            raise ValueError("per-sequence sums were not kept (keep_sequences=False)")
        return self._kept_tensor("sequences")

    def _check_nonempty(self) -> None:
        if float(self._sums["total"][0]) == 0:
            raise ValueError("TokenMetrics has no target tokens: call update() with unmasked targets first")

    def compute(self) -> dict[str, float]:
        """The pooled token metrics as floats (see the class docstring)."""
        self._check_nonempty()
        return {k: float(v) for k, v in token_metrics_from_sums(self._sums["total"], self.n_bins).items()}

    def bootstrap(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, BootstrapCI]:
        """Intervals resampling whole sequences."""
        self._check_nonempty()
        return bootstrap_sequence_sums(self.sequences(), self.n_bins, n_boot=n_boot, seed=seed, level=level)


def classification_metrics(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs",
                           sample_stack: Optional[Any] = None, n_bins: int = 15) -> dict[str, float]:
    """The whole classification suite at once (:meth:`ClassificationMetrics.compute` of one batch)."""
    return ClassificationMetrics(n_bins, inputs=inputs).update(pred, labels, sample_stack).compute()
