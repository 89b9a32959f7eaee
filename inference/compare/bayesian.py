"""Three ways of fitting the Bayesian mixture (:class:`~elbolab.models.BayesianMixture`).

The program is that of :class:`~elbolab.models.MixtureModel` with its parameters drawn
from a prior (:mod:`elbolab.models.priors`) instead of held as point values::

    theta ~ p(theta)                                  (global sites: weights, means, ...)
    z_d ~ Categorical(pi),  x_d ~ p_{z_d}(x; theta)   (plate "data"; z enumerated)

The discrete ``"z"`` is marked for parallel enumeration, so every fit below sums it out
exactly (EM-MIX.1's sum over k) and only theta is approximated:

- :func:`fit_map` -- ``AutoDelta``: maximises log p(x, theta) = log p(theta) + sum_d log
  p(x_d; theta) by L-BFGS (``TraceEnum_ELBO`` with a point-mass guide);
- :func:`fit_mean_field` -- ``AutoNormal``: q(theta) a product of Normals in the
  unconstrained space (the blog's closing step, VI-MF); the bound is Pyro's ELBO, and
  BASIC still holds: ELBO <= log p(x) = log int p(theta) p(x | theta) dtheta, itself
  <= max_theta log p(x; theta);
- :func:`sample_nuts` -- Pyro's ``NUTS``, the chains side by side in processes
  (:mod:`.chains`) where two cores are free.

NUTS gets the potential -log p(theta, x) with z summed out either from
:meth:`BayesianMixture.potential` (``potential="vectorized"``): the value Pyro derives
from the program written directly as a prior term plus a logsumexp over components, about
twice as fast per gradient (tests check the two agree to 1e-10); the same function with
its gradient recorded once and replayed by TorchScript (``"recorded"``, the default,
:class:`RecordedPotential`); or from Pyro itself (``"enumerated"``: the program above run
under enumeration at every leapfrog step). Mean-field SVI's loss likewise
(``elbo="vectorized"`` or ``"pyro"``).

Parameters of the guides are module-local (``AutoNormal``/``AutoDelta`` are
``PyroModule`` s); nothing is put in Pyro's global param store.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value

from ...models.bayesian import BayesianMixture
from .chains import run_chains


# ---------------------------------------------------------------------------- fits
@dataclass
class PointFit:
    """A MAP fit: the site values at the mode and what the optimiser did."""

    values: dict[str, torch.Tensor]
    log_joint: float  # log p(x, theta_MAP) / N, z summed out (Pyro's ELBO with AutoDelta)
    n_iter: int
    converged: bool
    guide: AutoDelta


@dataclass
class MeanFieldFit:
    """A mean-field fit: the guide, its bound, and draws from q(theta)."""

    guide: AutoNormal
    elbo: float  # mean per datum, Monte Carlo estimate at the final guide
    elbo_se: float  # its standard error
    draws: dict[str, torch.Tensor]  # (S, *site shape), from q
    bounds: list[float] = field(default_factory=list)  # -loss / N per step (one particle)
    n_iter: int = 0


@dataclass
class NUTSFit:
    """Draws from NUTS, one chain per row: site values (C, S, *site shape)."""

    draws: dict[str, torch.Tensor]
    diverging: torch.Tensor  # (C, S) bool, after warmup
    n_iter: int  # warmup + samples, summed over chains
    step_size: list[float] = field(default_factory=list)  # adapted step size of each chain
    full_mass: bool = False  # whether the mass matrix was dense


@contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch intra-op threads (``None``: leave as is), restored afterwards.

    The samplers and SVI work on tensors of a few thousand numbers per step; there extra
    threads cost more in hand-offs than they give, and on a shared machine they mostly
    wait on each other.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _elbo() -> TraceEnum_ELBO:
    return TraceEnum_ELBO(max_plate_nesting=1)


def refused_parameters(error: BaseException) -> bool:
    """Whether ``error`` is a distribution refusing its parameters (Pyro's validation)."""
    return isinstance(error, ValueError) and "to satisfy the constraint" in str(error)


def _summary(error: BaseException, limit: int = 160) -> str:
    """A distribution's complaint in a few words: which parameter left which constraint."""
    text = " ".join(str(error).split())
    found = re.search(r"Expected parameter (\w+) .*? to satisfy the constraint (.+?), but", text)
    if found:
        return f"{found.group(1)} outside {found.group(2)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def left_support(what: str, error: BaseException | None, fix: str) -> ValueError:
    """The error for a fit that reached parameters where the model is not defined.

    ``error`` is the distribution's own complaint (its first clause is quoted), if any.
    """
    detail = f" ({_summary(error)})" if error is not None else ""
    return ValueError(
        f"{what} reached parameters where the model is not defined{detail}: the objective "
        "has no maximum there, as when a Gaussian component shrinks onto duplicated points "
        f"and its density grows without bound; {fix}"
    )


def fit_map(
    program: BayesianMixture,
    x: torch.Tensor,
    start: dict[str, torch.Tensor],
    *,
    max_iter: int = 500,
    tol: float = 1e-10,
) -> PointFit:
    """theta_MAP = argmax log p(theta) + sum_d log p(x_d; theta), from ``start`` (site values).

    ``AutoDelta`` over the parameter sites, ``TraceEnum_ELBO`` summing z out, one L-BFGS
    call (strong-Wolfe line search) on the per-datum objective; ``tol`` is L-BFGS's
    tolerance on the change of that objective and ``max_iter`` its iteration cap.

    ``ValueError`` naming the fix when the search reaches parameters where the model is
    not defined (a Gaussian scale of 0: a component on duplicated points), or ends on
    non-finite values.
    """
    fix = (
        "use fewer components or data with more distinct rows, or the maximum-likelihood "
        "schemes, whose reg_covar keeps every covariance above a floor"
    )
    try:
        guide, values, log_joint, n_iter = _map_search(program, x, start, max_iter, tol)
    except ValueError as error:
        if not refused_parameters(error):
            raise
        raise left_support("the MAP search (L-BFGS)", error, fix) from error
    if not math.isfinite(log_joint) or not all(
        bool(torch.isfinite(v).all()) for v in values.values()
    ):
        raise left_support("the MAP search (L-BFGS)", None, fix)
    return PointFit(values, log_joint, n_iter, n_iter < max_iter, guide)


def _map_search(program, x, start, max_iter: int, tol: float):
    """The L-BFGS run of :func:`fit_map`: (guide, values at the end, log joint / N, n_iter)."""
    n = x.shape[0]
    guide = AutoDelta(program.without_z(), init_loc_fn=init_to_value(values=start))
    guide(x)  # creates the guide's parameters
    params = [p for p in guide.parameters() if p.requires_grad]
    elbo = _elbo()
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10 if x.dtype == torch.float64 else 1e-6,
        tolerance_change=tol,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(program, guide, x) / n
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = int(optimizer.state[params[0]].get("n_iter", 0))
    log_joint = -float(elbo.differentiable_loss(program, guide, x).detach()) / n
    with torch.no_grad():
        values = {k: v.detach() for k, v in guide.median(x).items()}
    return guide, values, log_joint, n_iter


def elbo_estimate(
    program, guide, x: torch.Tensor, particles: int, elbo: str = "pyro"
) -> tuple[float, float]:
    """Mean per-datum ELBO and its Monte Carlo standard error, from ``particles`` draws.

    Each draw is one single-particle ELBO (z summed out exactly, theta ~ q); the standard
    error is their standard deviation / sqrt(particles). ``elbo="pyro"``: Pyro's
    ``TraceEnum_ELBO``, one call per particle; ``"vectorized"``: all particles at once by
    :func:`mean_field_losses` (the same value per draw, tested against Pyro's).
    """
    n = x.shape[0]
    with torch.no_grad():
        if elbo == "vectorized":
            values = -mean_field_losses(program, guide, x, particles)
        else:
            loss = _elbo().loss
            values = torch.tensor(
                [-loss(program, guide, x) / n for _ in range(particles)], dtype=torch.float64
            )
    se = float(values.std() / particles**0.5) if particles > 1 else float("nan")
    return float(values.mean()), se


def mean_field_losses(
    program: BayesianMixture, guide: AutoNormal, x: torch.Tensor, particles: int
) -> torch.Tensor:
    """-ELBO / N of ``particles`` draws theta_s ~ q at once, written directly: (S,).

    u_s ~ q site by site in program order (each site's S draws at once), then per draw
    U(u_s) + log q(u_s) with U the potential (:meth:`BayesianMixture.potential`: prior,
    Jacobian and the likelihood with z summed out), each evaluated for all S draws in one
    pass. With ``particles=1`` and the same random state, the draw of
    :func:`mean_field_loss` and the loss of Pyro's ``TraceEnum_ELBO``.
    """
    transforms, S = program.transforms(), particles
    values, log_det_minus_q = {}, torch.zeros(S, dtype=x.dtype)
    with pyro.validation_enabled(False):
        for name in program.sites:
            loc, scale = guide._get_loc_and_scale(name)
            q = dist.Normal(loc, scale)
            u = q.rsample((S,))  # (S, *site shape)
            values[name] = v = transforms[name](u)
            log_det = transforms[name].log_abs_det_jacobian(u, v)
            log_det_minus_q = log_det_minus_q + (
                log_det.reshape(S, -1).sum(-1) - q.log_prob(u).reshape(S, -1).sum(-1)
            )
        log_joint = program.log_prior(values) + program.log_likelihood(values, x).sum(-1)
    return -(log_joint + log_det_minus_q) / x.shape[0]


def draws_from_guide(guide, x: torch.Tensor, num_samples: int) -> dict[str, torch.Tensor]:
    """``num_samples`` draws of every site from an autoguide, each (S, *site shape)."""
    with torch.no_grad(), pyro.plate("draws", num_samples, dim=-1):
        values = guide(x)
    return {k: v.detach() for k, v in values.items()}


def mean_field_loss(
    program: BayesianMixture, guide: AutoNormal, potential, x: torch.Tensor
) -> torch.Tensor:
    """-ELBO / N for one draw theta ~ q, written directly: (U(u) + log q(u)) / N.

    U is :meth:`BayesianMixture.potential` (z summed out, Jacobian included) and u ~ q is
    drawn from the guide's own Normal factors in program order, as ``AutoNormal`` draws
    them; so with the same random state this is the value Pyro's ``TraceEnum_ELBO`` gives
    for (program, guide), without Pyro's per-call tracing (tests check 1e-10).
    """
    unconstrained, log_q = {}, 0.0
    for name in program.sites:
        loc, scale = guide._get_loc_and_scale(name)
        q = dist.Normal(loc, scale)
        unconstrained[name] = u = q.rsample()
        log_q = log_q + q.log_prob(u).sum()
    return (potential(unconstrained) + log_q) / x.shape[0]


def fit_mean_field(
    program: BayesianMixture,
    x: torch.Tensor,
    start: dict[str, torch.Tensor],
    *,
    steps: int = 500,
    lr: float = 0.05,
    final_lr: float = 0.005,
    init_scale: float = 0.05,
    elbo_particles: int = 100,
    num_samples: int = 1000,
    elbo: str = "vectorized",
) -> MeanFieldFit:
    """Maximise the ELBO over q(theta) = prod_i N(u_i; m_i, s_i^2) (VI-MF), z summed out.

    ``AutoNormal`` from ``start`` (site values; scales ``init_scale``), Adam for ``steps``
    steps with one particle per step, the learning rate decaying geometrically from ``lr``
    to ``final_lr``. The loss of each step is the value of Pyro's ``TraceEnum_ELBO``
    computed by :func:`mean_field_loss` (``elbo="vectorized"``, the default: a direct
    evaluation several times faster, tested equal to Pyro's with the same random state,
    its potential and gradient replayed from one recording, :class:`RecordedPotential`)
    or Pyro's ``TraceEnum_ELBO`` itself (``"pyro"``). The final bound is
    re-estimated with ``elbo_particles`` particles (:func:`elbo_estimate`, with the same
    ``elbo``), and ``num_samples`` draws of theta are taken from q.
    """
    if elbo not in ("vectorized", "pyro"):
        raise ValueError(f"elbo must be 'vectorized' or 'pyro', got {elbo!r}")
    n = x.shape[0]
    guide = AutoNormal(
        program.without_z(), init_loc_fn=init_to_value(values=start), init_scale=init_scale
    )
    guide(x)
    params = [p for p in guide.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    decay = (final_lr / lr) ** (1.0 / max(steps, 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    pyro_elbo, potential, bounds = _elbo(), RecordedPotential(program.potential(x)), []
    for _ in range(steps):
        optimizer.zero_grad()
        try:
            if elbo == "pyro":
                loss = pyro_elbo.differentiable_loss(program, guide, x) / n
            else:
                loss = mean_field_loss(program, guide, potential, x)
        except ValueError as error:
            if not refused_parameters(error):
                raise
            raise left_support(
                "mean-field SVI", error, "lower lr or init_scale, or use fewer components"
            ) from error
        if not torch.isfinite(loss):
            raise ValueError(
                "the mean-field ELBO became non-finite; lower lr or init_scale, or scale the data"
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
        bounds.append(-float(loss.detach()))
    value, se = elbo_estimate(program, guide, x, elbo_particles, elbo)
    draws = draws_from_guide(guide, x, num_samples)
    return MeanFieldFit(guide, value, se, draws, bounds, steps)


class _ValueWithGradient(torch.autograd.Function):
    """U(u) whose gradient is the one the recording computed with it (no graph of its own)."""

    @staticmethod
    def forward(ctx, run, *us):
        value, *grads = run(*us)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        return (None, *(grad_value * g for g in ctx.saved_tensors))


class RecordedPotential:
    """A potential U and its gradient, recorded once as one graph and replayed by TorchScript.

    NUTS evaluates U and dU/du thousands of times at one shape; on a few hundred data
    points each evaluation is ~150 small tensor operations forward and as many backward,
    and what they cost is the per-operation overhead of running them one by one. The
    first call records every ATen operation of U and of autograd's gradient of it
    (:func:`~elbolab.models.enumeration.record_ops`: forward and backward, below autograd)
    and traces that graph into TorchScript; every call then runs the same operations on
    the same tensors in TorchScript's interpreter, about twice as fast, returning U with
    the recorded gradient attached (``tests/test_compare.py`` checks value and gradient
    against the function itself). A function that cannot be recorded (it reads a value
    into Python) runs as it is.
    """

    def __init__(self, potential_fn) -> None:
        self.potential_fn = potential_fn
        self.signature: tuple | None = None  # ((name, shape, dtype), ...) it was recorded for
        self.run = None

    def _value_and_grad(self, *us: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            u = {s[0]: t.detach().requires_grad_() for s, t in zip(self.signature, us, strict=True)}
            value = self.potential_fn(u)
            grads = torch.autograd.grad(value, list(u.values()))
        return (value.detach(), *grads)

    def _record(self, us: tuple) -> None:
        from ...models.enumeration import ReadsValue, as_torchscript, record_ops, tidy

        try:
            graph, _ = record_ops(self._value_and_grad, tuple(t.detach() for t in us))
        except ReadsValue:
            self.run = False
            return
        tidy(graph)  # views that change nothing, detaches: gone (every value kept)
        graph.compile()
        self.run = as_torchscript(graph, us)

    def __call__(self, unconstrained: dict[str, torch.Tensor]) -> torch.Tensor:
        signature = tuple((n, t.shape, t.dtype) for n, t in sorted(unconstrained.items()))
        if self.signature is None:
            self.signature = signature
        if self.run is False or signature != self.signature:
            return self.potential_fn(unconstrained)  # (another shape: as it is)
        us = tuple(unconstrained[n] for n, _, _ in signature)
        if self.run is None:
            self._record(us)
            if self.run is False:
                return self.potential_fn(unconstrained)
        if not torch.is_grad_enabled():
            return self.run(*us)[0]
        return _ValueWithGradient.apply(self.run, *us)


def sample_nuts(
    program: BayesianMixture,
    x: torch.Tensor,
    starts: list[dict[str, torch.Tensor]],
    *,
    num_samples: int = 300,
    warmup_steps: int = 300,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    potential: str = "recorded",
    seed: int = 0,
    progress: bool = False,
    parallel: bool | None = None,
    full_mass: bool = False,
) -> NUTSFit:
    """NUTS on theta with z summed out; one chain per start (site values).

    Chain c is seeded with ``seed + c`` (inside ``torch.random.fork_rng``, so the caller's
    random state is untouched). ``potential`` is ``"vectorized"``
    (:meth:`BayesianMixture.potential`, the function Pyro derives from the program written
    directly, tested equal to it in value and gradient, about twice as fast as Pyro's),
    ``"recorded"`` (the default: that function and its gradient recorded once and replayed
    by TorchScript, :class:`RecordedPotential`, about twice as fast again) or
    ``"enumerated"`` (Pyro's own, from the program, z enumerated at every step).
    ``parallel``: the chains run in processes side by side (:func:`.chains.run_chains`;
    ``None``: where two cores are free), with the same draws as one after another. The
    progress bar, if any, is that of chain 0. ``full_mass``: adapt a dense mass matrix
    (Pyro's ``NUTS(full_mass=True)``) instead of a diagonal one.
    """
    if potential not in ("recorded", "vectorized", "enumerated"):
        raise ValueError(
            f"potential must be 'recorded', 'vectorized' or 'enumerated', got {potential!r}"
        )
    transforms = program.transforms()
    to_unconstrained = {k: t.inv for k, t in transforms.items()}

    def one_chain(c: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        start, show = starts[c], progress and c == 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + c)
            if potential != "enumerated":
                potential_fn = program.potential(x)
                if potential == "recorded":
                    potential_fn = RecordedPotential(potential_fn)
                kernel = NUTS(
                    potential_fn=potential_fn,
                    target_accept_prob=target_accept_prob,
                    max_tree_depth=max_tree_depth,
                    full_mass=full_mass,
                )
                mcmc = MCMC(
                    kernel,
                    num_samples=num_samples,
                    warmup_steps=warmup_steps,
                    initial_params={k: to_unconstrained[k](v) for k, v in start.items()},
                    transforms=to_unconstrained,
                    disable_progbar=not show,
                )
                mcmc.run()
            else:
                kernel = NUTS(
                    program,
                    max_plate_nesting=1,
                    target_accept_prob=target_accept_prob,
                    max_tree_depth=max_tree_depth,
                    full_mass=full_mass,
                    init_strategy=init_to_value(values=start),
                )
                mcmc = MCMC(
                    kernel,
                    num_samples=num_samples,
                    warmup_steps=warmup_steps,
                    disable_progbar=not show,
                )
                mcmc.run(x)
        draws = {k: v.detach() for k, v in mcmc.get_samples().items()}
        flags = torch.zeros(num_samples, dtype=torch.bool)
        for indices in mcmc.diagnostics()["divergences"].values():
            flags[torch.as_tensor(indices, dtype=torch.long)] = True
        return draws, flags, float(kernel.step_size)

    chains = run_chains(one_chain, len(starts), parallel)
    draws = {k: torch.stack([chain[0][k] for chain in chains]) for k in program.sites}
    n_iter = len(starts) * (num_samples + warmup_steps)
    return NUTSFit(
        draws,
        torch.stack([chain[1] for chain in chains]),
        n_iter,
        [c[2] for c in chains],
        full_mass,
    )
