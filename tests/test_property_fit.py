"""A property of the mixture fit path, over containers, dtypes, shapes, scales, offsets and
sample weights (hypothesis).

Data x_raw = s * (x_std + o) of any scale s and offset o, in any container, with weights
c * w of any scale c, either is refused by a ``ValueError`` before any work (its squares
would leave float64's range, so the message names the spread and says to rescale), or
fits like the same data standardised: the mean log-likelihood of the raw fit equals that
of the fit of (x_raw / s - o) with weights w, mapped back by the Jacobian,

    mean_d log p(x_raw,d) = mean_d log p(x_std,d) - D log s,

to 1e-6 (float64: both fits stop at tol=1e-10 from the same seed on clusters ten standard
deviations apart, so they reach the same maximum; offsets up to 1e8 round x_std at
eps |o| < 1.5e-8).
``reg_covar`` is in the data's squared units, as in scikit-learn, so the raw fit takes
1e-6 s^2 where the standardised one takes 1e-6.

float32 data fit in float32: their bound stops moving at about 1e-7, so both fits stop at
tol=1e-6 and are compared to 1e-3, with offsets of at most 10 standard deviations.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

from elbolab.guides import ExactPosterior
from elbolab.inference import EM
from elbolab.models import GaussianMixture

CONTAINERS = ("numpy", "tensor", "list", "float32", "int64")


@st.composite
def problems(draw):
    container = draw(st.sampled_from(CONTAINERS))
    # float32 spans 1e-38..3e38; integers need a spread well above their rounding
    low, high = {"float32": (-12.0, 12.0), "int64": (3.0, 9.0)}.get(container, (-150.0, 150.0))
    offsets = st.floats(-10, 10) if container == "float32" else st.floats(-1e8, 1e8)
    return {
        "container": container,
        "kind": draw(st.sampled_from(["full", "tied", "diag", "spherical"])),
        "K": draw(st.integers(1, 3)),
        "D": draw(st.integers(1, 3)),
        "n_per": draw(st.integers(25, 50)),
        "seed": draw(st.integers(0, 2**16)),
        "log_scale": draw(st.floats(low, high) | st.sampled_from([low, high])),
        "offset": draw(st.one_of(st.just(0.0), offsets)),
        "weights": draw(st.sampled_from(["none", "constant", "random"])),
        # weights are cast to the data's dtype: float32 holds 1e-38..3e38
        "log_c": draw(st.floats(-30, 30) if container == "float32" else st.floats(-280, 280)),
    }


def standard_data(K: int, D: int, n_per: int, seed: int) -> np.ndarray:
    """K unit-variance clusters whose means are 10 apart in every coordinate (N, D)."""
    rng = np.random.default_rng(seed)
    means = 10.0 * np.arange(K)[:, None] + rng.normal(0, 1, (K, D))
    return np.concatenate([m + rng.normal(0, 1, (n_per, D)) for m in means])


def convert(x: np.ndarray, container: str):
    if container == "tensor":
        return torch.as_tensor(x)
    if container == "list":
        return x.tolist()
    if container == "float32":
        return x.astype(np.float32)
    if container == "int64":
        return np.round(x).astype(np.int64)
    return x


def fit(x, w, kind: str, K: int, reg_covar: float, tol: float = 1e-10):
    model = GaussianMixture(K, covariance_type=kind)
    em = EM(
        model,
        ExactPosterior(model),
        tol=tol,
        max_iter=1000,
        seed=0,
        reg_covar=reg_covar,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        return model, em.fit(x, w)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(problems())
def test_any_scale_offset_and_weight_fits_as_standardised_data(p):
    K, D, kind = p["K"], p["D"], p["kind"]
    scale, c = 10.0 ** p["log_scale"], 10.0 ** p["log_c"]
    float32 = p["container"] == "float32"
    x_std = standard_data(K, D, p["n_per"], p["seed"])
    raw = convert(scale * (x_std + p["offset"]), p["container"])
    n = len(x_std)
    w = {
        "none": None,
        "constant": np.ones(n),
        "random": np.random.default_rng(p["seed"]).uniform(0.2, 3.0, n),
    }[p["weights"]]
    raw_values = np.asarray(raw, dtype=np.float64)
    span = (raw_values.max(0) - raw_values.min(0)).max()
    reg_covar = 1e-6 * scale**2  # the standardised fit's 1e-6, in the data's units
    tol = 1e-6 if float32 else 1e-10
    try:
        model, result = fit(raw, None if w is None else c * w, kind, K, reg_covar, tol)
    except ValueError as error:
        # refused before any work, because the squares leave the dtype's range
        assert "whose square would come within a factor 1/eps of" in str(error)
        assert "rescale the data first" in str(error)
        info = np.finfo(np.float32 if float32 else np.float64)
        assert span**2 * n >= info.max * info.eps or span**2 <= info.tiny / info.eps
        event("refused")
        return
    event(f"fitted {p['container']}")
    assert model.dtype == (torch.float32 if float32 else torch.float64)
    assert all(bool(torch.isfinite(v).all()) for v in model.parameters())
    # the same data standardised (exactly these numbers, mapped back in float64)
    x_back = raw_values / scale - p["offset"]
    dtype = np.float32 if float32 else np.float64
    _, reference = fit(x_back.astype(dtype), w, kind, K, 1e-6, tol)
    mapped = reference.log_likelihood - D * math.log(scale)
    assert math.isfinite(result.log_likelihood)
    assert abs(result.log_likelihood - mapped) <= (1e-3 if float32 else 1e-6)


@pytest.mark.parametrize("log_scale", [-148.0, 148.0])
def test_the_refusal_region_is_reached(log_scale):
    """Both refusals lie inside the strategy's range of scales (1e-150..1e150)."""
    x = 10.0**log_scale * standard_data(2, 2, 30, 0)
    with pytest.raises(ValueError, match="whose square would come within a factor 1/eps of"):
        fit(x, None, "full", 2, 1e-6 * 10.0 ** (2 * log_scale))
