"""Benchmark: the M2 semi-supervised VAE against supervised-only and graph baselines.

Run ``python bench/bench_m2_accuracy.py`` (full: digits with 50, 100 and 300 labels, the
bundled MNIST subset with 100 and 1,000, 3 seeds each; about 35 min on 2 cores) or
``python bench/bench_m2_accuracy.py --quick`` (digits, 100 labels, 1 seed, 20 epochs).
``--dataset``, ``--labels``, ``--seeds`` and ``--epochs`` pick a part.

What is measured
----------------
Test accuracy of four classifiers given the same few labels, for each (data set, label
count, seed):

``M2``
    ``SVITrainer(SemiSupervisedVAE(...), SemiSupervisedGuide(model), seed=seed,
    alpha=a N).fit(x, y=labels, epochs=E)`` with the defaults (latent 50, hidden (256,),
    Adam 1e-3, batches of 128); a = 0.1 (the default alpha of M2-J) on digits, 1.0 on the
    MNIST subset (``ALPHA_PER_N``); the unlabelled rows are the rest of the training split;
    accuracy of ``guide.classify`` on the test split.
``logistic``
    scikit-learn's ``LogisticRegression(max_iter=5000)`` on the labelled rows alone.
``same net``
    the classifier network of a ``SemiSupervisedGuide`` built from the same torch seed as
    M2's (so the same initial weights), trained on the labelled rows alone: cross-entropy,
    ``STEPS`` full-batch Adam steps at 1e-3 -- what the M2-J term alone would give.
``spreading``
    scikit-learn's ``LabelSpreading(kernel="knn", n_neighbors=7)`` on all training rows
    (labelled and not), transductive, then ``predict`` on the test split.

Data: scikit-learn's digits (1797 x 64, counts 0..16, Binomial(16) likelihood), split
75 / 5 / 20 % by ``load_digits_split(seed, (0.75, 0.05, 0.2))``: 1347 training rows and 360
test rows; the bundled 5,000 MNIST digits binarised at 128 (Bernoulli likelihood), split by
``load_mnist_5k_split(seed, binarize=True)``: 4000 training and 500 test rows. All methods
see the inputs as M2's networks do (digits / 16, MNIST 0/1). The labelled rows are
``hide_labels(train.target, n, seed)``: n / 10 of each class. One seed fixes the split,
the labelled rows, the initial weights and the training noise.

The table prints mean +- sample standard deviation over the seeds. Target: M2 ahead of
both supervised-only baselines (``logistic``, ``same net``) at every label count. The
script only reports; it does not fail when a target is missed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import numpy as np
import torch
from machine import cpu_model, n_cores

STEPS = 500  # full-batch Adam steps of the supervised-only network
EPOCHS = {"digits": 200, "mnist": 50}
# alpha of M2-J as a multiple of N: the default 0.1 N on digits; on the MNIST subset, whose
# 4,000 unlabelled digits teach the model less, N (chosen on seed 0's validation split)
ALPHA_PER_N = {"digits": 0.1, "mnist": 1.0}
LABELS = {"digits": (50, 100, 300), "mnist": (100, 1000)}
METHODS = ("M2", "logistic", "same net", "spreading")


def load(dataset: str, seed: int):
    """(x_train, y_train, x_test, y_test, model keyword arguments) for one seed's split."""
    from elbolab.datasets import load_digits_split, load_mnist_5k_split

    if dataset == "digits":
        train, _, test = load_digits_split(seed=seed, fractions=(0.75, 0.05, 0.2))
        kwargs = {"data_dim": 64, "likelihood": "binomial", "count": 16}
    else:
        train, _, test = load_mnist_5k_split(seed=seed, binarize=True)
        kwargs = {"data_dim": 784, "likelihood": "bernoulli"}
    as_float = lambda d: d.data.float()  # noqa: E731
    return as_float(train), train.target, as_float(test), test.target, kwargs


def fresh(seed: int, kwargs: dict):
    """M2's model and guide; the same seed gives the same initial weights every call."""
    from elbolab.guides import SemiSupervisedGuide
    from elbolab.models import SemiSupervisedVAE

    torch.manual_seed(seed)
    model = SemiSupervisedVAE(n_classes=10, **kwargs)
    return model, SemiSupervisedGuide(model)


def fit_m2(x, labels, x_test, y_test, seed, kwargs, epochs, alpha) -> float:
    from elbolab.inference import SVITrainer

    model, guide = fresh(seed, kwargs)
    trainer = SVITrainer(model, guide, seed=seed, progress=False, alpha=alpha)
    trainer.fit(x, y=labels, epochs=epochs)
    return float((guide.classify(x_test) == y_test).double().mean())


