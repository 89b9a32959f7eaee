"""The M2 semi-supervised VAE: the labelled and unlabelled bounds (M2-L, M2-U) against hand
computations, the classifier term (M2-J), the trainer with labels, evaluation with y summed,
and bad input."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from elbolab.datasets import load_digits_split
from elbolab.guides import AmortizedNormal, SemiSupervisedGuide
from elbolab.inference import (
    CompiledELBO,
    SVITrainer,
    elbo_per_datapoint,
    iwae_log_likelihood,
)
from elbolab.models import VAE, SemiSupervisedVAE
from elbolab.models.semi_supervised import concat_condition

C = 10


def pair(seed=0, dtype=torch.float64, latent_dim=3, hidden=(16,)):
    torch.manual_seed(seed)
    model = SemiSupervisedVAE(
        64, C, latent_dim=latent_dim, hidden=hidden, likelihood="binomial", count=16
    ).to(dtype)
    return model, SemiSupervisedGuide(model)


def some_digits(n=12, dtype=torch.float64):
    train, _, _ = load_digits_split(seed=0)
    return train.data[:n].to(dtype), train.target[:n].long()


@torch.no_grad()
def hand_labelled_bound(model, guide, x, y, z):
    """-L(x, y) of M2-L at the draw z, term by term: log p(x | y, z) + log p(y) + log p(z)
    - log q(z | x, y), shape (N,)."""
    log_px = model.likelihood_dist(model.decoder(concat_condition(z, y, C))).log_prob(x)
    log_py = torch.full_like(log_px, -math.log(C))  # the uniform prior
    log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    loc, scale = guide.encode(x, y)
    log_qz = dist.Normal(loc, scale).log_prob(z).sum(-1)
    return log_px + log_py + log_pz - log_qz


def enumerated_draws(guide, x, seed):
    """The guide's draws of z under Pyro's enumeration of y, (C, N, k), from ``seed``."""
    pyro.set_rng_seed(seed)
    trace = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(x)
    return trace.nodes["z"]["value"]


# ---------------------------------------------------------------------------- the bounds
def test_the_unlabelled_bound_sums_y_exactly_m2_u():
    """M2-U: TraceEnum_ELBO's bound with y enumerated equals
    sum_y q(y|x) (-L(x, y)) + H(q(y|x)), computed by hand from ten labelled bounds at the
    same draws of z. Exact path in float64: 1e-10."""
    model, guide = pair()
    x, _ = some_digits()
    z = enumerated_draws(guide, x, seed=3)  # one draw per class and datum
    assert z.shape == (C, x.shape[0], 3)
    pyro.set_rng_seed(3)
    bound = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x)

    log_q = guide.class_logits(x).detach()  # (N, C)
    labelled = torch.stack(
        [
            hand_labelled_bound(model, guide, x, torch.full((x.shape[0],), c), z[c])
            for c in range(C)
        ],
        dim=-1,
    )  # -L(x_d, c), (N, C)
    entropy = -(log_q.exp() * log_q).sum(-1)
    by_hand = (log_q.exp() * labelled).sum(-1) + entropy
    assert bound == pytest.approx(float(by_hand.sum()), abs=1e-10, rel=1e-12)
    # and it is a bound on log p(x) that the classifier changes: not the labelled one
    assert float(by_hand.sum()) < float(labelled.max(-1).values.sum())


def test_the_labelled_bound_is_m2_l():
    """M2-L: with labels the guide samples z only and the ELBO is -L(x, y) at that draw
    (1e-10, float64), for the default ELBO and for Trace_ELBO alike."""
    model, guide = pair(1)
    x, y = some_digits()
    for elbo in (model.default_loss(), Trace_ELBO()):
        pyro.set_rng_seed(5)
        trace = poutine.trace(guide).get_trace(x, y)
        assert "y" not in trace.nodes  # the class is observed, not guessed
        z = trace.nodes["z"]["value"]
        pyro.set_rng_seed(5)
        bound = -elbo.loss(model, guide, x, y)
        by_hand = hand_labelled_bound(model, guide, x, y, z)
        assert bound == pytest.approx(float(by_hand.sum()), abs=1e-10, rel=1e-12)


def assert_recording_matches(compiled, reference, scale=1.0):
    """For an unlabelled and a labelled batch, recorded then replayed: ``loss_and_grads``
    gives the loss and gradients that ``reference(*args)`` gives (it sets the gradients
    and returns the loss), from the same seed (1e-12 relative in float64)."""
    params = list(compiled.parameters())
    x, y = some_digits()
    with pyro.validation_enabled(False):
        for args in ((x,), (x, y)):
            for _ in range(2):  # the second call replays the recording
                for p in params:
                    p.grad = None
                pyro.set_rng_seed(7)
                loss = compiled.loss_and_grads(*args, scale=scale)
                replayed = [None if p.grad is None else p.grad.clone() for p in params]
                for p in params:
                    p.grad = None
                assert loss == pytest.approx(reference(*args), rel=1e-12)
                for a, p in zip(replayed, params, strict=True):
                    assert (a is None) == (p.grad is None)
                    if a is not None:
                        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-12)


def test_the_compiled_enumerated_elbo_equals_pyros():
    """The recorded TraceEnum_ELBO (the contraction Pyro runs, recorded once per shape):
    the same loss and gradients as Pyro's from the same seed, for both kinds of batch
    (1e-12 relative in float64: the same operations)."""
    model, guide = pair(2)
    compiled = CompiledELBO(model.default_loss(), model, guide, strict=True)

    def reference(*args):
        pyro.set_rng_seed(7)
        eager = compiled.eager(*args) * 0.25
        eager.backward()
        return float(eager.detach())

    assert_recording_matches(compiled, reference, scale=0.25)
    assert len(compiled.graphs) == 2 and all(g is not None for g in compiled.graphs.values())


@pytest.mark.filterwarnings("ignore:(?s).*enumerate sites:UserWarning")
def test_the_compiled_trace_elbo_with_y_sampled_reports_the_loss_not_the_surrogate():
    """With ``Trace_ELBO`` the guide's y is sampled, a score-function site: the surrogate's
    value is not -ELBO, and Pyro reports the loss itself. The recording reports the same
    as Pyro's ``loss`` and the gradients of its surrogate from the same seed, labelled or not
    (1e-12 relative in float64: the same operations)."""
    model, guide = pair(2)
    elbo = Trace_ELBO()
    compiled = CompiledELBO(elbo, model, guide, strict=True)

    def reference(*args):
        pyro.set_rng_seed(7)
        elbo.differentiable_loss(model, guide, *args).backward()  # the surrogate
        pyro.set_rng_seed(7)
        return elbo.loss(model, guide, *args)

    assert_recording_matches(compiled, reference)
    x, _ = some_digits()
    pyro.set_rng_seed(7)
    ((model_trace, guide_trace),) = elbo._get_traces(model, guide, (x,), {})
    value, surrogate = elbo._differentiable_loss_particle(model_trace, guide_trace)
    assert abs(float(surrogate.detach()) - float(value)) > 1.0  # what a plain recording reports


def test_the_trainer_step_is_the_gradient_of_j_alpha():
    """M2-J: one step of the trainer with labels is the gradient of
    J^alpha / N = (sum_u U + sum_l L + alpha sum_l -log q(y|x)) / N, computed by hand with
    Pyro's ELBO on the same draws (all points in one batch; 1e-10 in float64), compiled
    or not."""
    x, y = some_digits(20)
    labels = y.clone()
    labels[::2] = -1  # 10 unlabelled, 10 labelled
    alpha = 3.0
    for compile in (True, False):
        model, guide = pair(4)
        trainer = SVITrainer(
            model,
            guide,
            alpha=alpha,
            batch_size=64,
            compile=compile,
            progress=False,
            optimizer=torch.optim.SGD,
            lr=1e-30,
        )
        pyro.set_rng_seed(11)
        with pyro.validation_enabled(False):
            bound = trainer._labelled_step(x[::2], x[1::2], y[1::2], (10, 10), 1.0)
        stepped = {n: p.grad.clone() for n, p in trainer.elbo.named_parameters()}

        model_h, guide_h = pair(4)
        elbo = model_h.default_loss()
        pyro.set_rng_seed(11)
        loss_u = elbo.differentiable_loss(model_h, guide_h, x[::2])
        loss_l = elbo.differentiable_loss(model_h, guide_h, x[1::2], y[1::2])
        log_q = guide_h.class_logits(x[1::2]).gather(-1, y[1::2, None]).squeeze(-1)
        j_alpha = (loss_u + loss_l - alpha * log_q.sum()) / 20
        j_alpha.backward()
        assert bound == pytest.approx(-float((loss_u + loss_l).detach()), rel=1e-10)
        hand = dict(
            [(f"model.{n}", p.grad) for n, p in model_h.named_parameters()]
            + [(f"guide.{n}", p.grad) for n, p in guide_h.named_parameters()]
        )
        assert set(stepped) == set(hand)
        for name, grad in stepped.items():
            torch.testing.assert_close(grad, hand[name], rtol=1e-10, atol=1e-12)


def test_without_the_classifier_term_labelled_points_do_not_train_the_classifier():
    """M2-J's reason: the labelled bound does not involve q(y | x), so with every point
    labelled and alpha = 0 the classifier keeps its weights; alpha > 0 trains it."""
    x, y = some_digits(40, torch.float32)
    before = None
    for alpha, moves in ((0.0, False), (None, True)):
        model, guide = pair(0, torch.float32)
        trainer = SVITrainer(model, guide, alpha=alpha, seed=0, progress=False)
        start = [p.detach().clone() for p in guide.classifier.parameters()]
        before = [p.detach().clone() for p in guide.encoder.parameters()]
        trainer.fit(x, y=y, epochs=3)
        changed = [
            not torch.equal(a, p) for a, p in zip(start, guide.classifier.parameters(), strict=True)
        ]
        assert all(changed) if moves else not any(changed)
        assert any(
            not torch.equal(a, p) for a, p in zip(before, guide.encoder.parameters(), strict=True)
        )


# ---------------------------------------------------------------------------- training
def digits_with_labels(per_class=5, seed=0, n=600):
    """``n`` training digits with ``per_class`` labels per class (-1 elsewhere), and the
    validation split with its labels."""
    train, val, _ = load_digits_split(seed=0)
    x, t = train.data[:n].float(), train.target[:n].long()
    labels = torch.full_like(t, -1)
    g = torch.Generator().manual_seed(seed)
    for c in range(C):
        rows = torch.nonzero(t == c).squeeze(-1)
        chosen = rows[torch.randperm(len(rows), generator=g)[:per_class]]
        labels[chosen] = c
    return x, labels, val.data.float(), val.target.long()


def small_m2(seed=0):
    torch.manual_seed(seed)
    model = SemiSupervisedVAE(64, C, latent_dim=4, hidden=(64,), likelihood="binomial", count=16)
    return model, SemiSupervisedGuide(model)


def test_m2_with_50_labels_beats_chance_by_far_and_the_bound_rises():
    """A short run on digits with 5 labels per class: the bound per digit rises and the
    classifier's validation accuracy ends far above chance (0.1). The threshold 0.5 is a
    floor that a broken classifier term or a broken sum over y would not reach (measured
    about 0.7 after 15 epochs; the notebook trains to convergence)."""
    x, labels, x_val, y_val = digits_with_labels()
    model, guide = small_m2()
    trainer = SVITrainer(model, guide, seed=0, progress=False)
    assert isinstance(trainer.loss, TraceEnum_ELBO)  # the model's default: y summed
    result = trainer.fit(x, y=labels, epochs=15, x_val=x_val, y_val=y_val)
    assert result.train_bounds[-1] > result.train_bounds[0]
    assert len(result.val_accuracies) == 15 and len(result.val_bounds) == 15
    assert result.val_accuracies[-1] > 0.5
    assert trainer.accuracy(x_val, y_val) == result.val_accuracies[-1]
    assert guide.classify(x_val).shape == (x_val.shape[0],)
    probs = guide.class_probs(x_val)
    torch.testing.assert_close(probs.sum(-1), torch.ones(x_val.shape[0]))
    assert torch.equal(probs.argmax(-1), guide.classify(x_val))
    assert not trainer.elbo.fallbacks  # every shape was recorded and replayed


def test_seeded_runs_repeat_and_resume_from_a_checkpoint(tmp_path):
    """The same seed gives the same run; 2 epochs, a checkpoint and 1 more equal 3 straight
    (validation accuracies carried in the checkpoint)."""
    x, labels, x_val, y_val = digits_with_labels(3)
    path = tmp_path / "m2.pt"
    model_a, guide_a = small_m2(1)
    straight = SVITrainer(model_a, guide_a, seed=2, progress=False)
    straight.fit(x, y=labels, epochs=2, x_val=x_val, y_val=y_val)
    straight.fit(x, y=labels, epochs=1, x_val=x_val, y_val=y_val)

    model_b, guide_b = small_m2(1)
    first = SVITrainer(model_b, guide_b, seed=2, checkpoint=path, progress=False)
    first.fit(x, y=labels, epochs=2, x_val=x_val, y_val=y_val)
    model_c, guide_c = small_m2(50)
    resumed = SVITrainer(model_c, guide_c, seed=2, progress=False).load(path)
    assert resumed.history.val_accuracies == first.history.val_accuracies
    resumed.fit(x, y=labels, epochs=1, x_val=x_val, y_val=y_val)
    assert resumed.history.train_bounds == straight.history.train_bounds
    assert resumed.history.val_accuracies == straight.history.val_accuracies
    for a, c in zip(guide_a.parameters(), guide_c.parameters(), strict=True):
        assert torch.equal(a, c)


def test_early_stopping_watches_the_validation_accuracy():
    """With validation labels, patience watches the accuracy: the run stops after
    ``patience`` epochs without a better one and the best epoch's parameters are back."""
    x, labels, x_val, y_val = digits_with_labels(3)
    model, guide = small_m2(3)
    trainer = SVITrainer(model, guide, seed=0, patience=2, lr=3e-2, progress=False)
    result = trainer.fit(x, y=labels, epochs=40, x_val=x_val, y_val=y_val)
    assert result.stopped_early
    best = max(result.val_accuracies)
    assert result.val_accuracies[result.best_epoch - 1] == best
    assert result.val_accuracies.index(best) == len(result.val_accuracies) - 3
    assert trainer.accuracy(x_val, y_val) == best


