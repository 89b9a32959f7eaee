"""The exact-posterior guide q_d(z) = p(z | x_d; theta~): with it, maximising the ELBO is EM.

Nothing here knows which model it serves. The guide runs the model once under Pyro's
parallel enumeration (:func:`elbolab.models.enumeration.enumerate_joint`), which gives
log p(x_d, z; theta~) for every value of every discrete latent site, and normalises:

    r_dk = pi_k p_k(x_d) / sum_k' pi_k' p_k'(x_d)                     (EM-MIX.1)

It is a valid Pyro guide: the same signature as the model, the same plates and scales,
and a ``"z"`` site marked for parallel enumeration, so ``TraceEnum_ELBO`` with it sums
over z exactly and returns sum_d LB_d(q_d, theta), which at theta = theta~ equals
sum_d log p(x_d; theta~) (EM-TIGHT).

theta~ is held fixed for the M-step: :meth:`ExactPosterior.refresh` (the E-step, EM-1
step 1) copies the model's current parameters into a frozen twin; until the next refresh
the guide answers from that twin, whatever the optimiser does to the model. Before the
first refresh the guide follows the live model (without gradients).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..models.enumeration import EnumeratedJoint, enumerate_joint


class ExactPosterior(PyroModule):
    """q_d(z) = p(z | x_d; theta~) computed from ``model`` by enumeration.

    Parameters
    ----------
    model:
        A Pyro program (usually a :class:`~elbolab.models.MixtureModel`) whose latent sites
        are discrete with finite support, each inside the plates of the data.
    max_plate_nesting:
        Number of plates around the latent sites (1 for the mixtures).

    Call it exactly like the model: ``guide(x)`` / ``guide(x, sample_weight)``.
    """

    def __init__(self, model, max_plate_nesting: int = 1) -> None:
        super().__init__()
        # A tuple keeps the model out of this module's parameters and state_dict.
        self._model_ref = (model,)
        self.max_plate_nesting = max_plate_nesting
        self._frozen: tuple = ()  # (frozen copy of the model holding theta~,) or ()
        self._cache: tuple[tuple, EnumeratedJoint] | None = None

    @property
    def model(self):
        return self._model_ref[0]

    # ------------------------------------------------------------------ E-step
    @torch.no_grad()
    def refresh(self, *args, **kwargs) -> ExactPosterior:
        """E-step (EM-1 step 1): freeze theta~ := theta, and q_d(z) := p(z | x_d; theta~).

        With data arguments, the posterior for them is computed now and cached, so the
        M-step that follows reuses it.
        """
        model, twin = self.model, self.twin
        state = model.state_dict()
        if twin is None or {k: v.shape for k, v in twin.state_dict().items()} != {
            k: v.shape for k, v in state.items()
        }:
            twin = copy.deepcopy(model)
            for p in twin.parameters():
                p.requires_grad_(False)
            self._frozen = (twin,)  # a tuple keeps it out of this module's submodules
        else:
            twin.load_state_dict(state)
        self._cache = None
        if args or kwargs:
            self._cache = (self._key(args, kwargs), self._enumerate(args, kwargs))
        return self

    @torch.no_grad()
    def fix(self, log_probs: torch.Tensor, *args, **kwargs) -> ExactPosterior:
        """Hold q at given log-probabilities (N, K) for these data (one latent site).

        Used to start EM from initial responsibilities, as scikit-learn does: the first
        M-step then fits the parameters to them.
        """
        joint = self.refresh(*args, **kwargs)._cache[1]
        if len(joint.sites) != 1:
            raise ValueError("fix() supports models with a single latent site")
        table = log_probs.to(joint.log_joint.dtype).movedim(-1, joint.enum_dim(0))
        joint = EnumeratedJoint(
            table,
            joint.sites,
            joint.cardinalities,
            joint.frames,
            joint.scales,
            joint.max_plate_nesting,
        )
        self._cache = (self._cache[0], joint)
        return self

    def release(self) -> ExactPosterior:
        """Drop theta~: the guide follows the live model again."""
        self._frozen, self._cache = (), None
        return self

    @property
    def twin(self):
        """The frozen copy of the model holding theta~, or None before :meth:`refresh`."""
        return self._frozen[0] if self._frozen else None

    @property
    def frozen(self) -> bool:
        """Whether a theta~ is held (after :meth:`refresh`)."""
        return bool(self._frozen)

    @staticmethod
    def _key(args, kwargs) -> tuple:
        # ``guide(x)`` and ``guide(x, None)`` are the same call
        items = list(args) + [(k, kwargs[k]) for k in sorted(kwargs)]
        return tuple(
            (id(a), tuple(a.shape), a._version) if isinstance(a, torch.Tensor) else id(a)
            for a in items
            if a is not None
        )

    @torch.no_grad()
    def _enumerate(self, args, kwargs) -> EnumeratedJoint:
        source = self.twin if self.frozen else self.model
        return enumerate_joint(source, *args, max_plate_nesting=self.max_plate_nesting, **kwargs)

    def joint(self, *args, **kwargs) -> EnumeratedJoint:
        """The enumerated log p(x, z; theta~) for these data (cached after :meth:`refresh`)."""
        if self._cache is not None and self._cache[0] == self._key(args, kwargs):
            return self._cache[1]
        return self._enumerate(args, kwargs)

    # ------------------------------------------------------------------ posterior
    @staticmethod
    def _site_logits(joint: EnumeratedJoint, j: int) -> torch.Tensor:
        """log q(z_j | z_<j, x): sum out later sites, normalise over z_j, put z_j last."""
        table = joint.log_joint
        for later in range(len(joint.sites) - 1, j, -1):
            table = table.logsumexp(dim=joint.enum_dim(later), keepdim=True)
        dim = joint.enum_dim(j)
        table = table - table.logsumexp(dim=dim, keepdim=True)
        table = table.movedim(dim, -1)
        # drop the size-1 dims left by later sites
        extra = len(joint.sites) - 1 - j
        return table.reshape(table.shape[extra:])

    def _checked(self, args: tuple) -> tuple:
        """The data argument checked by the model (fitted? right width? finite?), if it can."""
        model = self.model
        require = getattr(model, "_require_built", None)
        if require is not None:
            require()
        validate = getattr(model, "validate_data", None)
        if validate is not None and args and args[0] is not None:
            args = (validate(args[0]),) + tuple(args[1:])
        return args

    def log_probs(self, *args, site: str | None = None, **kwargs) -> torch.Tensor:
        """log q_d(z = k) for the first latent site (or ``site``), shape (N, K).

        The data are checked by the model first (``ValueError`` naming the fix for an
        unfitted model, another feature count, NaN, ...).
        """
        args = self._checked(args)
        joint = self.joint(*args, **kwargs)
        j = 0 if site is None else joint.sites.index(site)
        return self._site_logits(joint, j)

    def probs(self, *args, site: str | None = None, **kwargs) -> torch.Tensor:
        """Responsibilities r_dk = p(z_d = k | x_d; theta~), shape (N, K) (EM-MIX.1)."""
        return self.log_probs(*args, site=site, **kwargs).exp()

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, *args, **kwargs):
        """Sample (or, under ``TraceEnum_ELBO``, enumerate) every latent site from q."""
        joint = self.joint(*args, **kwargs)
        values = {}
        with ExitStack() as plates:
            opened = set()
            for j, name in enumerate(joint.sites):
                for frame in sorted(joint.frames[j], key=lambda f: -f.dim):
                    if frame.name not in opened:  # each plate once, shared by the sites
                        plates.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
                        opened.add(frame.name)
                with poutine.scale(scale=joint.scales[j]):
                    values[name] = pyro.sample(
                        name,
                        dist.Categorical(logits=self._site_logits(joint, j)),
                        infer={"enumerate": "parallel"},
                    )
        return values
