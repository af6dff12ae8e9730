"""The differentiable prompt metrics A^CFG, A^{s^CFG}, A^FLIPD, token attributions and embedding
optimisation: closed forms on a Gaussian noise predictor, FLIPD against mmh_jax.lid on the tiny
random Stable Diffusion pipeline (tests/conftest.py's ``sd``), gradients against finite
differences on a small cross-attention network (the tiny UNet's gradients take a minute to
compile; they are exercised by the planted-token test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from mmh_jax.guidance import cfg_score_fn
from mmh_jax.lid import flipd
from mmh_jax.memorization.prompt import (
    MetricPoints,
    metric_values,
    noised_points,
    optimize_embedding,
    optimize_embedding_traced,
    prompt_metric,
    token_attributions,
    trajectory_points,
)
from mmh_jax.schedules import DDPM

SCHEDULE = DDPM.scaled_linear()
GUIDANCE = 7.5


def _gaussian_eps(x, t, context):
    """eps(x, t, c) = sigma(t) (1 + m_c) x with m_c the embedding's mean: the noise predictor of
    a model whose score is -(1 + m_c) x."""
    m = jnp.mean(context, axis=(1, 2)).reshape(-1, 1, 1, 1)
    return SCHEDULE.sigma(t).reshape(-1, 1, 1, 1) * (1 + m) * x


def _toy_eps(params, x, t, context):
    """A small cross-attention noise predictor, non-linear in x and in the context: a query made
    from x reads the context by softmax attention; its read-out modulates x. Each sample is
    treated on its own; the network compiles in a second (the tiny UNet's gradients take a
    minute)."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    query = jnp.tanh(flat @ params["wq"])
    attention = jax.nn.softmax(jnp.einsum("bk,bnk->bn", query, context @ params["wk"]), axis=-1)
    read = jnp.einsum("bn,bnd->bd", attention, context) @ params["wo"]
    return (SCHEDULE.sigma(t)[:, None] * (flat + jnp.tanh(flat * read))).reshape(x.shape)


def _toy():
    """The toy network's parameters, 16 points of a 2 x 2 x 2 event at times in (0, 1], a prompt
    embedding [1, 6, 5] and the empty prompt's."""
    rng = np.random.default_rng(0)
    params = {
        "wq": rng.standard_normal((8, 3)),
        "wk": rng.standard_normal((5, 3)),
        "wo": rng.standard_normal((5, 8)),
    }
    eps_fn = Partial(_toy_eps, jax.tree.map(jnp.asarray, params))
    points = MetricPoints(
        jnp.asarray(rng.standard_normal((16, 2, 2, 2))),
        jnp.asarray(rng.integers(1, 1001, 16) / 1000),
    )
    return eps_fn, points, rng.standard_normal((1, 6, 5)), rng.standard_normal((1, 6, 5))


def test_metrics_equal_their_closed_forms(x64):
    # With eps_c - eps_u = sigma (m_c - m_u) x, eps^CFG = sigma k x (k = 1 + m_u + lambda
    # (m_c - m_u)) and grad eps^CFG = sigma k I, a Rademacher probe gives the exact trace:
    # FLIPD = d - sigma^2 k d + sigma^2 k^2 |x|^2 (Eq. 26).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 3, 3))
    t = np.array([0.01, 0.05, 0.2, 0.5, 1.0])
    m_c, m_u = 0.4, -0.1
    cond, uncond = np.full((1, 4, 3), m_c), np.full((1, 4, 3), m_u)
    points = MetricPoints(jnp.asarray(x), jnp.asarray(t))
    sigma = np.asarray(SCHEDULE.sigma(jnp.asarray(t)))
    size = np.sum(x.reshape(5, -1) ** 2, axis=1)
    k = 1 + m_u + GUIDANCE * (m_c - m_u)
    kwargs = dict(schedule=SCHEDULE, guidance=GUIDANCE, key=jax.random.key(0))
    eps_fn = Partial(_gaussian_eps)
    np.testing.assert_allclose(
        metric_values(eps_fn, points, cond, uncond, metric="cfg", **kwargs),
        sigma**2 * (m_c - m_u) ** 2 * size,
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        metric_values(eps_fn, points, cond, uncond, metric="cfg_score", **kwargs),
        sigma**2 * k**2 * size,
        rtol=1e-5,
    )
    d = x[0].size
    np.testing.assert_allclose(
        metric_values(eps_fn, points, cond, uncond, metric="flipd", **kwargs),
        d - sigma**2 * k * d + sigma**2 * k**2 * size,
        rtol=1e-5,
    )
    # A(c) is the mean, and its gradient w.r.t. the embedding is the closed form's
    grad = jax.grad(prompt_metric, argnums=1)(
        eps_fn, jnp.asarray(cond), uncond, points, metric="cfg", schedule=SCHEDULE
    )
    expected = np.mean(sigma**2 * 2 * (m_c - m_u) * size) / cond.size
    np.testing.assert_allclose(grad, np.full(cond.shape, expected), rtol=1e-5)


