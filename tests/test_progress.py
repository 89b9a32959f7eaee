"""Progress bars: iterations and the change against tol, nothing in logs, never left open.

A fit in a script whose stderr is a pipe writes no carriage return (tqdm's
``disable=None``); the same script on a terminal (a pseudo-terminal here) does show the
bar, so the first assertion is not vacuous. Bars are closed when a fit stops on an
error, for EM (every start of ``n_init``) and for SVITrainer.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import elbolab.inference.em.progress as progress
import elbolab.inference.svi.trainer as trainer_module
from elbolab.guides import AmortizedNormal, ExactPosterior
from elbolab.inference import EM, SVITrainer
from elbolab.models import VAE, GaussianMixture

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import warnings
    import elbolab.inference.em.progress as progress
    from elbolab.datasets import load_faithful
    from elbolab.guides import ExactPosterior
    from elbolab.inference import EM
    from elbolab.models import GaussianMixture

    progress.DELAY = 0.0  # show at once (a short fit)
    warnings.simplefilter("ignore")
    x = load_faithful().standardized().data
    model = GaussianMixture(2)
    # long enough for the bar to be redrawn (tqdm redraws at most every 0.1 s) on a fast
    # machine too: the bar appears after 1 s, and an iteration takes about 0.12 ms here
    EM(model, ExactPosterior(model), tol=1e-300, max_iter=12000, n_init=2, seed=0).fit(x)
    print("done")
    """
)


def script_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100")


def test_no_carriage_returns_when_stderr_is_a_pipe():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        env=script_env(),
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    assert done.stdout.strip() == b"done"
    assert b"\r" not in done.stderr and b"tol" not in done.stderr, done.stderr[-500:]


def test_the_bar_shows_iterations_and_the_change_against_tol_on_a_terminal():
    """The control: the same script with stderr a (pseudo-)terminal shows the bar."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    # a terminal 100 columns wide (a new pseudo-terminal has none: tqdm would draw nothing)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=script_env(),
        cwd=ROOT,
    )
    os.close(slave)  # the child holds its own end
    chunks = []
    try:
        while True:  # read while it runs (a full terminal buffer would block it)
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        assert child.wait(timeout=300) == 0
    shown = b"".join(chunks)
    assert b"\r" in shown  # a live bar
    assert b"EM 1/2" in shown and b"EM 2/2" in shown  # one bar per start
    assert b"(tol 1e-300)" in shown and b"change=" in shown and b"it [" in shown
    assert b"/400" not in shown  # no total of max_iter


class Recorded(trainer_module.tqdm):
    """tqdm that remembers its bars and whether each was shown."""

    bars: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown = not self.disable
        Recorded.bars.append(self)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def terminal(monkeypatch):
    """stderr that says it is a terminal (set in the test itself: pytest's capture sets
    sys.stderr again between a fixture and its test), and every bar recorded."""
    stream = Terminal()

    def use():
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    monkeypatch.setattr(progress, "tqdm", Recorded)
    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(trainer_module, "tqdm", Recorded)
    Recorded.bars = []
    return use


def test_em_bars_close_when_a_fit_fails(terminal, faithful):
    def fail(iteration, model):
        if iteration == 3 and len(Recorded.bars) == 2:  # in the second start
            raise RuntimeError("stop")

    stream = terminal()
    model = GaussianMixture(2)
    em = EM(model, ExactPosterior(model), tol=0.0, max_iter=50, n_init=2, seed=0, callback=fail)
    with pytest.raises(RuntimeError, match="stop"):
        em.fit(faithful)
    assert len(Recorded.bars) == 2
    assert all(bar.shown for bar in Recorded.bars)  # they were live
    assert all(bar.disable for bar in Recorded.bars)  # and are closed
    assert [bar.total for bar in Recorded.bars] == [None, None]
    assert Recorded.bars[0].n == 50 and Recorded.bars[1].n == 2  # iterations counted
    assert all("(tol 0)" in bar.postfix for bar in Recorded.bars)  # what each showed last
    assert "EM 2/2" in stream.getvalue()


def test_progress_false_shows_nothing(terminal, faithful):
    stream = terminal()
    model = GaussianMixture(2)
    EM(model, ExactPosterior(model), tol=1e-3, max_iter=50, progress=False).fit(faithful)
    assert Recorded.bars and all(not bar.shown for bar in Recorded.bars)
    assert stream.getvalue() == ""


def test_svi_bar_closes_when_training_fails(terminal, monkeypatch):
    terminal()
    torch.manual_seed(0)
    model = VAE(8, 2, hidden=(8,), likelihood="bernoulli")
    guide = AmortizedNormal(8, 2, hidden=(8,))
    trainer = SVITrainer(model, guide, batch_size=16, seed=0)
    x = (torch.rand(64, 8) > 0.5).float()
    calls = []
    epoch = trainer._epoch

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stop")
        return epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "_epoch", failing)
    with pytest.raises(RuntimeError, match="stop"):
        trainer.fit(x, epochs=5)
    (bar,) = Recorded.bars
    assert bar.shown and bar.disable  # shown on a terminal, closed after the error
