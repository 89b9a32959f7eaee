"""The command lines refuse bad data files and bad --out folders with one line and status 2,
before anything is fitted (so no run's results are lost at the end)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from elbolab import cli, demo
from elbolab.inference import EM
from elbolab.inference import distributed as d
from elbolab.inference.distributed.files import check_output_folder


@pytest.fixture
def no_fit(monkeypatch):
    """Fail the test if EM or SVI training starts, or the demo runs."""

    def never(*args, **kwargs):
        raise AssertionError("a fit started")

    monkeypatch.setattr(EM, "fit", never)
    monkeypatch.setattr("elbolab.inference.distributed.console.train_svi", never)
    monkeypatch.setattr(demo, "run", never)


def one_error_line(capsys, prefix: str = "error: ") -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


X = np.random.default_rng(0).normal(size=(40, 2))

#: (name, array, allow_pickle, words of the message)
BAD_ARRAYS = [
    (
        "float16",
        X.astype(np.float16),
        False,
        ["holds float16, which has too few digits", "x.astype(numpy.float64)"],
    ),
    ("text", X.astype(str), False, ["holds text (<U32), not numbers", "convert it first"]),
    ("complex", X.astype(complex), False, ["holds complex numbers (complex128)", "x.real"]),
    (
        "objects",
        np.array([[1.0, "a"], [2.0, "b"]], dtype=object),
        True,
        ["holds Python objects (dtype object)", "save a numeric array"],
    ),
    (
        "records",
        np.zeros(40, dtype=[("a", float), ("b", float)]),
        False,
        ["holds a structured array (fields a, b)", "structured_to_unstructured"],
    ),
    (
        "dates",
        np.zeros((4, 2), dtype="datetime64[D]"),
        False,
        ["holds datetime64[D] values, not numbers"],
    ),
]


@pytest.mark.parametrize("command", ["em", "vae"])
@pytest.mark.parametrize("name, array, pickle, words", BAD_ARRAYS, ids=[c[0] for c in BAD_ARRAYS])
def test_a_data_file_that_is_not_real_numbers_is_one_line_and_status_2(
    tmp_path, capsys, no_fit, command, name, array, pickle, words
):
    path = tmp_path / f"{name}.npy"
    np.save(path, array, allow_pickle=pickle)
    args = [command, "--data", str(path), "--out", str(tmp_path / "out")]
    args += ["--components", "2"] if command == "em" else ["--epochs", "1"]
    assert d.main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path} holds ")
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists()  # the --out check left nothing behind


def out_cases(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "result.json").mkdir()
    return [
        (tmp_path / "file", "is an existing file, not a folder"),
        (tmp_path / "file" / "sub" / "deeper", f"{tmp_path / 'file'} is a file, not a folder"),
        (tmp_path / "busy", "holds a folder result.json, where a result file"),
    ]


@pytest.mark.parametrize("command", ["em", "vae"])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_a_bad_out_is_found_before_the_fit(tmp_path, capsys, no_fit, command, case):
    np.save(tmp_path / "x.npy", X)
    out, words = out_cases(tmp_path)[case]
    args = [command, "--data", str(tmp_path / "x.npy"), "--out", str(out)]
    args += ["--components", "2"] if command == "em" else ["--epochs", "1"]
    assert d.main(args) == 2
    line = one_error_line(capsys)
    assert str(out) in line and words in line
    assert "pass a folder" in line or "pass another --out" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_out_is_found_before_the_fit(tmp_path, capsys, no_fit):
    np.save(tmp_path / "x.npy", X)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        args = ["em", "--data", str(tmp_path / "x.npy"), "--components", "2"]
        assert d.main([*args, "--out", str(locked / "fit")]) == 2
    finally:
        locked.chmod(0o700)
    line = one_error_line(capsys)
    assert f"cannot write to --out {locked / 'fit'}" in line
    assert "pass a folder this process can write to" in line


def test_the_out_check_writes_and_leaves_nothing_behind(tmp_path):
    check_output_folder(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    check_output_folder(tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []


def test_a_seed_out_of_range_is_a_usage_error(tmp_path, capsys):
    np.save(tmp_path / "x.npy", X)
    for seed in ("-1", str(2**64)):
        with pytest.raises(SystemExit) as info:
            d.main(["em", "--data", str(tmp_path / "x.npy"), "--components", "2", "--seed", seed])
        assert info.value.code == 2
        assert f"must be an integer in [0, 2**63), got '{seed}'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- elbolab demo
@pytest.mark.parametrize("case", [0, 1])
def test_demo_with_a_bad_out_is_one_line_and_status_2(tmp_path, capsys, no_fit, case):
    out, words = out_cases(tmp_path)[case]
    assert cli.main(["demo", "--out", str(out)]) == 2
    line = one_error_line(capsys, "elbolab demo: error: ")
    assert str(out) in line and words in line


@pytest.mark.parametrize(
    "args, words",
    [
        (["--bogus"], "unrecognized arguments: --bogus; see 'elbolab demo --help'"),
        (["--out"], "argument --out: expected one argument"),
        (["--fast", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_demo_refuses_unknown_options_in_one_line(capsys, no_fit, args, words):
    assert cli.main(["demo", *args]) == 2
    assert words in one_error_line(capsys, "elbolab demo: error: ")


def test_a_npz_archive_is_named_as_one(tmp_path, capsys, no_fit):
    np.savez(tmp_path / "x.npz", x=X)
    args = ["em", "--data", str(tmp_path / "x.npz"), "--components", "2"]
    assert d.main([*args, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"{tmp_path / 'x.npz'} is a .npz archive (arrays ['x']), not one .npy array" in line


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["em", "--components", "2", "--categories", "3"],
            "--categories goes with --family categorical, not --family gaussian",
        ),
        (["vae", "--count", "3"], "--count goes with the binomial likelihood, not gaussian-unit"),
    ],
)
def test_an_option_that_would_be_ignored_is_a_usage_error(tmp_path, capsys, args, words):
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(SystemExit) as info:
        d.main([*args, "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert words in capsys.readouterr().err
