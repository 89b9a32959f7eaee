"""The finite mixture as a Pyro program: p(z = k) = pi_k, p(x | z = k) = p_k(x; theta_k).

A component family subclasses :class:`MixtureModel` and says four things:

- ``_build(n_features, dtype)``: create its ``PyroParam`` s (any valid starting values);
- ``_component_params()``: its parameters as a dict of tensors whose first dimension is K;
- ``_component_dist(**params)``: the distribution p_k(x) with event shape ``(n_features,)``;
- ``_check_support(x, fitted)``: raise ``ValueError`` for data outside the family's support
  (``fitted``: whether the data must also suit the current parameters).

Everything else -- the Pyro program, exact log-likelihood, sampling, BIC/AIC, EM with the
gradient M-step -- comes from this base class and from :mod:`elbolab.inference`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from contextlib import nullcontext

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints, transform_to

from .enumeration import enumerate_joint


def _numeric_array(value, name: str) -> np.ndarray | torch.Tensor:
    """``value`` as a tensor or array of real numbers, or a ``ValueError`` naming the fix.

    Refused: complex numbers (casting would silently drop the imaginary part), float16 and
    bfloat16 (too few digits for the linear algebra of a fit), object and string arrays
    (a DataFrame with a text column), ragged lists (rows of different lengths).
    """
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if dtype.is_complex:
            raise ValueError(
                f"{name} is complex ({dtype}); pass real numbers, e.g. {name}.real or {name}.abs()"
            )
        if dtype in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"{name} is {str(dtype).removeprefix('torch.')}, which has too few digits "
                f"to fit a model; convert it first, e.g. {name}.double()"
            )
        return value.detach()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{name} cannot be read as an array of numbers ({error}); pass an (n_samples, "
            "n_features) array whose rows all have the same length"
        ) from None
    kind = array.dtype.kind
    if kind == "c":
        raise ValueError(
            f"{name} is complex ({array.dtype}); pass real numbers, e.g. np.real({name}) or "
            f"np.abs({name})"
        )
    if kind == "f" and array.dtype.itemsize < 4:
        raise ValueError(
            f"{name} is {array.dtype}, which has too few digits to fit a model; convert it "
            f"first, e.g. {name}.astype(np.float64)"
        )
    if kind not in "biuf":
        what = "text" if kind in "US" else f"{array.dtype} values"
        raise ValueError(
            f"{name} holds {what}, not numbers (a ragged list, or a table with a non-numeric "
            "column?); pass an (n_samples, n_features) array of numbers, e.g. encode text "
            "columns as integers first"
        )
    return array


def as_tensor(value, dtype: torch.dtype, name: str = "value") -> torch.Tensor:
    """A detached tensor of ``dtype`` from a tensor, array, or nested list of numbers."""
    value = _numeric_array(value, name)
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.as_tensor(value, dtype=dtype)


def as_data_tensor(x, dtype: torch.dtype | None = None, name: str = "x") -> torch.Tensor:
    """Turn real numbers into a floating tensor; float tensors and arrays keep their dtype.

    Integers and booleans become float64, which holds every integer up to 2^53 exactly (as
    scikit-learn does; float32 would round codes or counts above 2^24). ``ValueError``
    naming the fix for complex, float16/bfloat16, text, object or ragged input (see
    :func:`_numeric_array`).
    """
    x = _numeric_array(x, name)
    if isinstance(x, np.ndarray) and not x.flags.writeable:  # e.g. a DataFrame's values
        x = x.copy()
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if dtype is not None:
        return t.to(dtype)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def check_data_matrix(t: torch.Tensor, data_dim: int, name: str = "x") -> torch.Tensor:
    """``ValueError`` with the fix unless ``t`` is a finite, non-empty (N, data_dim) matrix."""
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one sample.")
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (n_samples, {data_dim}), got shape "
            f"{tuple(t.shape)}; flatten each sample into one row."
        )
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one sample.")
    if t.shape[1] != data_dim:
        raise ValueError(
            f"{name} has {t.shape[1]} features but the model has data_dim={data_dim}; "
            f"pass data with {data_dim} columns or build the model with "
            f"data_dim={t.shape[1]}."
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; remove or impute those entries first.")
    return t


def check_squares(t: torch.Tensor, what: str) -> None:
    """``ValueError`` with the fix when the spread of a feature is too large or too small
    for its squares to be summed in t's dtype with room to spare.

    Variances need (x - mean)^2 summed over the rows. The room kept is a factor 1/eps on
    each side (1e16 in float64: spreads between about 1e-146 and 1e146 / sqrt(N)), so the
    products and quotients of an update stay normal numbers.
    """
    if t.shape[0] == 0:
        return
    info = torch.finfo(t.dtype)
    span = t.amax(0) - t.amin(0)  # (D,), inf if it overflows
    sums = span.square() * t.shape[0]
    too_large = ~(sums < info.max * info.eps)
    too_small = (span > 0) & (span.square() < info.tiny / info.eps)
    for bad, word in ((too_large, "overflow"), (too_small, "underflow")):
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"feature {j} of x spans {float(span[j]):.3g}, whose square would come "
                f"within a factor 1/eps of {word} in {t.dtype} in the sums of a {what}; "
                "rescale the data first, e.g. divide each feature by its standard deviation "
                "(x / x.std(0))"
            )


def check_seed(seed) -> int | None:
    """``seed`` as an int (or None), or a ``ValueError`` with the fix."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"seed must be a non-negative integer or None, got {seed!r}; e.g. seed=0 "
            "repeats a run, seed=None draws a fresh one"
        )
    return int(seed)


