"""Seeded train / validation / test splits of a :class:`~elbolab.datasets.Dataset`.

The rows are shuffled by a permutation drawn from a :class:`torch.Generator` seeded with
``seed``, so a split is the same on every run and every machine for one seed, and the three
parts are disjoint and together hold every row exactly once. No stratification.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the package imports this module before it defines Dataset
    from . import Dataset

SPLIT_NAMES = ("train", "validation", "test")


def split_sizes(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[int, int, int]:
    """The number of rows in each of the three splits of ``n`` rows.

    Each split gets ``floor(fraction * n)`` rows and the rows left over go, one each, to the
    splits with the largest remainders (ties to the earlier split), so the sizes sum to ``n``.
    Raises :class:`ValueError` when ``fractions`` is not three positive numbers summing to 1,
    or when a split would be empty for this ``n``.
    """
    fracs = _check_fractions(fractions)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    raw = [f * n for f in fracs]
    sizes = [math.floor(r) for r in raw]
    left = n - sum(sizes)
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - sizes[i]), i))
    for i in by_remainder[:left]:
        sizes[i] += 1
    empty = [name for name, size in zip(SPLIT_NAMES, sizes, strict=True) if size == 0]
    if empty:
        raise ValueError(
            f"fractions {tuple(fracs)} leave the {' and '.join(empty)} split empty for "
            f"{n} rows (sizes {tuple(sizes)}); use larger fractions for the small splits "
            f"or a data set with more rows (each split needs at least one row)"
        )
    return sizes[0], sizes[1], sizes[2]


def train_val_test_split(
    dataset: Dataset, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[Dataset, Dataset, Dataset]:
    """Split ``dataset`` at random into train, validation and test parts.

    ``dataset.data`` is (N, D) and ``dataset.target``, when present, (N,). Returns three
    :class:`Dataset` with ``data`` (N_train, D), (N_val, D), (N_test, D) (targets split
    alongside, feature names kept), where the sizes come from :func:`split_sizes`
    (``fractions`` is (train, validation, test), positive, summing to 1). The rows of each
    part are in the shuffled order of a permutation fixed by ``seed`` (a
    :class:`torch.Generator`); the parts are disjoint and cover all N rows.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    data = dataset.data
    if data.dim() != 2:
        raise ValueError(
            f"dataset.data must be (N, D), got shape {tuple(data.shape)}; reshape it first"
        )
    n = data.shape[0]
    target = dataset.target
    if target is not None and (target.dim() < 1 or target.shape[0] != n):
        raise ValueError(
            f"dataset.target has shape {tuple(target.shape)} but data has {n} rows; "
            f"target must be (N,) with one entry per row"
        )
    sizes = split_sizes(n, fractions)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = torch.split(perm, list(sizes))
    return tuple(  # type: ignore[return-value]
        replace(
            dataset,
            data=data[idx],
            target=None if target is None else target[idx],
            feature_names=list(dataset.feature_names),
            description=_describe(dataset.description, name, seed),
        )
        for name, idx in zip(SPLIT_NAMES, parts, strict=True)
    )


def load_digits_split(
    seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1), binarize: bool = False
) -> tuple[Dataset, Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1797 x 64, values 0..16) split into train, validation, test.

    Returns three :class:`Dataset` with ``data`` (N_split, 64) float64 and integer ``target``
    (N_split,); ``binarize=True`` thresholds at 8 as :func:`~elbolab.datasets.load_digits`
    does. With the default fractions the sizes are 1437, 180 and 180.
    """
    from . import load_digits

    return train_val_test_split(load_digits(binarize=binarize), fractions=fractions, seed=seed)


def load_mnist_5k_split(
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    binarize: bool = False,
    scaled: bool = False,
) -> tuple[Dataset, Dataset, Dataset]:
    """The bundled 5,000 MNIST digits split into train, validation and test (4000, 500 and
    500 rows with the default fractions); ``binarize`` and ``scaled`` as in
    :func:`~elbolab.datasets.load_mnist_5k`."""
    from . import load_mnist_5k

    return train_val_test_split(
        load_mnist_5k(binarize=binarize, scaled=scaled), fractions=fractions, seed=seed
    )


def hide_labels(
    target: torch.Tensor, n_labelled: int, seed: int = 0, stratified: bool = True
) -> torch.Tensor:
    """A copy of ``target`` (N,) with all but ``n_labelled`` entries set to -1 (unlabelled).

    The labelled rows are drawn with a :class:`torch.Generator` seeded with ``seed``;
    ``stratified=True`` keeps ``n_labelled / C`` of each of the C classes present (so
    ``n_labelled`` must be a multiple of C), as in the semi-supervised benchmarks, and
    ``False`` draws them uniformly. The result is what
    :meth:`~elbolab.inference.SVITrainer.fit` takes as ``y=``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    target = torch.as_tensor(target)
    if target.dim() != 1 or target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"target must be an integer tensor of shape (N,), got {target.dtype} of shape "
            f"{tuple(target.shape)}; pass the class labels, e.g. dataset.target"
        )
    if (target < 0).any():
        raise ValueError("target already holds negative (unlabelled) entries; pass the full labels")
    n = target.shape[0]
    if isinstance(n_labelled, bool) or not isinstance(n_labelled, int) or not 0 < n_labelled <= n:
        raise ValueError(
            f"n_labelled must be an int in 1..{n} (the number of rows), got {n_labelled!r}"
        )
    generator = torch.Generator().manual_seed(seed)
    if stratified:
        classes = torch.unique(target)
        per_class, rest = divmod(n_labelled, len(classes))
        if rest:
            raise ValueError(
                f"stratified: n_labelled={n_labelled} is not a multiple of the {len(classes)} "
                f"classes; pass a multiple (e.g. {per_class * len(classes) or len(classes)}) "
                "or stratified=False"
            )
        keep = []
        for c in classes:
            rows = torch.nonzero(target == c).squeeze(-1)
            if len(rows) < per_class:
                raise ValueError(
                    f"stratified: class {int(c)} has {len(rows)} rows, fewer than the "
                    f"{per_class} per class asked for; pass a smaller n_labelled"
                )
            keep.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
        keep = torch.cat(keep)
    else:
        keep = torch.randperm(n, generator=generator)[:n_labelled]
    labels = torch.full_like(target, -1)
    labels[keep] = target[keep]
    return labels


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        fracs = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(
            f"fractions must be three numbers (train, validation, test), got {fractions!r}"
        ) from None
    if len(fracs) != 3:
        raise ValueError(
            f"fractions must be three numbers (train, validation, test), got {len(fracs)}: "
            f"{fractions!r}"
        )
    if not all(math.isfinite(f) and f > 0 for f in fracs):
        raise ValueError(
            f"fractions must all be positive, got {fracs}; every split needs a share of the rows"
        )
    if not math.isclose(sum(fracs), 1.0, rel_tol=0.0, abs_tol=1e-9):
        raise ValueError(
            f"fractions must sum to 1, got {fracs} (sum {sum(fracs):g}); "
            f"for example (0.8, 0.1, 0.1)"
        )
    return fracs  # type: ignore[return-value]


def _describe(description: str, name: str, seed: int) -> str:
    tag = f"{name} split, seed {seed}"
    return f"{description} ({tag})" if description else tag


__all__ = [
    "hide_labels",
    "load_digits_split",
    "load_mnist_5k_split",
    "split_sizes",
    "train_val_test_split",
]
