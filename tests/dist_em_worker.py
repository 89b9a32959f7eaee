"""Run by tests/test_distributed_em.py in each of 2 processes (RANK, WORLD_SIZE set).

argv: data.npy out.pt scenario. Each rank fits its half of the rows (read in chunks) with
``EM(..., distributed=True)``; rank 0 saves the parameters and the result. Scenarios:
``ok``; ``nan`` (rank 1's shard has a NaN in its second chunk); ``empty`` (rank 1 gets no
rows); ``die`` (rank 1 exits in the middle of the run); ``hmm`` (a GaussianHMM, each rank
given whole sequences: data.npy.lengths.npy holds their lengths); ``ppca`` (factor
analysis, its summary of each shard all-reduced); ``vb`` (variational Bayes, a
BayesianGaussianMixture started from responsibilities of rank 0's first chunk).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch

from elbolab.guides import ExactGaussianPosterior, ExactPosterior, MeanFieldPosterior
from elbolab.inference import EM
from elbolab.inference import distributed as dist_ops
from elbolab.models import FactorAnalysis, GaussianHMM, GaussianMixture
from families import hmm_start, vb_setup

data_path, out_path, scenario = sys.argv[1:4]
dist_ops.init(timeout_s=float(os.environ.get("TIMEOUT_S", "30")))
rank, world = dist_ops.rank(), dist_ops.world_size()
x = np.load(data_path, mmap_mode="r")
n = len(x)
shard = x[rank * n // world : (rank + 1) * n // world]
if scenario == "nan" and rank == 1:
    shard = np.array(shard)
    shard[70, 1] = np.nan  # in the second chunk of 64 rows
    shard = [shard[i : i + 64] for i in range(0, len(shard), 64)]
if scenario == "empty" and rank == 1:
    shard = x[:0]


def callback(it, model):
    if scenario == "die" and rank == 1 and it == 2:
        os._exit(3)  # the process vanishes without a word to the others


model = GaussianMixture(3)
start = {  # a complete start: the same on every rank and in one process
    "weights": torch.full((3,), 1 / 3, dtype=torch.float64),
    "means": torch.tensor(np.asarray(x[:3]) + 0.5),
    "covariances": torch.eye(x.shape[1], dtype=torch.float64).expand(3, -1, -1),
}
fit_args = {}
if scenario in ("hmm", "ppca"):
    model = GaussianHMM(3, "diag") if scenario == "hmm" else FactorAnalysis(x.shape[1], 2).double()
    start = hmm_start(x) if scenario == "hmm" else "random"
    if scenario == "hmm":  # whole sequences to each rank: the first half of them to rank 0
        lengths = np.load(data_path + ".lengths.npy")
        half = len(lengths) // 2
        mine = lengths[:half] if rank == 0 else lengths[half:]
        offset = 0 if rank == 0 else int(lengths[:half].sum())
        shard = np.array(x[offset : offset + int(mine.sum())])
        fit_args = {"lengths": mine}
guide = ExactGaussianPosterior(model) if scenario == "ppca" else ExactPosterior(model)
if scenario == "vb":
    model, start = vb_setup(x.shape[1])
    guide = MeanFieldPosterior(model)
em = EM(
    model,
    guide,
    init=start,
    seed=0,
    tol=0.0,
    max_iter=6,
    chunk_size=64,
    distributed=True,
    progress=False,
    callback=callback,
)
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: fixed iterations
        result = em.fit(shard, **fit_args)
except Exception as error:  # report the class and message for the test to read
    print(f"rank {rank} {type(error).__name__}: {error}", flush=True)
    if not isinstance(error, dist_ops.RankFailure):
        dist_ops.shutdown()  # an open gloo group can abort the exit
        sys.exit(1)
    # a peer is gone: nothing to leave, and the group's teardown at exit can abort
    # ("terminate called without an active exception"), so leave without it
    sys.stderr.flush()
    os._exit(1)
if rank == 0:
    state = guide.state_dict() if scenario == "vb" else model.state_dict()
    torch.save({"state": state, "lls": result.log_likelihoods}, out_path)
dist_ops.shutdown()