def check_positive_int(name: str, value, hint: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (NumPy integers too, bools not).

    Otherwise a ``ValueError``: ``"<name> must be a positive integer, got <value>; <hint>"``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}")
    return int(value)


@torch.no_grad()
def ancestral_sample(program, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``program(n, None)`` forward; returns its ``(x, z)`` site values.

    With a ``seed`` the draws come from torch's generator seeded with it, inside
    ``torch.random.fork_rng``: the same seed gives the same samples, and the caller's
    random state is not changed.
    """
    check_positive_int("n", n, "the number of samples to draw")
    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)  # the caller's random state is left as it was
        trace = pyro.poutine.trace(program).get_trace(int(n), None)
    return trace.nodes["x"]["value"], trace.nodes["z"]["value"]


def assign(module: PyroModule, name: str, value) -> None:
    """Set the constrained ``PyroParam`` ``name`` of ``module`` to ``value`` in place (its
    unconstrained tensor is overwritten, so optimisers keep the same parameter)."""
    current = getattr(module, name)
    value = as_tensor(value, current.dtype, name)
    if value.shape != current.shape:
        raise ValueError(
            f"parameter {name!r} must have shape {tuple(current.shape)}, got {tuple(value.shape)}"
        )
    constraint = module._pyro_params[name][0]
    if not bool(constraint.check(value).all()):
        raise ValueError(f"parameter {name!r} violates its constraint {constraint}")
    unconstrained = getattr(module, name + "_unconstrained")
    with torch.no_grad():
        unconstrained.copy_(transform_to(constraint).inv(value))


class NotFittedError(ValueError, AttributeError):
    """The model has no parameters yet."""


class MixtureModel(PyroModule):
    """Base class of finite mixtures p(x) = sum_k pi_k p_k(x; theta_k).

    Parameters
    ----------
    n_components:
        Number of mixture components K (>= 1).

    The Pyro program (``forward``) has a latent site ``"z"`` (Categorical over K) and an
    observed site ``"x"``, both inside ``pyro.plate("data", N)``; per-sample weights enter
    as ``poutine.scale``. Parameters are created by :meth:`build` (EM does this on the
    first fit) and are local to the module.
    """

    #: Name of the latent site and of the observed site.
    latent_site = "z"
    observed_site = "x"

    def __init__(self, n_components: int) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)):
            raise ValueError(
                f"n_components must be a positive integer, got {n_components!r}; "
                "pass the number of mixture components, e.g. n_components=3."
            )
        if n_components < 1:
            raise ValueError(
                f"n_components must be >= 1, got {n_components}; "
                "a mixture needs at least one component."
            )
        super().__init__()
        self.n_components = int(n_components)
        self.n_features_in_: int | None = None

    # ------------------------------------------------------------------ the family's part
    @abstractmethod
    def _build(self, n_features: int, dtype: torch.dtype) -> None:
        """Create the component parameters (any valid values)."""

    @abstractmethod
    def _component_params(self) -> dict[str, torch.Tensor]:
        """Component parameters, each with leading dimension K."""

    @abstractmethod
    def _component_dist(self, **params: torch.Tensor) -> dist.TorchDistribution:
        """p_k(x) for the given (indexed) parameters; event shape ``(n_features,)``."""

    def _check_support(self, x: torch.Tensor, fitted: bool) -> None:
        """Raise ``ValueError`` for values outside the family's support (default: reals).

        ``fitted`` says whether the data must also fit the current parameters.
        """

    def _prepare(self, x: torch.Tensor) -> None:
        """Read anything the family needs from the data before :meth:`build` (default: none)."""

    def _set_component_params(self, **params) -> None:
        """Set component parameters from user values (``init=`` dict); default: by name."""
        for name, value in params.items():
            self.assign(name, value)

    # ------------------------------------------------------------------ parameters
    @property
    def is_built(self) -> bool:
        """Whether the parameters exist (the model was fitted or built)."""
        return self.n_features_in_ is not None

    def build(self, n_features: int, dtype: torch.dtype = torch.float64) -> MixtureModel:
        """Create every parameter for data with ``n_features`` columns."""
        K = self.n_components
        self.n_features_in_ = int(n_features)
        self.weights = PyroParam(torch.full((K,), 1.0 / K, dtype=dtype), constraints.simplex)
        self._build(int(n_features), dtype)
        self._check_event_shape()
        return self

    def _check_event_shape(self) -> None:
        """``_component_dist`` of all K components: batch shape (K,), event shape (D,)."""
        K, D = self.n_components, self.n_features_in_
        with torch.no_grad():
            component = self._component_dist(**self._component_params())
        batch, event = tuple(component.batch_shape), tuple(component.event_shape)
        if batch != (K,) or event != (D,):
            hint = (
                " add .to_event(1) so that the D features of one sample are one event, e.g. "
                "dist.Exponential(rates).to_event(1)."
                if event == () and batch == (K, D)
                else " the parameters of _component_params must have first dimension K and "
                "the distribution one event of D features."
            )
            raise ValueError(
                f"{type(self).__name__}._component_dist must return a distribution with batch "
                f"shape (n_components,) = ({K},) and event shape (n_features,) = ({D},) when "
                f"given every component's parameters; it has batch shape {batch} and event "
                f"shape {event}:" + hint
            )

    def unbuild(self) -> MixtureModel:
        """Remove every parameter: the model is as constructed, unfitted."""
        for name in list(self._pyro_params):
            delattr(self, name)
        self.n_features_in_ = None
        self._unprepare()
        return self

    def _unprepare(self) -> None:
        """Forget what :meth:`_prepare` read from the data (default: nothing)."""

    def build_for(self, x: torch.Tensor) -> MixtureModel:
        """Create every parameter for data like ``x`` (its feature count and dtype)."""
        self._prepare(x)
        return self.build(x.shape[1], x.dtype)

    def assign(self, name: str, value) -> None:
        """Set a constrained parameter ``name`` to ``value`` (in place, keeps its dtype)."""
        assign(self, name, value)

    def param_names(self) -> tuple[str, ...]:
        """Names ``set_params`` and ``init=`` dicts take: ``weights`` and the family's own.

        Default: every ``PyroParam`` of the model; a family whose user-facing layout differs
        (``GaussianMixture``: ``covariances``, not ``scale_tril``) overrides this.
        """
        return ("weights",) + tuple(n for n in self._pyro_params if n != "weights")

    def set_params(self, **params) -> MixtureModel:
        """Set parameters by name: ``weights`` and the family's own (:meth:`param_names`).

        Every value is checked; on any error nothing is changed.
        """
        self._require_built()
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for {type(self).__name__}; "
                f"use {', '.join(self.param_names())}"
            )
        saved = {k: v.clone() for k, v in self.state_dict().items()}
        try:
            weights = params.pop("weights", None)
            if weights is not None:
                w = as_tensor(weights, self.dtype, "weights")
                if (
                    w.shape != (self.n_components,)
                    or not bool(torch.isfinite(w).all())
                    or bool((w < 0).any())
                    or abs(float(w.sum()) - 1) > 1e-6
                ):
                    raise ValueError(
                        f"weights must be a probability vector of length {self.n_components} "
                        f"(non-negative, summing to 1), got {w.tolist()}"
                    )
                self.assign("weights", w / w.sum())
            self._set_component_params(**params)
        except BaseException:
            self.load_state_dict(saved)  # nothing half-set
            raise
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not name.endswith("_") or name.startswith("_"):
                raise
            if self.__dict__.get("n_features_in_") is None:  # fitted attributes before fit
                self._require_built()
            pyro_params = self.__dict__.get("_pyro_params", {})
            if name[:-1] in pyro_params:  # a family's parameter ``rates`` -> ``rates_``
                return super().__getattr__(name[:-1]).detach()
            raise

    def _require_built(self) -> None:
        if not self.is_built:
            raise NotFittedError(
                f"this {type(self).__name__} has no parameters yet: fit it with "
                "elbolab.inference.EM(model, ExactPosterior(model)).fit(x), or call "
                "model.build(n_features) and set_params(...)."
            )

    @property
    def weights_(self) -> torch.Tensor:
        """Mixture weights pi, shape (K,)."""
        self._require_built()
        return self.weights.detach()

    @property
    def dtype(self) -> torch.dtype:
        self._require_built()
        return self.weights_unconstrained.dtype

    def n_parameters(self) -> int:
        """Number of free parameters (for BIC/AIC): K - 1 weights plus the components'."""
        self._require_built()
        return self.n_components - 1 + self._n_component_parameters()

    def _n_component_parameters(self) -> int:
        total = 0
        for name in self._pyro_params:
            if name != "weights":
                total += getattr(self, name + "_unconstrained").numel()
        return total

    # ------------------------------------------------------------------ data
    def validate_data(self, x, *, name: str = "x", reset: bool = False) -> torch.Tensor:
        """Check ``x`` and return it as a tensor of the model's dtype.

        Raises ``ValueError`` naming the problem and the fix: not 2-D, empty, NaN/inf,
        a feature count that differs from the fitted one, or values outside the support.
        With ``reset=True`` (a fresh fit) the fitted feature count and dtype are ignored.
        """
        fitted = self.is_built and not reset
        t = as_data_tensor(x, self.dtype if fitted else None, name)
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one sample.")
        if t.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D with shape (n_samples, n_features), got shape "
                f"{tuple(t.shape)}; reshape it, e.g. x.reshape(-1, 1) for a single feature."
            )
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one sample.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{name} contains NaN or inf; remove or impute those entries before fitting."
            )
        if fitted and t.shape[1] != self.n_features_in_:
            raise ValueError(
                f"{name} has {t.shape[1]} features but the model was built for "
                f"{self.n_features_in_}; pass data with {self.n_features_in_} columns "
                "or create a new model."
            )
        self._check_support(t, fitted)
        return t

    # ------------------------------------------------------------------ the Pyro program
    def forward(
        self,
        x: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
        total_size: int | None = None,
    ):
        """The Pyro program p(z) p(x | z) for observed ``x`` of shape (N, D).

        ``sample_weight`` (shape (N,)) scales each data point's log-density.
        ``total_size``: when ``x`` is a minibatch of B rows out of N = ``total_size``, the
        ``"data"`` plate is subsampled (``pyro.plate("data", N, subsample=...)``), so Pyro
        scales every log-density by N / B and the minibatch ELBO is an unbiased estimate
        of the ELBO of all N rows.
        """
        return self._program(x.shape[0], x, sample_weight, total_size)

    def _program(self, n: int, x: torch.Tensor | None, sample_weight=None, total_size=None):
        params = self._component_params()
        if total_size is None:
            plate = pyro.plate("data", n, dim=-1)
        else:
            if int(total_size) < n:
                raise ValueError(
                    f"total_size={total_size} is smaller than the minibatch of {n} rows; pass "
                    "the number of rows of the whole data set (or None for no subsampling)."
                )
            rows = torch.arange(n)  # which rows does not matter to the scale N / B
            plate = pyro.plate("data", int(total_size), subsample=rows, dim=-1)
        with plate:
            with poutine.scale(scale=1.0 if sample_weight is None else sample_weight):
                # logits: the (N, K) expansion inside the plate then needs no log per row
                z = pyro.sample(self.latent_site, dist.Categorical(logits=self.weights.log()))
                component = self._component_dist(**{k: v[z] for k, v in params.items()})
                return pyro.sample(self.observed_site, component, obs=x)

    # ------------------------------------------------------------------ derived quantities
    def log_joint(self, x) -> torch.Tensor:
        """log p(x_d, z = k; theta) for every d, k: shape (N, K), by enumerating ``"z"``.

        Differentiable in the parameters (so is :meth:`log_likelihood`); the scores below
        are not.
        """
        self._require_built()
        x = self.validate_data(x)
        table = enumerate_joint(self, x).log_joint  # (K, N)
        return table.transpose(-1, -2)

    def log_likelihood(self, x) -> torch.Tensor:
        """Exact per-sample log p(x_d; theta) = log sum_k pi_k p_k(x_d), shape (N,)."""
        self._require_built()
        x = self.validate_data(x)
        return enumerate_joint(self, x).log_marginal()

    @torch.no_grad()
    def score(self, x) -> float:
        """Mean per-sample log-likelihood (as scikit-learn's ``score``)."""
        return float(self.log_likelihood(x).mean())

    @torch.no_grad()
    def predict_proba(self, x) -> torch.Tensor:
        """Responsibilities p(z = k | x_d; theta), shape (N, K) (EM-MIX.1)."""
        return self.log_joint(x).softmax(-1)

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """Most probable component for each sample, shape (N,)."""
        return self.log_joint(x).argmax(-1)

    @torch.no_grad()
    def bic(self, x) -> float:
        """Bayesian information criterion: -2 sum_d log p(x_d) + n_parameters log N."""
        ll = self.log_likelihood(x)
        return float(-2 * ll.sum() + self.n_parameters() * math.log(ll.shape[0]))

    @torch.no_grad()
    def aic(self, x) -> float:
        """Akaike information criterion: -2 sum_d log p(x_d) + 2 n_parameters."""
        return float(-2 * self.log_likelihood(x).sum() + 2 * self.n_parameters())

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples by ancestral sampling; returns ``(x, z)``, shapes (n, D), (n,).

        ``seed`` fixes the draws without touching the caller's random state.
        """
        self._require_built()
        x, z = ancestral_sample(self._program, n, seed)
        return x.to(self.dtype), z

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, n_features={self.n_features_in_}"
