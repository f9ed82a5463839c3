r"""Gaussian posteriors over the parameters of any :class:`torch.nn.Module`.

A :class:`DiagonalGaussian` holds, per named parameter tensor, a mean :math:`m`, a
per-example curvature :math:`h`, an effective sample size :math:`\lambda` (``ess``) and
a prior precision per example :math:`\delta` (``weight_decay``), docs/algorithms.md eq. (3):

.. math::
    q(\theta) = \mathcal N\big(m, \mathrm{diag}(S)^{-1}\big), \qquad S=\lambda(h+\delta),
    \qquad \sigma = 1/\sqrt{\lambda(h+\delta)}.

This is exactly the state :class:`vbpc.IVON` keeps, so ``IVON.posterior()`` returns a
view on the optimizer's tensors without copying.  A posterior built from a precision
:math:`S` directly uses :math:`h=S`, :math:`\lambda=1`, :math:`\delta=0`.

Sampling into a module is a context manager that writes :math:`\theta=m+\sigma\odot z`
*in place* into the live parameters and restores them **bit for bit** on exit, also
when the body raises (docs/algorithms.md §2.2 fix 2, oracle §10.5).
"""

from .base import BAYES_PRECISION_SUFFIX, Entry, GaussianPosterior, MeanEntry, perturbation
from .diagonal import DiagonalGaussian
from .full import FullGaussian
from .isotropic import IsotropicGaussian
from .merging import MergeWeights, merge_posteriors, task_arithmetic

__all__ = [
    "GaussianPosterior",
    "DiagonalGaussian",
    "IsotropicGaussian",
    "FullGaussian",
    "Entry",
    "MeanEntry",
    "merge_posteriors",
    "task_arithmetic",
    "MergeWeights",
    "perturbation",
    "BAYES_PRECISION_SUFFIX",
]
