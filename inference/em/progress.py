"""The progress bar of an iterative fit: iterations, and the last change against ``tol``.

A fit stops when its objective changes by less than ``tol``, usually long before
``max_iter``, so the bar counts iterations without a total and shows how far the last
change is from the tolerance, e.g. ``EM: 37it [00:01, 30.1it/s, bound=-1.41713,
change=3.1e-07 (tol 1e-06)]``.

Where it shows: as tqdm does with ``disable=None`` -- on a terminal, and in a notebook
(``tqdm.auto``'s widget); where stderr is not a terminal (a log file, a pipe, a batch
job) nothing is written, so logs get no carriage returns. It appears only for fits longer
than a second, and is removed when the fit stops, error or not (use it as a context
manager).
"""

from __future__ import annotations

from tqdm.auto import tqdm

#: seconds before a bar appears
DELAY = 1.0


def progress_bar(show: bool, desc: str, unit: str = "it") -> tqdm:
    """A bar of ``unit`` s with no total; ``show=False`` never shows one."""
    return tqdm(
        total=None,
        desc=desc,
        unit=unit,
        delay=DELAY,
        leave=False,
        dynamic_ncols=True,
        disable=None if show else True,
    )


def report(bar: tqdm, change: float, tol: float, **values: float) -> None:
    """One step done: the change of the monitored objective (and ``values``) shown."""
    shown = [f"{name}={value:.6g}" for name, value in values.items()]
    shown.append(f"change={change:.1e} (tol {tol:g})")
    bar.update(1)
    bar.set_postfix_str(", ".join(shown), refresh=False)