def test_class_conditional_samples_and_decoding():
    model, _ = pair()
    x, y, z = model.sample(6, y=4, seed=0)
    assert x.shape == (6, 64) and torch.equal(y, torch.full((6,), 4)) and z.shape == (6, 3)
    again = model.sample(6, y=4, seed=0)
    assert torch.equal(again[0], x)
    x, y, z = model.sample(C, y=torch.arange(C), seed=1)
    assert torch.equal(y, torch.arange(C))
    assert bool(((x >= 0) & (x <= 16) & (x == x.round())).all())
    # decode: the binomial mean count * sigmoid(F([z, onehot(y)])), one class per row
    same_z = z[:1].expand(C, -1)
    means = model.decode(same_z, torch.arange(C))
    assert means.shape == (C, 64) and bool(((means > 0) & (means < 16)).all())
    torch.testing.assert_close(means[3], model.decode(same_z[0], 3), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- evaluation
def test_iwae_sums_the_class_and_elbo_per_datapoint_is_m2_u():
    """log p(x) with y summed: logsumexp over classes of each class's K-sample estimate,
    checked by hand from the labelled weights at the same draws (1e-10); it grows with
    K, and exceeds the unlabelled bound, which elbo_per_datapoint computes (checked
    against TraceEnum_ELBO's estimate from 5 x 200 particles, within 5 standard errors of
    the difference)."""
    model, guide = pair(6)
    x, _ = some_digits(5)
    pyro.set_rng_seed(0)
    estimate = iwae_log_likelihood(model, guide, x, num_samples=50, sample_chunk=20)
    pyro.set_rng_seed(0)
    by_hand = []
    for c in range(C):
        labels = torch.full((x.shape[0],), c)
        pieces = []
        for k in (20, 20, 10):  # the chunks iwae_log_likelihood draws, in its order
            loc, scale = guide.encode(x, labels)
            z = dist.Normal(loc, scale).sample((k,))
            pieces.append(hand_labelled_bound(model, guide, x, labels, z))
        by_hand.append(torch.cat(pieces).logsumexp(0) - math.log(50))
    torch.testing.assert_close(estimate, torch.stack(by_hand).logsumexp(0), rtol=1e-10, atol=1e-10)

    torch.manual_seed(1)
    bound = elbo_per_datapoint(model, guide, x, num_particles=1000)
    large = iwae_log_likelihood(model, guide, x, num_samples=1000)
    assert bool((large > bound).all())
    assert float(large.mean()) > float(estimate.mean()) - 0.5
    # the same -U by TraceEnum_ELBO: 5 estimates of 200 particles each
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=200, vectorize_particles=True)
    values = []
    for seed in range(5):
        pyro.set_rng_seed(100 + seed)
        values.append(-elbo.loss(model, guide, x) / x.shape[0])
    values = torch.tensor(values)
    sd = float(values.std())  # of one 200-particle estimate
    se = math.hypot(sd / math.sqrt(5), sd * math.sqrt(200 / 1000))  # mean of 5; 1000 particles
    assert float(bound.mean()) == pytest.approx(float(values.mean()), abs=5 * se)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "labels, words",
    [
        (torch.full((12,), 10), "outside 0..9"),
        (torch.full((12,), -2), "outside 0..9, or -1"),
        (torch.zeros(11, dtype=torch.long), "11 labels but there are 12"),
        (torch.full((12,), -1), "no labels"),
        (torch.full((12,), 0.5), "integer class labels"),
        (torch.zeros(12, 2, dtype=torch.long), "1-D"),
    ],
)
def test_bad_labels_are_refused_before_training(labels, words):
    x, _ = some_digits(12, torch.float32)
    model, guide = small_m2()
    trainer = SVITrainer(model, guide, seed=0, progress=False)
    start = [p.detach().clone() for p in trainer.elbo.parameters()]
    with pytest.raises(ValueError, match=words):
        trainer.fit(x, y=labels, epochs=1)
    assert all(torch.equal(a, p) for a, p in zip(start, trainer.elbo.parameters(), strict=True))
    assert trainer.history.epochs == 0


