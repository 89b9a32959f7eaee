"""Hidden Markov models as Pyro programs, their emissions drawn from a mixture family.

    z_1 ~ Categorical(pi),   z_t | z_{t-1} ~ Categorical(A[z_{t-1}]),   x_t | z_t ~ p_k(x; theta_k)

The states emit like the components of a :class:`~elbolab.models.MixtureModel`: a
``HiddenMarkovModel`` holds one as its ``emission`` (whose mixture weights it does not use)
and adds the initial distribution pi = p(z_1) (hmmlearn's ``startprob_``; Pyro's
``DiscreteHMM`` instead puts its initial distribution on a state *before* the first
observation) and the transition matrix A (``transmat_``, rows summing to 1). So every
component family -- a user's own included -- has a hidden Markov model, and EM reuses the
family's closed-form statistics with the smoothed marginals gamma_t(k) in place of the
responsibilities (HMM-M).

Several sequences are given as hmmlearn takes them: the frames of all of them concatenated,
``x`` (N, D), with ``lengths`` (S,) summing to N (None: one sequence), or a list of (T_i, D)
arrays. The Pyro program runs the chain with ``pyro.markov`` inside
``pyro.plate("sequences", S)``, the sequences padded to the longest and the padding masked
out, with latent sites ``"z_0"``, ``"z_1"``, ... and observed sites ``"x_0"``, ``"x_1"``, ...
(the layout of Pyro's HMM examples).

Exact inference is forward-backward (HMM-FB) and Viterbi (HMM-VIT), in
:mod:`elbolab.guides.forward_backward`.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from .base import (
    MixtureModel,
    NotFittedError,
    as_tensor,
    assign,
    check_positive_int,
    check_seed,
)
from .bernoulli import BernoulliMixture
from .categorical import CategoricalMixture
from .gaussian import GaussianMixture
from .poisson import PoissonMixture


def check_lengths(lengths, n: int) -> torch.Tensor:
    """``lengths`` (S,) of sequences whose frames are the ``n`` rows of x, or a
    ``ValueError`` naming the fix; None means one sequence of all n rows."""
    if lengths is None:
        return torch.tensor([n], dtype=torch.long)
    try:
        values = np.asarray(lengths)
    except (TypeError, ValueError):
        values = None
    if (
        values is None
        or values.ndim != 1
        or values.size == 0
        or values.dtype.kind not in "iu"
        and not (values.dtype.kind == "f" and np.all(values == np.round(values)))
    ):
        raise ValueError(
            f"lengths must be a 1-D list of positive integers (one per sequence), got "
            f"{lengths!r}; e.g. lengths=[len(s) for s in sequences]"
        )
    values = values.astype(np.int64)
    if (values < 1).any():
        bad = int(np.flatnonzero(values < 1)[0])
        raise ValueError(
            f"lengths[{bad}] is {int(values[bad])}: every sequence needs at least one frame; "
            "drop the empty sequences"
        )
    if int(values.sum()) != n:
        raise ValueError(
            f"lengths sum to {int(values.sum())} but x has {n} rows; the frames of all "
            "sequences are concatenated in x, so lengths must add up to len(x)"
        )
    return torch.as_tensor(values)


def sequences_to_frames(sequences) -> tuple[list, torch.Tensor]:
    """A list of (T_i, D) arrays as (the arrays, their lengths (S,)); checked in ``fit``."""
    lengths = []
    for i, s in enumerate(sequences):
        shape = getattr(s, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"sequence {i} must be a 2-D (T_i, D) array, got "
                f"{'shape ' + str(tuple(shape)) if shape is not None else type(s).__name__}; "
                "reshape a 1-D sequence with s.reshape(-1, 1)"
            )
        lengths.append(int(shape[0]))
    return list(sequences), torch.tensor(lengths, dtype=torch.long)


class HiddenMarkovModel(PyroModule):
    """A hidden Markov model whose K states emit like the components of ``emission``.

    Parameters
    ----------
    emission:
        An unfitted :class:`~elbolab.models.MixtureModel` with K components (e.g.
        ``GaussianMixture(3, "diag")``); its components are the states' emissions.

    Fitted attributes: ``startprob_`` (K,), ``transmat_`` (K, K) and the emission family's
    own (``means_``, ``covariances_``, ``rates_``, ``probs_``). ``init=`` dicts and
    :meth:`set_params` take ``startprob``, ``transmat`` and the family's names.
    """

    latent_site = "z"
    observed_site = "x"

    def __init__(self, emission: MixtureModel) -> None:
        if not isinstance(emission, MixtureModel):
            raise ValueError(
                f"emission must be a MixtureModel (its components are the states' "
                f"emissions), got {type(emission).__name__}; e.g. GaussianMixture(3)"
            )
        super().__init__()
        self.emission = emission
        self.n_components = emission.n_components

    # ------------------------------------------------------------------ parameters
    @property
    def n_features_in_(self) -> int | None:
        return self.emission.n_features_in_

    @property
    def is_built(self) -> bool:
        return self.emission.is_built

    @property
    def dtype(self) -> torch.dtype:
        self._require_built()
        return self.emission.dtype

    def _require_built(self) -> None:
        if not self.is_built:
            raise NotFittedError(
                f"this {type(self).__name__} has no parameters yet: fit it with "
                "elbolab.inference.EM(model, ExactPosterior(model)).fit(x, lengths=lengths), "
                "or call model.build(n_features) and set_params(...)."
            )

    def build(self, n_features: int, dtype: torch.dtype = torch.float64) -> HiddenMarkovModel:
        """Create every parameter: pi and A uniform, the emissions as the family builds them."""
        self.emission.build(n_features, dtype)
        return self._build_chain(dtype)

    def build_for(self, x: torch.Tensor) -> HiddenMarkovModel:
        """Create every parameter for frames like ``x`` (their feature count and dtype)."""
        self.emission.build_for(x)
        return self._build_chain(x.dtype)

    def _build_chain(self, dtype: torch.dtype) -> HiddenMarkovModel:
        K = self.n_components
        self.startprob = PyroParam(torch.full((K,), 1.0 / K, dtype=dtype), constraints.simplex)
        self.transmat = PyroParam(torch.full((K, K), 1.0 / K, dtype=dtype), constraints.simplex)
        return self

    def unbuild(self) -> HiddenMarkovModel:
        """Remove every parameter: the model is as constructed, unfitted."""
        for name in ("startprob", "transmat"):
            if name in self._pyro_params:
                delattr(self, name)
        self.emission.unbuild()
        return self

    def param_names(self) -> tuple[str, ...]:
        """Names ``set_params`` and ``init=`` dicts take."""
        return ("startprob", "transmat") + tuple(
            n for n in self.emission.param_names() if n != "weights"
        )

    def set_params(self, **params) -> HiddenMarkovModel:
        """Set parameters by name (:meth:`param_names`); checked whole, all or nothing."""
        self._require_built()
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for {type(self).__name__}; "
                f"use {', '.join(self.param_names())}"
            )
        saved = {k: v.clone() for k, v in self.state_dict().items()}
        try:
            startprob, transmat = params.pop("startprob", None), params.pop("transmat", None)
            if startprob is not None:
                self._assign_probs("startprob", startprob, (self.n_components,))
            if transmat is not None:
                K = self.n_components
                self._assign_probs("transmat", transmat, (K, K))
            if params:
                self.emission.set_params(**params)
        except BaseException:
            self.load_state_dict(saved)
            raise
        return self

    def _assign_probs(self, name: str, value, shape: tuple[int, ...]) -> None:
        p = as_tensor(value, self.dtype, name)
        what = "a probability vector" if len(shape) == 1 else "a matrix whose rows are"
        if (
            tuple(p.shape) != shape
            or not bool(torch.isfinite(p).all())
            or bool((p < 0).any())
            or bool(((p.sum(-1) - 1).abs() > 1e-6).any())
        ):
            raise ValueError(
                f"{name} must be {what} probability vectors of shape {shape} (non-negative, "
                f"each summing to 1), got {p.tolist() if p.numel() <= 16 else tuple(p.shape)}"
            )
        assign(self, name, p / p.sum(-1, keepdim=True))

    @property
    def startprob_(self) -> torch.Tensor:
        """p(z_1 = k), shape (K,)."""
        self._require_built()
        return self.startprob.detach()

    @property
    def transmat_(self) -> torch.Tensor:
        """A[j, k] = p(z_{t+1} = k | z_t = j), shape (K, K)."""
        self._require_built()
        return self.transmat.detach()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.endswith("_") and not name.startswith("_"):
                emission = self.__dict__["_modules"].get("emission")
                if emission is not None:
                    return getattr(emission, name)  # means_, covariances_, rates_, ...
            raise

    def n_parameters(self) -> int:
        """Free parameters (for BIC/AIC): K - 1 + K (K - 1) and the emissions' own."""
        self._require_built()
        K = self.n_components
        return K - 1 + K * (K - 1) + self.emission._n_component_parameters()

    # ------------------------------------------------------------------ data
    def validate_data(self, x, *, name: str = "x", reset: bool = False) -> torch.Tensor:
        """Frames (N, D) checked as the emission family checks its data."""
        return self.emission.validate_data(x, name=name, reset=reset)

    def validate_sequences(self, x, lengths=None, *, reset: bool = False):
        """``(frames (N, D), lengths (S,))`` from ``x`` (N, D) with ``lengths``, or from a list
        of (T_i, D) arrays; ``ValueError`` naming the fix for a bad sequence or lengths."""
        if isinstance(x, (list, tuple)) and len(x) and all(hasattr(s, "shape") for s in x):
            if lengths is not None:
                raise ValueError(
                    "x is a list of sequences, which carry their own lengths; pass lengths "
                    "only with x as one (N, D) array of all the frames"
                )
            seqs, lengths = sequences_to_frames(x)
            checked = []
            for i, s in enumerate(seqs):
                try:
                    checked.append(self.validate_data(s, reset=reset and i == 0))
                except ValueError as error:
                    raise ValueError(f"sequence {i}: {error}") from None
            if len({t.shape[1] for t in checked}) > 1:
                widths = [t.shape[1] for t in checked]
                bad = next(i for i, w in enumerate(widths) if w != widths[0])
                raise ValueError(
                    f"sequence {bad} has {widths[bad]} features but sequence 0 has "
                    f"{widths[0]}; every frame of every sequence needs the same features"
                )
            return torch.cat(checked), lengths
        frames = self.validate_data(x, reset=reset)
        return frames, check_lengths(lengths, frames.shape[0])

    # ------------------------------------------------------------------ log-potentials
    def log_emission(self, x: torch.Tensor) -> torch.Tensor:
        """log p_k(x_t; theta_k) for every frame and state, shape (N, K)."""
        params = self.emission._component_params()
        return self.emission._component_dist(**params).log_prob(x.unsqueeze(-2))

    def log_potentials(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi (K,), log A (K, K), log p_k(x_t) (N, K)) at the current parameters."""
        return self.startprob.log(), self.transmat.log(), self.log_emission(x)

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        """The Pyro program: the chain of each sequence under ``pyro.markov``, the sequences
        in ``pyro.plate("sequences", S)``, padded frames masked out."""
        lengths = check_lengths(lengths, x.shape[0])
        padded, mask = pad_sequences(x, lengths)
        return self._program(padded, mask)

    def _program(self, padded: torch.Tensor | None, mask: torch.Tensor, n_features=None):
        params = self.emission._component_params()
        S, T = mask.shape
        states = []
        with pyro.plate("sequences", S, dim=-1):
            z = None
            for t in pyro.markov(range(T)):
                probs = self.startprob if t == 0 else self.transmat[z]
                with poutine.mask(mask=mask[:, t]):
                    z = pyro.sample(f"{self.latent_site}_{t}", dist.Categorical(probs))
                    state = {k: v[z] for k, v in params.items()}
                    component = self.emission._component_dist(**state)
                    obs = None if padded is None else padded[:, t]
                    pyro.sample(f"{self.observed_site}_{t}", component, obs=obs)
                states.append(z)
        return states

    # ------------------------------------------------------------------ exact inference
    def _posterior(self, x, lengths, per_step_xi: bool = False):
        from ..guides.forward_backward import forward_backward

        self._require_built()
        frames, lengths = self.validate_sequences(x, lengths)
        with torch.no_grad():
            return forward_backward(*self.log_potentials(frames), lengths, per_step_xi=per_step_xi)

    def log_likelihood(self, x, lengths=None) -> torch.Tensor:
        """Exact log p(x^(s)) of each sequence, shape (S,) (HMM-FB)."""
        return self._posterior(x, lengths).log_likelihood

    @torch.no_grad()
    def score(self, x, lengths=None) -> float:
        """log p(x) summed over the sequences (hmmlearn's ``score``)."""
        return float(self.log_likelihood(x, lengths).sum())

    def predict_proba(self, x, lengths=None) -> torch.Tensor:
        """The smoothed marginals gamma_t(k) = p(z_t = k | x), shape (N, K) (HMM-FB)."""
        return self._posterior(x, lengths).gamma

    @torch.no_grad()
    def decode(self, x, lengths=None) -> tuple[float, torch.Tensor]:
        """``(log p(x, z*), z*)``: the most probable path (HMM-VIT) and its log-probability
        summed over the sequences, as hmmlearn's ``decode``; the path has shape (N,)."""
        from ..guides.forward_backward import viterbi

        self._require_built()
        frames, lengths = self.validate_sequences(x, lengths)
        log_prob, path = viterbi(*self.log_potentials(frames), lengths)
        return float(log_prob.sum()), path

    def predict(self, x, lengths=None) -> torch.Tensor:
        """The most probable path z* (HMM-VIT), shape (N,)."""
        return self.decode(x, lengths)[1]

    @torch.no_grad()
    def bic(self, x, lengths=None) -> float:
        """-2 log p(x) + n_parameters log N (N frames)."""
        frames, lengths = self.validate_sequences(x, lengths)
        return -2 * self.score(frames, lengths) + self.n_parameters() * math.log(frames.shape[0])

    @torch.no_grad()
    def aic(self, x, lengths=None) -> float:
        """-2 log p(x) + 2 n_parameters."""
        return -2 * self.score(x, lengths) + 2 * self.n_parameters()

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence of ``n`` frames by ancestral sampling: ``(x (n, D), z (n,))``.

        The chain is drawn step by step (z_1 ~ pi, z_t ~ A[z_{t-1}]), then every frame from
        its state's emission at once. ``seed`` fixes the draws without touching the
        caller's random state.
        """
        self._require_built()
        n = check_positive_int("n", n, "the number of frames to draw")
        seed = check_seed(seed)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            uniform = torch.rand(n, dtype=self.dtype)
            cumulative = self.transmat_.cumsum(-1)
            z = torch.empty(n, dtype=torch.long)
            z[0] = _draw(self.startprob_.cumsum(-1), uniform[0])
            for t in range(1, n):
                z[t] = _draw(cumulative[z[t - 1]], uniform[t])
            params = self.emission._component_params()
            x = self.emission._component_dist(**{k: v[z] for k, v in params.items()}).sample()
        return x.to(self.dtype), z

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, n_features={self.n_features_in_}"


def _draw(cumulative: torch.Tensor, u: torch.Tensor) -> int:
    """The category whose cumulative probability first exceeds ``u``."""
    k = int(torch.searchsorted(cumulative, u.reshape(1), right=True))
    return min(k, cumulative.shape[0] - 1)


def pad_sequences(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (N, ...) of S sequences as (S, T_max, ...) zero-padded, and the mask (S, T_max)."""
    S, T = len(lengths), int(lengths.max())
    padded = x.new_zeros((S, T) + tuple(x.shape[1:]))
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    padded[mask] = x
    return padded, mask


class GaussianHMM(HiddenMarkovModel):
    """Gaussian emissions, scikit-learn's four covariance types (``means_``, ``covariances_``)."""

    def __init__(self, n_components: int, covariance_type: str = "full") -> None:
        super().__init__(GaussianMixture(n_components, covariance_type))
        self.covariance_type = covariance_type


class PoissonHMM(HiddenMarkovModel):
    """Independent Poisson counts per feature (``rates_``, (K, D))."""

    def __init__(self, n_components: int) -> None:
        super().__init__(PoissonMixture(n_components))


class CategoricalHMM(HiddenMarkovModel):
    """One category per feature (``probs_``, (K, D, C)); ``n_categories`` as for the mixture."""

    def __init__(self, n_components: int, n_categories: int | None = None) -> None:
        super().__init__(CategoricalMixture(n_components, n_categories))


class BernoulliHMM(HiddenMarkovModel):
    """Binary features (``probs_``, (K, D))."""

    def __init__(self, n_components: int) -> None:
        super().__init__(BernoulliMixture(n_components))
