"""Seeded train / validation / test splits."""

from __future__ import annotations

import pytest
import torch

from elbolab.datasets import Dataset, load_digits, load_digits_split, train_val_test_split
from elbolab.datasets.splits import split_sizes


def numbered(n: int, with_target: bool = True) -> Dataset:
    """Row i holds (i, -i) and target i, so every row can be traced after a split."""
    ids = torch.arange(n, dtype=torch.float64)
    return Dataset(
        torch.stack([ids, -ids], 1),
        torch.arange(n) if with_target else None,
        ["id", "minus_id"],
        "numbered rows",
    )


def row_ids(part: Dataset) -> list[int]:
    return part.data[:, 0].long().tolist()


def test_digits_split_sizes_targets_and_coverage():
    full = load_digits()
    parts = load_digits_split()
    assert [p.data.shape for p in parts] == [(1437, 64), (180, 64), (180, 64)]
    assert all(p.data.dtype == torch.float64 for p in parts)
    assert all(p.feature_names == full.feature_names for p in parts)
    assert all(p.target.shape == (p.data.shape[0],) for p in parts)
    # together the splits hold every row of the full set once, and every label
    both = torch.cat([p.data for p in parts]), torch.cat([p.target for p in parts])
    assert sorted(map(tuple, both[0].tolist())) == sorted(map(tuple, full.data.tolist()))
    assert torch.equal(torch.bincount(both[1]), torch.bincount(full.target))
    # rows and labels stay paired: (pixels, label) pairs are the full set's pairs
    pairs = sorted(zip(map(tuple, both[0].tolist()), both[1].tolist(), strict=True))
    assert pairs == sorted(zip(map(tuple, full.data.tolist()), full.target.tolist(), strict=True))
    names = ("train", "validation", "test")
    for p, name in zip(parts, names, strict=True):
        assert p.description == f"{full.description} ({name} split, seed 0)"
    other = load_digits_split(seed=1)
    assert not torch.equal(other[0].data, parts[0].data)


def test_digits_split_binarized():
    parts = load_digits_split(seed=3, binarize=True)
    for p in parts:
        assert set(p.data.unique().tolist()) <= {0.0, 1.0}
    assert sum(p.data.shape[0] for p in parts) == 1797


def test_split_is_disjoint_covers_all_rows_and_keeps_targets_aligned():
    d = numbered(101)
    train, val, test = train_val_test_split(d, (0.6, 0.2, 0.2), seed=7)
    ids = [row_ids(train), row_ids(val), row_ids(test)]
    assert [len(i) for i in ids] == [61, 20, 20]  # 60.6, 20.2, 20.2: the spare row to train
    assert sorted(ids[0] + ids[1] + ids[2]) == list(range(101))
    assert not set(ids[0]) & set(ids[1]) and not set(ids[0]) & set(ids[2])
    assert not set(ids[1]) & set(ids[2])
    for part in (train, val, test):
        assert part.target.tolist() == row_ids(part)  # targets moved with their rows
        assert torch.equal(part.data[:, 1], -part.data[:, 0])
        assert part.feature_names == ["id", "minus_id"]
    # the rows are shuffled, not taken in order
    assert ids[0] != sorted(ids[0])
    # the input is untouched
    assert torch.equal(d.data[:, 0], torch.arange(101, dtype=torch.float64))


def test_same_seed_same_split_other_seed_other_split():
    d = numbered(200)
    a = train_val_test_split(d, seed=1)
    b = train_val_test_split(d, seed=1)
    c = train_val_test_split(d, seed=2)
    assert all(torch.equal(x.data, y.data) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x.target, y.target) for x, y in zip(a, b, strict=True))
    assert row_ids(a[0]) != row_ids(c[0])
    assert set(row_ids(a[2])) != set(row_ids(c[2]))
    # the global torch RNG plays no part
    torch.manual_seed(123)
    e = train_val_test_split(d, seed=1)
    assert row_ids(e[1]) == row_ids(a[1])


def test_no_target_stays_none():
    parts = train_val_test_split(numbered(20, with_target=False), (0.5, 0.25, 0.25))
    assert [p.target for p in parts] == [None, None, None]
    assert [p.data.shape[0] for p in parts] == [10, 5, 5]


@pytest.mark.parametrize("n", [3, 4, 10, 11, 99, 1797])
@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (1 / 3, 1 / 3, 1 / 3), (0.5, 0.3, 0.2)])
def test_split_sizes_sum_to_n_and_follow_the_fractions(n, fractions):
    try:
        sizes = split_sizes(n, fractions)
    except ValueError as e:
        assert "split empty" in str(e)
        return
    assert sum(sizes) == n and min(sizes) >= 1
    assert all(abs(s - f * n) < 1 for s, f in zip(sizes, fractions, strict=True))


def test_split_sizes_examples():
    assert split_sizes(1797) == (1437, 180, 180)
    assert split_sizes(10) == (8, 1, 1)
    assert split_sizes(8, (0.5, 0.25, 0.25)) == (4, 2, 2)
    assert split_sizes(3, (1 / 3, 1 / 3, 1 / 3)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.1, 0.2), "must sum to 1"),
        ((0.7, 0.1, 0.1), "must sum to 1"),
        ((1.0, 0.0, 0.0), "must all be positive"),
        ((1.2, -0.1, -0.1), "must all be positive"),
        ((0.5, float("nan"), 0.5), "must all be positive"),
        ((0.8, 0.2), "three numbers"),
        ((0.6, 0.2, 0.1, 0.1), "three numbers"),
        (("a", "b", "c"), "three numbers"),
        (0.8, "three numbers"),
    ],
)
def test_bad_fractions_are_refused(fractions, message):
    with pytest.raises(ValueError, match=message):
        train_val_test_split(numbered(100), fractions)


def test_too_few_rows_for_a_split_is_refused():
    with pytest.raises(ValueError, match=r"leave the test split empty for 5 rows"):
        train_val_test_split(numbered(5))
    with pytest.raises(ValueError, match=r"validation and test split empty for 2 rows"):
        train_val_test_split(numbered(2))
    assert [p.data.shape[0] for p in train_val_test_split(numbered(3), (0.4, 0.3, 0.3))] == [
        1,
        1,
        1,
    ]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        train_val_test_split(Dataset(torch.zeros(10)))
    with pytest.raises(ValueError, match="one entry per row"):
        train_val_test_split(Dataset(torch.zeros(10, 2), torch.zeros(9)))
    with pytest.raises(ValueError, match="seed must be an int"):
        train_val_test_split(numbered(10), seed=1.5)