@pytest.fixture(scope="module")
def trajectory(sd):
    cond = sd.encode_prompt(["a cat"])
    result = sd.sample(
        cond, key=jax.random.key(1), images_per_prompt=2, num_steps=5, return_trajectory=True
    )
    return cond, result


@pytest.mark.slow
def test_trajectory_points_are_the_sampler_latents(sd, trajectory):
    _, result = trajectory
    points = trajectory_points(result, schedule=sd.schedule, steps=[1, -1])
    np.testing.assert_array_equal(points.latents[:2], result.latents[1])
    np.testing.assert_array_equal(points.latents[2:], result.latents[4])
    steps = np.asarray(result.timesteps)[[1, 1, 4, 4]]
    np.testing.assert_allclose(points.t, (steps + 1) / 1000, rtol=1e-6)
    assert trajectory_points(result, schedule=sd.schedule).latents.shape[0] == 10
    with pytest.raises(ValueError, match="steps"):
        trajectory_points(result, schedule=sd.schedule, steps=[5])


@pytest.mark.slow
def test_flipd_metric_is_lid_flipd_of_the_cfg_score_at_the_noisy_point(sd, trajectory):
    # Eq. 26 at x_t equals FLIPD (Eq. 6) of the guided score at the clean point x_t / psi(t):
    # mmh_jax.lid.flipd evaluates s^CFG through the doubled batch of both branches, with the
    # same probes (key per point), so the trace must cover both branches here too.
    cond, result = trajectory
    points = trajectory_points(result, schedule=sd.schedule, steps=[2, 3, 4])
    key = jax.random.key(7)
    ours = metric_values(
        sd.eps,
        points,
        cond,
        sd.uncond_embedding,
        metric="flipd",
        schedule=sd.schedule,
        guidance=GUIDANCE,
        key=key,
    )
    score = cfg_score_fn(sd.eps, cond, sd.uncond_embedding, schedule=sd.schedule, guidance=GUIDANCE)
    psi = sd.schedule.psi(points.t).reshape(-1, 1, 1, 1)
    truth = flipd(score, points.latents / psi, t0=points.t, schedule=sd.schedule, key=key)
    np.testing.assert_allclose(ours, truth, rtol=1e-4, atol=1e-3)
    # the unconditional branch's trace matters: guidance 1 is the conditional model alone
    cond_only = metric_values(
        sd.eps,
        points,
        cond,
        sd.uncond_embedding,
        metric="flipd",
        schedule=sd.schedule,
        guidance=1.0,
        key=key,
    )
    assert np.abs(np.asarray(cond_only) - np.asarray(ours)).min() > 1e-2


def _check_gradient(f, cond, uncond, rtol):
    """f's gradient w.r.t. cond against central differences, along the gradient itself (where
    the directional derivative is |grad|) and along a random direction; none w.r.t. uncond."""
    grad_c, grad_u = jax.grad(f, argnums=(0, 1))(cond, uncond)
    assert np.all(np.asarray(grad_u) == 0)  # nothing flows into the empty prompt's embedding
    norm = float(jnp.linalg.norm(grad_c))
    assert norm > 1e-6
    random = np.random.default_rng(0).standard_normal(cond.shape).astype(cond.dtype)
    h = 0.1 if cond.dtype == np.float32 else 1e-4
    for direction in (np.asarray(grad_c) / norm, random / np.linalg.norm(random)):
        fd = (f(cond + h * direction, uncond) - f(cond - h * direction, uncond)) / (2 * h)
        analytic = float(jnp.sum(grad_c * direction))
        assert abs(fd - analytic) <= rtol * norm, (fd, analytic, norm)


