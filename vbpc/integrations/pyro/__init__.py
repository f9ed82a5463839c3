r"""Pyro interoperability: a Bayes-by-backprop baseline and vbpc posteriors as Pyro guides.

**Bayes by backprop** (Blundell et al., 2015) through Pyro's stochastic variational
inference, on the *same* ``nn.Module`` that vbpc's learners train.  With vbpc's scaling
convention (docs/algorithms.md §1: mean loss, ``ess`` :math:`=\lambda`, ``weight_decay``
:math:`=\delta`) :class:`BayesByBackprop` minimises the negative ELBO of eq. (2) over a
mean-field Gaussian :math:`q=\mathcal N(m,\mathrm{diag}(\sigma^2))`,

.. math::
    \mathcal E(q)=\lambda\,\mathbb E_q\big[\bar\ell_B(\theta)\big]
        +\mathrm{KL}\big(q\,\big\|\,\mathcal N(0,(\lambda\delta)^{-1}I)\big),\qquad
    \bar\ell_B(\theta)=\tfrac1{|B|}\textstyle\sum_{i\in B}-\log p(y_i\mid x_i,\theta),

i.e. the likelihood of a mini-batch is scaled by :math:`\lambda/|B|`
(``poutine.scale``) while the KL term, computed in closed form by
``TraceMeanField_ELBO``, is not scaled.  The prior standard deviation is
:math:`1/\sqrt{\lambda\delta}` (pass ``weight_decay`` or ``prior_std``).  The learned
posterior maps onto :class:`vbpc.DiagonalGaussian` with the same :math:`\lambda,\delta`
and :math:`h=1/(\lambda\sigma^2)-\delta`, so that :math:`\lambda(h+\delta)=1/\sigma^2`.

**Export.** :func:`to_pyro_model` turns a copy of any network into a Pyro model whose
latent sites are the parameters in scope, named exactly as in ``named_parameters``;
:func:`to_pyro_guide` turns any :class:`vbpc.GaussianPosterior` over those names into a
matching guide, so that ``pyro.infer.Predictive(pyro_model, guide=guide,
num_samples=S)(x)`` samples the posterior predictive

.. math::
    p(y\mid x)\approx\frac1S\sum_{s=1}^S p(y\mid x,\theta_s),\qquad \theta_s\sim q .

Pyro's parameter store is global and keyed by name, so two learners over the same
architecture would silently share parameters.  Every ``PyroModule`` here is therefore built
and called under ``pyro.settings.context(module_local_params=True)``
(:func:`pyro_local_params`; :class:`PyroNetModel` and :class:`MeanFieldGuide` enter it
themselves): learnable tensors live in the modules, never in the global store, whatever
the caller's setting, and ``SVI``/``Predictive`` can be used on them directly.  The
exported model and guide hold no learnable tensors at all.
"""

from .bbb import BayesByBackprop, MeanFieldGuide
from .bridge import (
                     FLAT_SITE,
                     LIKELIHOODS,
                     OBS_SITE,
                     OUTPUT_SITE,
                     PROBS_SITE,
                     PosteriorGuide,
                     PyroNetModel,
                     pyro_local_params,
                     to_pyro,
                     to_pyro_guide,
                     to_pyro_model,
)

__all__ = [
    "BayesByBackprop",
    "MeanFieldGuide",
    "PosteriorGuide",
    "PyroNetModel",
    "LIKELIHOODS",
    "OBS_SITE",
    "OUTPUT_SITE",
    "PROBS_SITE",
    "FLAT_SITE",
    "pyro_local_params",
    "to_pyro",
    "to_pyro_guide",
    "to_pyro_model",
]
