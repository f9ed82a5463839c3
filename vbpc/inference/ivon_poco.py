r"""IVON-PoCo and IVON-PoCoMo: IVON with gradient and diagonal-Hessian posterior correction
(docs/algorithms.md §6).

The learner is :class:`vbpc.IVON` plus the correction of :mod:`vbpc.inference.poco`:

.. math::
    \text{refresh: } & m_{out}\leftarrow m,\ h_{out}\leftarrow h,\ (\lambda_{out},\delta_{out}),\
        \bar g_{out},\bar h_{out}=\text{chunk-weighted means at } m_{out}+\sigma_{out}\odot z' \hfill (21)\\
    \text{step, per sample } s: & \theta_s=m+\sigma\odot z_s\to\hat g_{in},\ \hat h_{in};\quad
        \theta^{out}_s=m_{out}+\sigma_{out}\odot z^{out}_s\to\hat g_{out},\ \hat h_{out}\\
    & \tilde g=(\hat g_{in}-\alpha_t\hat g_{out})+\alpha_t\bar g_{out},\quad
      \tilde h=(\hat h_{in}-\alpha_t\hat h_{out})+\alpha_t\bar h_{out} \hfill (22)\\
    & [\texttt{proximal}]\ \tilde g \mathrel{+}= \alpha_t(\bar h_{out}-\hat h_{out})\odot(m-m_{out}) \hfill (23)\\
    & \text{IVON (7)-(10) with } \hat g\to\tilde g,\ \hat h\to\tilde h.

Both passes of a sample use the same batch (the closure) and the same replayed global RNG
(§6.3); with ``anchor_noise="shared"`` (default) :math:`z^{out}_s=z_s`.  At :math:`\alpha_t=0`
(warm-up, the last linear interval) the anchor pass is skipped and the step is IVON's, bit
for bit (§4 P3).  ``beta1=0`` is IVON-PoCo, ``beta1>0`` IVON-PoCoMo (:func:`IVONPoCoMo`).

Cost: 2 forward/backward passes per sample plus ``refresh_mc``·|M| examples per refresh
(eq. 24).  Memory: IVON's 3d state + :math:`m_{out},h_{out},\bar g_{out},\bar h_{out}` and the
cached :math:`(h_{out}+\delta_{out})^{-1/2}` (5d; ``anchor_device="cpu"`` offloads them at the
price of 2d host-device copies per step) + 2d transient accumulators.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .. import _dtensor as dt
from .. import _runtime as ranks
from .._runtime import capture_rng, restore_rng
from ..errors import NonFiniteError, SamplingError, StateDictMismatchError
from ..functional import ivon_rsqrt_, perturb_, poco_correct_
from ..posterior import perturbation
from .correction import ALPHA_MODES, ANCHOR_UPDATES, CorrectedLearner, PoCo
from .gradwatch import GradWatch, is_placeholder
from .ivon import IVON, _forward_public

__all__ = ["IVONPoCo", "IVONPoCoMo", "ALPHA_MODES", "ANCHOR_UPDATES"]


class IVONPoCo(CorrectedLearner, IVON):
    r"""IVON with posterior correction (docs/algorithms.md §6; options and defaults of §6.2).

    Takes every :class:`vbpc.IVON` argument (``beta1`` defaults to 0 here: IVON-PoCo; built as
    ``vbpc.IVON(..., correction=...)`` it keeps IVON's default 0.9, i.e. IVON-PoCoMo) plus the correction,
    either as ``correction=vbpc.PoCo(...)`` or as the same options given as keyword arguments
    (:class:`vbpc.PoCo` validates them; ``vbpc.IVON(..., correction=vbpc.PoCo(...))`` builds this learner):
    ``alpha`` (1.0), ``alpha_schedule`` (``"constant"`` | ``"linear"``, with ``total_steps``),
    ``anchor_period`` T, ``warmup_steps``, ``megabatch_size``, ``refresh_mc`` (1),
    ``refresh_antithetic`` (True: ±z' pairs in the refresh, a [vbpc] choice that keeps the
    mega-batch Price :math:`\bar h_{out}` from being swamped by the :math:`z\odot\nabla\bar\ell/\sigma`
    term; without it IVON-PoCo diverged on the convex benchmark),
    ``anchor_noise`` (``"shared"`` | ``"independent"``), ``anchor_seed``, ``proximal`` (False),
    ``correct_hessian`` (True; False corrects the gradient only: with a tiny σ the Price
    correction :math:`z\odot(\hat g_{in}-\hat g_{out})/\sigma` grows like :math:`\|m-m_{out}\|/\sigma`),
    ``force_anchor_pass`` (tests), ``anchor_device`` and ``track_stats`` (keep the last
    :math:`\tilde g,\tilde h` and the in/out estimates, for tests and diagnostics).

    **Mega-batch remedies** (the error of a mega-batch :math:`\bar g_{out}` is frozen for a whole
    period and acts as a bias :math:`\alpha_t(\bar g_{out}-\mathbb E\hat g_{out})` on every step):

    * ``alpha_mode="optimal"``: per tensor :math:`j`, the control-variate coefficient
      :math:`\alpha^*_j=\mathrm{Cov}(\hat g_{in},\hat g_{out})/\mathrm{Var}(\hat g_{out})`, with
      :math:`\bar g_{out}` as the mean of :math:`\hat g_{out}`, estimated online from the two passes
      every corrected step already makes, :math:`d=\hat g_{out}-\bar g_{out}`:

      .. math:: c_j\leftarrow\beta c_j+(1-\beta)\textstyle\sum\hat g_{in}\odot d,\quad
                v_j\leftarrow\beta v_j+(1-\beta)\textstyle\sum d\odot d,\quad
                \alpha_j=\mathrm{clip}_{[0,1]}(c_j/v_j)\cdot\alpha_t/\alpha_0

      (β = ``alpha_smoothing``).  :math:`v_j` contains :math:`\lVert\bar g_{out}-\mathbb E\hat g_{out}\rVert^2`,
      so a mega-batch error lowers :math:`\alpha_j` (the MSE-optimal coefficient).  A step uses the
      estimate of the steps before it (its own batch never sets its own α); the first corrected step
      uses :math:`\alpha_t`.  The Hessian and the proximal term keep :math:`\alpha_t`.
    * ``anchor_update="running"``: after each corrected step, the anchor-pass gradient of its batch
      (an unbiased draw of :math:`\mathbb E_{q_{out}}\nabla\bar\ell`, independent of the mega-batch)
      is folded into :math:`\bar g_{out}` as a size-weighted mean,
      :math:`\bar g_{out}\leftarrow\bar g_{out}+\frac{|B|}{n+|B|}(\hat g_{out}-\bar g_{out})`, so the
      anchor mean's error shrinks like :math:`1/(|M|+k|B|)` within the period.  **Bias:** step
      :math:`t` uses the mean of the mega-batch and of the batches *before* it, never its own, so the
      correction stays conditionally mean-zero; its bias is :math:`\alpha_t(\bar g_{out,t}-\mathbb E\hat g_{out})`,
      the same form as the frozen anchor's with :math:`|M|\to|M|+k|B|` examples.  :math:`\bar h_{out}` stays
      frozen (single-draw Price estimates would bring back the variance the antithetic refresh removes).
      Needs ``step(..., batch_size=)``.

    **Gradient clipping** (``clip_grad_norm`` :math:`r`): a corrected step clips the *corrected*
    gradient, after the correction (and the proximal term), with one global L2 norm over every
    trainable parameter:

    .. math:: \tilde g\leftarrow\min\big(1,\ r/(\lVert\tilde g\rVert_2+10^{-6})\big)\,\tilde g

    :math:`\tilde h`, the anchor pass and the refresh are never clipped.  Do **not** clip inside the
    closure: the current and the anchor pass would get different factors and :math:`\bar g_{out}`
    is never clipped, so :math:`\hat g_{in}-\hat g_{out}+\bar g_{out}` would no longer cancel to a
    low-variance estimate.  At :math:`\alpha_t=0` the step is IVON's and so is the clip (each
    sample's gradient, hence its Price statistic).  Under ``sync`` the statistics are averaged over
    ranks first, so every rank clips identically.  ``counters["clipped_steps"]`` counts the steps
    where the factor was below 1.

    Usage::

        opt = vbpc.IVONPoCo(model.parameters(), lr=0.1, ess=N, anchor_period=len(loader))
        for x, y in loader:
            if opt.refresh_due:
                opt.refresh(lambda b: F.cross_entropy(model(b[0]), b[1]), megabatch, model=model)
            opt.step(closure)   # closure closes over (x, y): the anchor pass sees the same batch
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: Optional[float] = None,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = float("inf"),
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = True,
        *,
        correction: Optional[PoCo] = None,
        **kw: Any,
    ):
        if beta1 is None:  # 0 (IVON-PoCo); built as vbpc.IVON(..., correction=...): IVON's default, 0.9
            beta1 = self.__dict__.pop("_beta1_default", 0.0)
        options, ivon_kw = PoCo.split(kw, correction)
        if ivon_kw.get("parity"):
            raise ValueError("parity=True is a contract with the reference IVON; IVON-PoCo has no reference")
        if hess_approx != "price":
            raise ValueError(f"invalid hess_approx={hess_approx!r}: IVON-PoCo corrects the Price Hessian only")
        super().__init__(params, lr, ess, hess_init, beta1, beta2, weight_decay, mc_samples, hess_approx,
                         clip_radius, sync, debias, rescale_lr, **ivon_kw)
        self._init_correction(options, self._anchor_params())
        self._batch_now: Optional[int] = None
        self.last_alpha: Optional[list[Tensor]] = None  # alpha_mode="optimal" with track_stats
        self._batch_hint: Optional[int] = None  # set_batch_size: the next step's batch size
        self._in_anchor = False  # the closure is running at the anchor sample (see in_anchor_pass)
        self._pairs = 0  # samples collected by sample() for the next step()

    def _clip_mode(self) -> str:
        """``clip_grad_norm`` clips the corrected :math:`\tilde g` when the step is corrected, and each
        sample's gradient (IVON's rule) when :math:`\alpha_t=0`, so α=0 stays IVON bit for bit."""
        return "corrected" if self.correction.anchor_pass and self.correction.alpha_now != 0.0 else "sample"

    def _anchor_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in self._trainable(g)]

    def _offsets(self) -> dict[int, int]:
        """Index of each group's first trainable parameter in the anchor's lists."""
        out, off = {}, 0
        for gi, g in enumerate(self.param_groups):
            out[gi] = off
            off += len(self._trainable(g))
        return out

    # ------------------------------------------------------------------ refresh
    def _check_can_refresh(self) -> None:
        if self._active or self._count:
            raise SamplingError("IVONPoCo.refresh() while samples are pending: call step() first")

    def _refresh_anchor(self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, model: Optional[nn.Module],
                        batch_size: Optional[Callable[[Any], int]], progress: bool) -> tuple[int, int]:
        r""":math:`m_{out}\leftarrow m`, :math:`h_{out}\leftarrow h`, group :math:`(\lambda,\delta)`, and the
        mega-batch means :math:`\bar g_{out},\bar h_{out}` (Price) at samples :math:`m_{out}+\sigma_{out}\odot z'`."""
        params = self._anchor_params()
        if [id(p) for p in params] != [id(p) for p in self.anchor.params]:
            self.anchor.params = params
        h_out, rsqrt_out, scale, ess_l, wd_l = [], [], [], [], []
        for g in self.param_groups:
            for p in self._trainable(g):
                st = self._state(p, g)
                h = st["hess"].detach().clone()
                hw, r = torch.empty_like(h), torch.empty_like(h)
                ivon_rsqrt_([h], g["weight_decay"], [hw], [r], foreach=False)
                h_out.append(h)
                rsqrt_out.append(r)
                scale.append(r / math.sqrt(g["ess"]))  # σ_out = (h_out+δ)^{-1/2}/√λ
                ess_l.append(float(g["ess"]))
                wd_l.append(float(g["weight_decay"]))
        o = self.poco
        passes = self.anchor.refresh(
            loss_fn, data, scale=scale, hessian=True, refresh_mc=o.refresh_mc, antithetic=o.refresh_antithetic,
            extra={"hess": h_out, "rsqrt": rsqrt_out, "ess": ess_l, "weight_decay": wd_l},
            means=[self.state[p].get("mean", p) for p in params],  # fp32 masters where they exist
            names=self._names(params), model=model, batch_size=batch_size,
            max_examples=o.megabatch_size, progress=progress, step=self.t, sync=self.sync)
        draws = o.refresh_mc * (2 if o.refresh_antithetic else 1)
        return passes, self.anchor.examples * draws  # gradient evaluations

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,  # type: ignore[override]
             batch_size: Optional[int] = None) -> Optional[Tensor]:
        """One corrected IVON step; ``closure`` is evaluated at the current and the anchor sample.

        ``batch_size`` (optional) feeds ``counters["inner_examples"]`` (gradient evaluations); it is
        required with ``anchor_update="running"`` (the weight of the batch in the anchor mean)."""
        if batch_size is None:
            batch_size = self._batch_hint
        self._batch_hint = None
        if batch_size is None and self.poco.anchor_update == "running":
            raise ValueError("anchor_update='running' needs step(..., batch_size=len(batch)): the batch's weight "
                             "in the running anchor mean")
        self._batch_now = None if batch_size is None else int(batch_size)
        if closure is not None and self._pairs and self._placeholder(closure):
            closure = None  # Lightning's LightningOptimizer.step() under manual optimization
        if closure is None:
            if not self._pairs:
                raise SamplingError("IVONPoCo.step needs a closure (it evaluates the same batch twice), or "
                                    "samples collected with IVONPoCo.sample(closure) first")
            samples, self._pairs = self._pairs, 0
            loss = super().step(None)
        else:
            if self._pairs:
                raise SamplingError("IVONPoCo.step(closure) with samples pending from sample(): call step() "
                                    "without a closure to use them")
            self.correction.begin_step()
            samples = self.mc_samples
            loss = super().step(closure)
        self.correction.count_step(samples * (2 if self.correction.anchor_pass else 1), batch_size)
        return loss

    def set_batch_size(self, batch_size: Optional[int]) -> None:
        """The batch size of the next ``step()`` when the code that calls ``step`` cannot pass it (a
        framework's loop: :class:`vbpc.integrations.lightning.VBCallback`, :class:`~vbpc.integrations.hf.VBTrainer`);
        it feeds ``counters["inner_examples"]`` and the running anchor mean, and is used once."""
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"invalid batch_size={batch_size!r}: an int >= 1 or None")
        self._batch_hint = batch_size

    @property
    def in_anchor_pass(self) -> bool:
        """``True`` while the closure runs at the anchor sample.  A training step can skip side effects
        there (metric updates, logging: :class:`vbpc.integrations.lightning.VBCallback` drops
        ``LightningModule.log`` calls made in the anchor pass)."""
        return self._in_anchor

    @property
    def pending_samples(self) -> int:
        """Samples collected by :meth:`sample` for the next ``step()``."""
        return self._pairs

    def _placeholder(self, closure: Callable[[], Any]) -> bool:
        """Whether ``closure`` is a framework's placeholder: it returns ``None`` and runs no backward pass
        (evaluated once at the mean weights, the random state put back)."""
        params = self._anchor_params()
        grads = [p.grad for p in params]
        rng = capture_rng()
        watch = GradWatch(params, lambda: self._names(params))
        try:
            with torch.enable_grad(), watch:
                out = closure()
        finally:
            restore_rng(rng)
        return is_placeholder(out, watch, params, grads)

    def sample(self, closure: Callable[[], Tensor]) -> Tensor:
        """Collect one MC sample of the next step from ``closure`` (the current and the anchor pass on
        the same batch, replayed RNG) without updating; a later ``step()`` without closure uses every
        sample collected since the last step.  For loops that own the step and accumulate over
        micro-batches (``transformers.Trainer``, :class:`vbpc.integrations.hf.VBTrainer`)."""
        if self._active:
            raise SamplingError("IVONPoCo.sample() inside sampled_params(); leave the context first")
        if not self._pairs:
            self.correction.begin_step()
        try:
            loss = self._closure_sample(closure)
            assert loss is not None  # only a placeholder closure (noop_ok) gives None
        except BaseException:
            self._reset_samples()
            self._pairs = 0
            raise
        self._pairs += 1
        return loss

    def _closure_sample(self, closure: Callable[[], Tensor], noop_ok: bool = False) -> Optional[Tensor]:
        if not self.correction.anchor_pass:
            return super()._closure_sample(closure, noop_ok)
        draw, ctx = self._sample_context("IVONPoCo.step")
        in_closure, out_closure = self._pass_closures(closure)

        def anchor() -> None:
            out_draw, out_ctx = self._anchor_context(draw)
            watch = self._watch(out_draw)
            self._in_anchor = True
            try:
                with self._norm(first=False, anchor=True):
                    loss_out = self._run_closure(out_closure, out_ctx, watch)
            finally:
                self._in_anchor = False
            self._check_foreign(watch)
            if not bool(torch.isfinite(loss_out).all()):
                raise NonFiniteError(f"the closure returned a non-finite loss ({loss_out.item()}) at the anchor "
                                     "sample; the step was skipped and no state changed")
            self._collect(out_draw, out=True)

        def current() -> Tensor:
            watch = self._watch(draw)
            with self._norm(first=self._count == 0):
                loss = self._run_closure(in_closure, ctx, watch)
            self._check_foreign(watch)
            self._collect(draw)
            return loss

        # The anchor pass runs first, so the current pass is the closure's last evaluation (frameworks
        # report the last call's loss and outputs).
        return self.correction.two_pass(current, anchor, anchor_first=True)

    def _pass_closures(self, closure: Callable[[], Tensor]) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
        """The closures of the current and the anchor pass: the same batch for PoCo (§6.3);
        the continual learner evaluates new data + memory, then the memory only (eq. 29)."""
        return closure, closure

    def _anchor_context(self, draw: list[tuple[int, list[Tensor], list[Tensor]]]):
        """θ_out = m_out + σ_out ⊙ z_out written in place (the same kernel as the current sample)."""
        means = self.anchor.mean
        assert means is not None
        offsets = self._offsets()
        r_out = self.anchor.extra["rsqrt"]
        ess_out = self.anchor.extra["ess"]
        out_draw = []
        for gi, params, z in draw:
            if self.poco.anchor_noise == "independent":  # a DTensor's shard of the full draw
                z = [dt.local(dt.randn_like(p, self.anchor.generator, zi.dtype)) for p, zi in zip(params, z)]
            out_draw.append((gi, params, z))
        targets = [p for _, ps, _ in out_draw for p in ps]

        def write() -> None:
            for gi, params, z in out_draw:
                o = offsets[gi]
                for i, (p, zi) in enumerate(zip(params, z)):
                    m_out = dt.local(means[o + i].to(p.device))
                    r = dt.local(r_out[o + i].to(p.device))
                    loc = dt.local(p)
                    if "mean" in self.state[p]:  # fp32 master: build θ_out in fp32, then cast
                        v = m_out.clone()
                        perturb_([v], [zi], [r], ess_out[o + i], foreach=False)
                        loc.copy_(v)
                    else:
                        loc.copy_(m_out)
                        perturb_([loc], [zi], [r], ess_out[o + i], foreach=False)

        return out_draw, perturbation(targets, lambda: self._names(targets), "IVONPoCo.step (anchor)", write)

    # ------------------------------------------------------------------ correction hook
    def _track(self, gi: int, stats: dict[str, list[Tensor]]) -> None:
        """``track_stats``: keep this step's statistics of every group, in the learner's parameter
        order (:math:`\tilde g` as corrected, before ``clip_grad_norm``)."""
        if gi == min(self._acc) or self.last_stats is None:
            self.last_stats = {k: list(v) for k, v in stats.items()}
        else:
            for k, v in stats.items():
                self.last_stats.setdefault(k, []).extend(v)

    def _correct(self, gi: int, group: dict, ws: dict, hess: list[Tensor], price: bool) -> bool:
        r"""Eqs. (22)-(23) on group ``gi``: rewrite ĝ and the statistic as :math:`\tilde g` and
        :math:`\tilde h/\sqrt\lambda` (the fused kernel's non-Price input)."""
        alpha = self.correction.alpha_now
        if not self.correction.anchor_pass or alpha == 0.0:
            if self.poco.track_stats and gi == min(self._acc):
                self.last_stats = self.last_alpha = None
            return price
        o = self._offsets()[gi]
        n = len(ws["params"])
        a = self.anchor
        ess = float(group["ess"])
        root = math.sqrt(ess)
        g_bar = self._loc(a.grad[o:o + n])  # type: ignore[index]
        h_bar = self._loc(a.hess[o:o + n])  # type: ignore[index]
        r_out = self._loc(a.extra["rsqrt"][o:o + n])
        # ĥ = √λ · mean(z⊙g) / r  (fast-path Price statistic, eq. 5)
        # into the scratch lists (free once samples are collected: no allocation per step)
        h_in = [torch.mul(s, root, out=b).div_(r) for s, r, b in zip(ws["stat"], ws["rsqrt"], ws["s1"])]
        h_out = [torch.mul(s, math.sqrt(e), out=b).div_(r.to(s.device))
                 for s, r, e, b in zip(ws["stat_out"], r_out, a.extra["ess"][o:o + n], ws["s2"])]
        g_in = ws["ghat"]
        if self.poco.track_stats:
            snap = {"g_in": [t.clone() for t in g_in], "g_out": [t.clone() for t in ws["grad_out"]],
                    "h_in": [t.clone() for t in h_in], "h_out": [t.clone() for t in h_out]}
        if self.poco.alpha_mode == "optimal":
            self._correct_optimal(gi, ws, g_in, g_bar, alpha)
        else:
            poco_correct_(g_in, ws["grad_out"], g_bar, alpha)
        if self.poco.proximal:  # eq. (23), added to g̃ (ĥ_out is still intact): α(h̄ − ĥ_out)⊙(m − m_out)
            m_outs = self._loc(a.mean[o:o + n])  # type: ignore[index]
            for gt, hb, ho, p, m_out in zip(g_in, h_bar, h_out, ws["params"], m_outs):
                mean = dt.local(self.state[p].get("mean", p))
                gt.add_((hb.to(ho.device) - ho).mul_(mean - m_out.to(mean.device)), alpha=alpha)
        if not self.poco.correct_hessian:
            if self.poco.track_stats:
                self._track(gi, {**snap, "g_tilde": [t.clone() for t in g_in], "h_tilde": [t.clone() for t in h_in]})
            return price  # ws["stat"] still holds the uncorrected Price statistic
        poco_correct_(h_in, h_out, h_bar, alpha)
        if self.poco.track_stats:
            self._track(gi, {**snap, "g_tilde": [t.clone() for t in g_in], "h_tilde": [t.clone() for t in h_in]})
        for s, h in zip(ws["stat"], h_in):  # the kernel's gradsq-style input: h̃/√λ
            torch.div(h, root, out=s)
        return False

    def _correct_optimal(self, gi: int, ws: dict, g_in: list[Tensor], g_bar: list[Tensor], alpha: float) -> None:
        r"""Eq. (22) with a per-tensor :math:`\alpha_j=\mathrm{clip}_{[0,1]}(c_j/v_j)\,\alpha_t/\alpha_0` from the
        previous steps' running moments (no host sync), then fold this step's moments in."""
        beta = self.poco.alpha_smoothing
        scale = alpha / self.poco.alpha
        alphas, sums = [], []
        for p, g, go, gb in zip(ws["params"], g_in, ws["grad_out"], g_bar):
            st = self.state[p]
            if "cv_cov" not in st:
                st["cv_cov"] = torch.zeros((), dtype=torch.float64, device=g.device)
                st["cv_var"] = torch.zeros((), dtype=torch.float64, device=g.device)
            cov, var = st["cv_cov"], st["cv_var"]
            ratio = (cov / var.clamp(min=torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)
            a_j = torch.where(var > 0, ratio * scale, alpha).to(g.dtype)  # no estimate yet: α_t
            d = go - gb.to(go.device, go.dtype)
            sums.append((torch.sum(g * d, dtype=torch.float64), torch.sum(d * d, dtype=torch.float64)))
            g.sub_(go * a_j).add_(gb.to(g.device, g.dtype) * a_j)  # (ĝ_in − α ĝ_out) + α ḡ_out
            alphas.append(a_j)
        if self._sharded:  # sums over the local shards: add the other shards' (one all-reduce)
            flat = dt.global_sums([x for pair in sums for x in pair], [p for p in ws["params"] for _ in range(2)])
            sums = list(zip(flat[0::2], flat[1::2]))
        for p, (gd, dd) in zip(ws["params"], sums):
            self.state[p]["cv_cov"].mul_(beta).add_(gd, alpha=1.0 - beta)
            self.state[p]["cv_var"].mul_(beta).add_(dd, alpha=1.0 - beta)
        if self.poco.track_stats:  # every group's, in the learner's parameter order
            if gi == min(self._acc) or self.last_alpha is None:
                self.last_alpha = alphas
            else:
                self.last_alpha.extend(alphas)

    def alpha_estimates(self) -> dict[str, float]:
        r"""``alpha_mode="optimal"``: the current per-tensor :math:`\mathrm{clip}_{[0,1]}(c_j/v_j)` by parameter
        name (before the schedule factor); empty before the first corrected step."""
        out = {}
        for g in self.param_groups:
            for p in self._trainable(g):
                st = self.state.get(p, {})
                if "cv_var" in st and float(st["cv_var"]) > 0:
                    out[self._names([p])[0]] = min(1.0, max(0.0, float(st["cv_cov"] / st["cv_var"])))
        return out

    def _update(self) -> None:
        super()._update()
        if self.poco.anchor_update == "running" and self.correction.anchor_pass and self.correction.alpha_now != 0.0:
            self._fold_anchor()

    @torch.no_grad()
    def _fold_anchor(self) -> None:
        r"""``anchor_update="running"``: fold this step's anchor-pass mean into the anchor (after the step
        used the old one), :math:`\bar g_{out}\leftarrow\bar g_{out}+\frac{|B|}{n+|B|}(\hat g_{out}-\bar g_{out})`."""
        a = self.anchor
        assert a.grad is not None and self._batch_now is not None
        b = self._batch_now * (ranks.world_size() if self._synced() else 1)
        w = b / (a.examples + b)
        offsets = self._offsets()
        for gi, ws in self._acc.items():
            o = offsets[gi]
            for i, go in enumerate(ws["grad_out"]):
                gb = dt.local(a.grad[o + i])
                gb.add_(go.to(gb.device, gb.dtype).sub(gb), alpha=w)
        a.examples += b

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["vbpc"].update(poco=self.correction.state_dict())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("vbpc", {}).get("poco")
        if extra is None:
            raise StateDictMismatchError("not an IVON-PoCo state dict (no 'vbpc.poco' section)")
        self.correction.check_state(extra)  # validates shapes before anything changes
        super().load_state_dict(state_dict)
        self.correction.load_state_dict(extra)


# the mixin's public methods (refresh) run on the learner itself when called through a framework's wrapper
# (Lightning's LightningOptimizer), as IVON's own do
_forward_public(CorrectedLearner)


class IVONPoCoMo(IVONPoCo):
    """IVON-PoCoMo: :class:`IVONPoCo` with momentum (``beta1 = 0.9`` by default, §6.2)."""

    def __init__(self, params: Iterable[Any], lr: float, ess: float, beta1: float = 0.9, **kw: Any):
        super().__init__(params, lr, ess, beta1=beta1, **kw)
