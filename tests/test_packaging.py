"""One distribution, ``elbolab``: a plain wheel installs only the ``elbolab`` namespace
(the top-level folders map to ``elbolab.models`` etc.), imports without the source tree,
and carries the bundled data."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("elbolab-*.whl")
    return path


def test_wheel_holds_only_the_elbolab_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"elbolab", next(t for t in top if t.endswith(".dist-info"))}
    for sub in ("models", "guides", "inference", "datasets"):
        assert f"elbolab/{sub}/__init__.py" in names
    assert "elbolab/datasets/data/faithful.csv" in names
    assert "elbolab/datasets/data/nile.csv" in names
    assert "elbolab/datasets/data/PROVENANCE.md" in names


def test_plain_wheel_install_imports_away_from_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import elbolab.models as m, elbolab.guides, elbolab.inference, elbolab.datasets as d;"
        "from elbolab.models import GaussianMixture, BernoulliMixture, PoissonMixture,"
        " CategoricalMixture;"
        "from elbolab.guides import ExactPosterior; from elbolab.inference import EM;"
        "print(m.__file__); print(d.load_faithful().data.shape[0])"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, rows = done.stdout.split()
    assert module_file.startswith(str(site))
    assert rows == "272"