def test_other_bad_input():
    x, y = some_digits(12, torch.float32)
    model, guide = small_m2()
    with pytest.raises(ValueError, match="at least 2"):
        SemiSupervisedVAE(64, 1)
    with pytest.raises(ValueError, match="class_probs must be 10 positive"):
        SemiSupervisedVAE(64, C, class_probs=[0.5, 0.5])
    with pytest.raises(ValueError, match="guide of a SemiSupervisedVAE"):
        SemiSupervisedGuide(VAE(64, 2))
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        SVITrainer(model, guide, alpha=-1.0)
    trainer = SVITrainer(model, guide, progress=False)
    with pytest.raises(ValueError, match="y_val labels validation data: pass x_val"):
        trainer.fit(x, y=y, y_val=y)
    with pytest.raises(ValueError, match="y_val has 11 labels"):
        trainer.fit(x, y=y, x_val=x, y_val=y[:11])
    vae = VAE(64, 2, hidden=(8,), likelihood="binomial", count=16)
    plain = SVITrainer(vae, AmortizedNormal(64, 2, hidden=(8,)), progress=False)
    with pytest.raises(ValueError, match="no class site"):
        plain.fit(x, y=y)
    with pytest.raises(ValueError, match="outside 0..9"):
        model.sample(3, y=12)
    with pytest.raises(ValueError, match=r"shape \(N, 64\)|64 features|columns"):
        guide.classify(torch.zeros(3, 5))
