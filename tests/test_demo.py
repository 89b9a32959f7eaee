"""The main job, in its fast mode: table, agreement, figures."""

from __future__ import annotations

import subprocess
import sys

from elbolab import demo


def test_demo_fits_agree_and_write_figures(tmp_path, capsys):
    fits = demo.run(tmp_path, fast=True)
    printed = capsys.readouterr().out
    for name in (
        "EM, closed-form M-step",
        "EM, gradient M-step",
        "direct (z summed out)",
        "scikit-learn GaussianMixture",
    ):
        assert name in printed
    reference = fits["EM, closed-form M-step"]["result"].log_likelihood
    for name in ("EM, gradient M-step", "direct (z summed out)"):
        assert abs(fits[name]["result"].log_likelihood - reference) < 1e-5  # fast mode: tol 1e-6
    assert abs(fits["scikit-learn"]["loglik"] - reference) < 1e-5
    for png in ("em_iterations.png", "em_loglik_bound.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    snapshots = fits["snapshots"]
    assert {0, 1, 2, 5, "final"} <= set(snapshots) <= {0, 1, 2, 5, 10, 20, "final"}
    panels = demo.shown_iterations(snapshots)
    assert len(panels) == 6 and panels[-1] == "final"  # five iterations, then the converged fit
    assert all(t < snapshots["final"]["iteration"] for t in panels[:-1])
    vae = fits["vae"]
    assert len(vae["result"].train_bounds) == 3
    assert vae["test_iwae"] >= vae["test_elbo"] - 1.0  # K = 500 vs the ELBO (MC noise < 1 nat)
    for png in ("vae_bound.png", "vae_latent.png", "vae_reconstructions.png", "vae_samples.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "VAE on digits" in printed
    ppca = fits["ppca"]
    closed = ppca["closed"].score(ppca["x"])
    assert abs(ppca["em"].log_likelihood - closed) < 1e-8 * abs(closed)  # EM, tol 1e-10
    assert "PPCA(13, 3) on wine" in printed
    assert (tmp_path / "ppca_bridge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_command_help():
    done = subprocess.run(
        [sys.executable, "-m", "elbolab.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "elbolab demo" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "elbolab.cli", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