def fit_same_net(x_l, y_l, x_test, y_test, seed, kwargs) -> float:
    """The guide's classifier, same initial weights, cross-entropy on the labels alone."""
    _, guide = fresh(seed, kwargs)
    params = list(guide.classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for _ in range(STEPS):
        # -(1/N_l) sum_labelled log q(y_n | x_n): the M2-J classifier term on its own
        loss = -guide.class_logits(x_l).gather(-1, y_l[:, None]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float((guide.classify(x_test) == y_test).double().mean())


def run(dataset: str, n_labels: int, seed: int, epochs: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import LabelSpreading

    from elbolab.datasets import hide_labels

    x, y, x_test, y_test, kwargs = load(dataset, seed)
    labels = hide_labels(y, n_labels, seed=seed)
    seen = labels >= 0
    scale = 1.0 / kwargs.get("count", 1)  # the inputs as M2's networks see them
    xs, xs_test = (x * scale).numpy(), (x_test * scale).numpy()
    t0 = time.perf_counter()
    alpha = ALPHA_PER_N[dataset] * x.shape[0]
    result = {"M2": fit_m2(x, labels, x_test, y_test, seed, kwargs, epochs, alpha)}
    result["m2_seconds"] = time.perf_counter() - t0
    logistic = LogisticRegression(max_iter=5000).fit(xs[seen.numpy()], y[seen].numpy())
    result["logistic"] = float(np.mean(logistic.predict(xs_test) == y_test.numpy()))
    result["same net"] = fit_same_net(x[seen], y[seen], x_test, y_test, seed, kwargs)
    with warnings.catch_warnings():
        # rows the k-nearest-neighbour graph never links to a label get 0 / 0 class
        # weights (scikit-learn warns) and count as whatever predict makes of them
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        spreading = LabelSpreading(kernel="knn", n_neighbors=7).fit(xs, labels.numpy())
    result["spreading"] = float(np.mean(spreading.predict(xs_test) == y_test.numpy()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, 100 labels, 1 seed")
    parser.add_argument("--dataset", choices=["digits", "mnist", "both"], default="both")
    parser.add_argument("--labels", default=None, help="comma-separated label counts")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (3)")
    parser.add_argument("--epochs", type=int, default=None, help=f"M2 epochs ({EPOCHS})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the cores)")
    args = parser.parse_args()
    if args.quick:
        args.dataset, args.labels, args.seeds, args.epochs = "digits", "100", 1, 20
    datasets = ["digits", "mnist"] if args.dataset == "both" else [args.dataset]
    torch.set_num_threads(args.threads or n_cores())

    import pyro
    import sklearn

    print(
        f"elbolab M2 accuracy benchmark: {', '.join(datasets)}; seeds 0..{args.seeds - 1}; "
        f"M2 epochs {args.epochs or {d: EPOCHS[d] for d in datasets}}; "
        f"alpha / N {ALPHA_PER_N}"
    )
    start = time.perf_counter()
    rows = []
    for dataset in datasets:
        counts = [int(c) for c in args.labels.split(",")] if args.labels else LABELS[dataset]
        epochs = args.epochs or EPOCHS[dataset]
        for n_labels in counts:
            runs = []
            for seed in range(args.seeds):
                r = run(dataset, n_labels, seed, epochs)
                runs.append(r)
                line = ", ".join(f"{m} {r[m]:.3f}" for m in METHODS)
                print(
                    f"   {dataset} {n_labels} labels seed {seed}: {line} ({r['m2_seconds']:.0f} s)"
                )
            rows.append((dataset, n_labels, epochs, runs))
    wall = time.perf_counter() - start

    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    print("\n" + "=" * 100)
    print(f"platform : {platform.platform()} | python {platform.python_version()}")
    print(f"cpu      : {cpu_model()} | cores {n_cores()} | torch threads {torch.get_num_threads()}")
    print(
        f"versions : torch {torch.__version__}, pyro {pyro.__version__}, "
        f"scikit-learn {sklearn.__version__} | wall {wall:.0f} s"
    )
    print("test accuracy, mean ± sd over seeds; target: M2 ahead of logistic and same net")
    print(
        "| data | labels | M2 | logistic regression | the same classifier on the labels alone "
        "| label spreading | M2 s/run | target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dataset, n_labels, epochs, runs in rows:
        means = {m: statistics.mean(r[m] for r in runs) for m in METHODS}
        met = means["M2"] > max(means["logistic"], means["same net"])
        seconds = statistics.mean(r["m2_seconds"] for r in runs)
        cells = " | ".join(cell([r[m] for r in runs]) for m in METHODS)
        print(
            f"| {dataset} ({epochs} epochs) | {n_labels} | {cells} | {seconds:.0f} | "
            f"{'met' if met else 'MISSED'} |"
        )


if __name__ == "__main__":
    main()
