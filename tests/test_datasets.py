"""The bundled and offline data sets."""

from __future__ import annotations

import pytest
import torch

from elbolab.datasets import load, load_digits, load_faithful, load_iris, make_mixture
from families import fitted_model


def test_faithful_is_bundled_with_its_provenance():
    from importlib import resources

    d = load_faithful()
    assert d.data.shape == (272, 2) and d.data.dtype == torch.float64
    assert d.feature_names == ["eruptions", "waiting"]
    assert d.data[0].tolist() == [3.6, 79.0]  # first row of R's datasets::faithful
    text = resources.files("elbolab.datasets").joinpath("data/PROVENANCE.md").read_text()
    assert "Azzalini" in text and "faithful" in text


def test_standardized():
    s = load_faithful().standardized().data
    assert torch.allclose(s.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.std(0, unbiased=False), torch.ones(2, dtype=torch.float64))


def test_sklearn_sets_through_one_interface():
    assert load("iris").data.shape == (150, 4) and load_iris().target.unique().numel() == 3
    digits = load_digits(binarize=True)
    assert digits.data.shape == (1797, 64) and set(digits.data.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load("mnist")


def test_make_mixture_has_known_components():
    d = make_mixture(fitted_model("poisson"), 100, seed=0)
    assert d.data.shape == (100, 3) and d.target.shape == (100,)


def test_nile_is_bundled_with_its_years():
    """The Nile series: 100 annual volumes (10^8 m^3) for the years 1871..1970, offline."""
    from elbolab.datasets import load, load_nile

    nile = load_nile()
    assert nile.data.shape == (100, 1) and nile.data.dtype == torch.float64
    assert nile.target.tolist() == list(range(1871, 1971))
    assert float(nile.data[0, 0]) == 1120.0 and float(nile.data[-1, 0]) == 740.0
    assert nile.feature_names == ["volume"] and torch.equal(load("nile").data, nile.data)


def test_wine_is_scikit_learns_copy_through_the_same_interface():
    """The wine data: 178 x 13 float64 measurements and three cultivars, equal to
    scikit-learn's copy, by name too; their scales differ enough that PPCA needs them
    standardised."""
    import numpy as np
    from sklearn.datasets import load_wine as sk_load_wine

    from elbolab.datasets import load_wine

    wine, reference = load_wine(), sk_load_wine()
    assert wine.data.shape == (178, 13) and wine.data.dtype == torch.float64
    assert np.array_equal(wine.data.numpy(), reference.data)
    assert wine.target.tolist() == reference.target.tolist()
    assert wine.target.bincount().tolist() == [59, 71, 48]
    assert wine.feature_names == list(reference.feature_names)
    assert wine.feature_names[0] == "alcohol" and wine.feature_names[-1] == "proline"
    assert torch.equal(load("wine").data, wine.data)
    spread = wine.data.std(0)
    assert float(spread.max() / spread.min()) > 1000
    s = wine.standardized().data
    assert torch.allclose(s.std(0, unbiased=False), torch.ones(13, dtype=torch.float64))