@pytest.mark.parametrize("metric", ["cfg", "cfg_score", "flipd"])
@pytest.mark.slow
def test_gradients_match_finite_differences(metric, x64):
    eps_fn, points, cond, uncond = _toy()
    kwargs = dict(metric=metric, schedule=SCHEDULE, key=jax.random.key(3))
    f = jax.jit(lambda c, u: prompt_metric(eps_fn, c, u, points, **kwargs))
    _check_gradient(f, jnp.asarray(cond), jnp.asarray(uncond), 1e-6)


def test_token_attributions_average_per_point_gradient_norms(x64):
    eps_fn, points, cond, uncond = _toy()
    kwargs = dict(metric="flipd", schedule=SCHEDULE, key=jax.random.key(4))
    attr = token_attributions(eps_fn, cond, uncond, points, **kwargs)
    keys = jax.random.split(jax.random.key(4), 16)  # one key per point, as metric_values splits
    norms, values = [], []
    for i in range(16):
        one = MetricPoints(points.latents[i : i + 1], points.t[i : i + 1])
        v, g = jax.value_and_grad(prompt_metric, argnums=1)(
            eps_fn, jnp.asarray(cond), uncond, one, **{**kwargs, "key": keys[i : i + 1]}
        )
        norms.append(np.linalg.norm(np.asarray(g)[0], axis=-1))
        values.append(float(v))
    np.testing.assert_allclose(attr.scores, np.mean(norms, axis=0), rtol=1e-10)
    np.testing.assert_allclose(attr.value, np.mean(values), rtol=1e-10)
    assert np.ptp(np.asarray(attr.scores)) > 1e-3  # positions differ: the check has teeth


def _weighted_context_eps(eps_fn, weights, x, t, context):
    return eps_fn(x, t, context * weights)


@pytest.mark.slow
def test_a_planted_token_gets_the_largest_attribution(sd, trajectory):
    # The tiny UNet sees position 3 at full strength and every other position at 2%: that token
    # alone drives the conditional output, so it must get the largest attribution.
    cond, result = trajectory
    weights = np.full((1, cond.shape[1], 1), 0.02, np.float32)
    weights[0, 3] = 1.0
    eps_fn = Partial(_weighted_context_eps, sd.eps, jnp.asarray(weights))
    points = trajectory_points(result, schedule=sd.schedule, steps=[2, 4])
    attr = token_attributions(
        eps_fn, cond, sd.uncond_embedding, points, metric="cfg_score", schedule=sd.schedule
    )
    scores = np.asarray(attr.scores)
    assert np.argmax(scores) == 3
    assert scores[3] > 5 * np.delete(scores, 3).max()


def test_noised_points_draw_grid_times_and_the_forward_marginal(x64):
    z0 = np.random.default_rng(0).standard_normal((4, 2, 2, 2))
    points = noised_points(
        z0, schedule=SCHEDULE, key=jax.random.key(0), times_per_latent=2000, t_range=(0.0, 0.2)
    )
    t = np.asarray(points.t)
    steps = t * 1000
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert steps.min() == 1 and steps.max() == 200  # every grid time in (0, 0.2] can be drawn
    x0 = np.repeat(z0, 2000, axis=0)
    psi = np.asarray(SCHEDULE.psi(points.t)).reshape(-1, 1, 1, 1)
    sigma = np.asarray(SCHEDULE.sigma(points.t)).reshape(-1, 1, 1, 1)
    noise = (np.asarray(points.latents) - psi * x0) / sigma
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    with pytest.raises(ValueError, match="t_range"):
        noised_points(z0, schedule=SCHEDULE, key=jax.random.key(0), t_range=(0.2, 0.2001))


def test_embedding_optimisation_lowers_the_cfg_metric_and_stops_at_the_target(x64):
    x = np.random.default_rng(1).standard_normal((3, 2, 2, 2))
    points = MetricPoints(jnp.asarray(x), jnp.full((3,), 0.5))
    cond = np.random.default_rng(2).uniform(0.5, 1.5, (1, 4, 3))
    uncond = np.zeros((1, 4, 3))
    eps_fn = Partial(_gaussian_eps)
    kwargs = dict(metric="cfg", schedule=SCHEDULE, learning_rate=0.05)
    out = optimize_embedding(eps_fn, cond, uncond, points, num_steps=20, **kwargs)
    values = np.asarray(out.values)
    assert out.steps_taken == 20 and values.shape == (21,)
    assert values[-1] < 0.5 * values[0]
    np.testing.assert_array_equal(out.embedding[0, 0], cond[0, 0])  # the start token is kept
    stopped = optimize_embedding(
        eps_fn, cond, uncond, points, num_steps=20, target=0.8 * values[0], **kwargs
    )
    assert stopped.steps_taken < 20 and stopped.values[-1] <= 0.8 * values[0]
    assert np.all(np.asarray(stopped.values[:-1]) > 0.8 * values[0])


