"""Starting points for EM and direct maximisation, as scikit-learn's mixtures offer them.

Every method but an explicit dict produces initial responsibilities r (N, K); the
parameters then come from one M-step on them (closed form where registered, the gradient
M-step otherwise), so a new component family needs no initialiser of its own.
"""

from __future__ import annotations

import numpy as np
import torch

INIT_METHODS = ("kmeans++", "kmeans", "random_from_data", "random")


def _one_hot(labels: np.ndarray, K: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), K).to(dtype)


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each row, shape (N,)."""
    d2 = (x**2).sum(1)[:, None] - 2 * x @ centers.T + (centers**2).sum(1)[None, :]
    return d2.argmin(1)


def _centred(x: np.ndarray) -> np.ndarray:
    """x - mean(x), divided by one overall scale (a power of two): the same Euclidean
    geometry up to a constant, so the same seeds and nearest centres, but distances
    computed as |x|^2 - 2 x.c + |c|^2 keep their digits for data far from the origin."""
    xc = x - x.mean(0)
    scale = float(np.abs(xc).max()) if xc.size else 0.0
    if scale > 0 and np.isfinite(scale):
        xc = xc / 2.0 ** np.round(np.log2(scale))  # exact: a power of two
    return xc


def initial_responsibilities(
    x: torch.Tensor,
    n_components: int,
    method: str,
    rng: np.random.Generator,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Initial responsibilities, shape (N, K).

    - ``"kmeans++"``: k-means++ seeding (scikit-learn's ``kmeans_plusplus``), each point
      assigned to its nearest seed;
    - ``"kmeans"``: the labels of one run of scikit-learn's ``KMeans``;
    - ``"random_from_data"``: K distinct data points as seeds, nearest-seed assignment;
    - ``"random"``: uniform random responsibilities, normalised per point.
    """
    K = n_components
    xn = _centred(x.detach().cpu().numpy())
    seed = int(rng.integers(2**31 - 1))
    w = None if sample_weight is None else sample_weight.detach().cpu().numpy()
    if method == "kmeans++":
        from sklearn.cluster import kmeans_plusplus

        centers, _ = kmeans_plusplus(xn, K, random_state=seed, sample_weight=w)
        return _one_hot(_nearest(xn, centers), K, x.dtype)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        labels = KMeans(K, n_init=1, random_state=seed).fit(xn, sample_weight=w).labels_
        return _one_hot(labels, K, x.dtype)
    if method == "random_from_data":
        idx = rng.choice(len(xn), size=K, replace=False)
        return _one_hot(_nearest(xn, xn[idx]), K, x.dtype)
    if method == "random":
        r = torch.as_tensor(rng.uniform(size=(len(xn), K)), dtype=x.dtype)
        return r / r.sum(1, keepdim=True)
    raise ValueError(f"init must be one of {INIT_METHODS} or a dict of parameters, got {method!r}")
