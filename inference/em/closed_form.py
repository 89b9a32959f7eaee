"""Closed-form component M-steps (EM-MIX.3) of the built-in families, as data-level functions.

The maths lives in :mod:`.statistics` (sums over the data, then the update from the sums);
registering the same update here keeps ``lookup_m_step(GaussianMixture)`` and the
``(model, x, resp, nk, reg_covar)`` calling convention of :func:`register_m_step` working for
every family. ``resp`` is r_dk times the sample weight, ``nk = resp.sum(0)`` (K,).
``reg_covar`` keeps estimates away from the boundary of the parameter space: added to
covariance diagonals (Gaussian), as a pseudo-count (Bernoulli, categorical), added to rates
(Poisson). With ``reg_covar=0`` each update is the exact weighted MLE.
"""

from __future__ import annotations

from ...models import BernoulliMixture, CategoricalMixture, GaussianMixture, PoissonMixture
from .registry import register_m_step
from .statistics import lookup_statistics


def _register_from_statistics(model_class: type) -> None:
    statistics = lookup_statistics(model_class)

    def m_step(model, x, resp, nk, reg_covar: float) -> None:
        statistics.m_step(model, statistics.collect(model, x, resp), nk, reg_covar)

    m_step.__name__ = f"m_step_{model_class.__name__}"
    m_step.__doc__ = f"EM-MIX.3 for {model_class.__name__}: {type(statistics).__name__}."
    register_m_step(model_class)(m_step)


for _family in (GaussianMixture, BernoulliMixture, PoissonMixture, CategoricalMixture):
    _register_from_statistics(_family)