def test_traced_embedding_optimisation_under_jit_is_adamw_on_the_metric(x64):
    import optax

    x = np.random.default_rng(1).standard_normal((3, 2, 2, 2))
    points = MetricPoints(jnp.asarray(x), jnp.full((3,), 0.5))
    cond = jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, (1, 4, 3)))
    uncond = jnp.zeros((1, 4, 3))
    eps_fn = Partial(_gaussian_eps)
    kwargs = dict(metric="cfg", schedule=SCHEDULE)

    def loss(c):
        return jnp.mean(metric_values(eps_fn, points, c, uncond, **kwargs))

    # the reference: a plain optax loop, the start token's row masked out
    optimizer = optax.adamw(0.05, weight_decay=0.01)
    mask = jnp.ones((1, 4, 1)).at[0, 0].set(0)
    c, state, values = cond, optimizer.init(cond), []
    for _ in range(6):
        value, grad = jax.value_and_grad(loss)(c)
        values.append(float(value))
        updates, state = optimizer.update(grad * mask, state, c)
        c = optax.apply_updates(c, updates * mask)
    values.append(float(loss(c)))

    @jax.jit
    def run(cond, learning_rate, target):
        return optimize_embedding_traced(
            eps_fn,
            cond,
            uncond,
            points,
            num_steps=6,
            learning_rate=learning_rate,
            target=target,
            **kwargs,
        )

    out = run(cond, 0.05, -1.0)  # a target the CFG norm never reaches
    assert int(out.steps_taken) == 6
    np.testing.assert_allclose(out.values, values, rtol=1e-6)  # values are kept in float32
    np.testing.assert_allclose(out.embedding, c, rtol=1e-10)
    # stops before the update that would follow the first value at or below the target
    target = (values[2] + values[3]) / 2
    stopped = run(cond, 0.05, target)
    assert int(stopped.steps_taken) == 3
    np.testing.assert_allclose(stopped.values[:4], values[:4], rtol=1e-6)
    assert np.isnan(stopped.values[4:]).all()
    public = optimize_embedding(
        eps_fn, cond, uncond, points, num_steps=6, learning_rate=0.05, target=target, **kwargs
    )
    assert public.steps_taken == 3
    np.testing.assert_allclose(public.embedding, stopped.embedding, rtol=1e-12)


def test_embedding_optimisation_raises_flipd(x64):
    eps_fn, points, cond, uncond = _toy()
    out = optimize_embedding(
        eps_fn,
        cond,
        uncond,
        points,
        metric="flipd",
        schedule=SCHEDULE,
        num_steps=10,
        learning_rate=0.05,
        key=jax.random.key(0),
    )
    assert out.steps_taken == 10 and out.values[-1] > out.values[0]
    np.testing.assert_array_equal(out.embedding[0, 0], cond[0, 0])


@pytest.mark.slow
def test_bad_arguments_name_themselves(sd, trajectory):
    cond, result = trajectory
    points = trajectory_points(result, schedule=sd.schedule, steps=[4])
    common = dict(schedule=sd.schedule)
    with pytest.raises(ValueError, match="metric"):
        metric_values(sd.eps, points, cond, sd.uncond_embedding, metric="clip", **common)
    with pytest.raises(ValueError, match="key"):
        metric_values(sd.eps, points, cond, sd.uncond_embedding, metric="flipd", **common)
    with pytest.raises(ValueError, match="cond"):
        token_attributions(
            sd.eps,
            jnp.concatenate([cond, cond]),
            sd.uncond_embedding,
            points,
            metric="cfg",
            **common,
        )
    with pytest.raises(ValueError, match="points.t"):
        metric_values(
            sd.eps,
            MetricPoints(points.latents, points.t[:1].repeat(3)),
            cond,
            sd.uncond_embedding,
            metric="cfg",
            **common,
        )
