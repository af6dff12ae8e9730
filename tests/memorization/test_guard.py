"""The guarded sampler (mmh_jax.memorization.guard) on the tiny random Stable Diffusion pipeline
(tests/conftest.py's ``sd``): its sample is ddim_sample's, its signals are the after-the-fact
metrics computed independently (the trajectory's CFG norms; mmh_jax.lid.flipd of the CFG score),
the conformal threshold holds its false-positive rate on held-out prompts, and guarded_generate
resamples flagged prompts with a mitigation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax._src.checks import per_sample_keys
from mmh_jax.guidance import cfg_score_fn
from mmh_jax.lid import flipd
from mmh_jax.memorization.guard import (
    calibrate_threshold,
    flag,
    guarded_ddim_sample,
    guarded_generate,
    step_probe_keys,
)
from mmh_jax.sampling import ddim_sample

STEPS, K, G = 4, 2, 7.5  # DDIM steps, FLIPD steps, guidance


@pytest.fixture(scope="module")
def setting(sd):
    cond = sd.encode_prompt(["a cat", "the fox"])
    noise = jax.random.normal(jax.random.key(3), (2,) + sd.latent_shape)
    kwargs = dict(schedule=sd.schedule, guidance=G, num_steps=STEPS, grid=sd.ddim_grid)
    ref = ddim_sample(sd.eps, noise, cond, sd.uncond_embedding, return_trajectory=True, **kwargs)
    return cond, noise, kwargs, ref


@pytest.mark.slow
def test_cfg_norm_sample_and_signal_are_the_trajectorys(sd, setting):
    cond, noise, kwargs, ref = setting
    # (without the trajectory: the program guarded_generate's test runs too)
    out = guarded_ddim_sample(sd.eps, noise, cond, sd.uncond_embedding, signal="cfg_norm", **kwargs)
    np.testing.assert_array_equal(out.sample, ref.sample)  # the same step, bit for bit
    np.testing.assert_array_equal(out.timesteps, ref.timesteps)
    assert out.flipd is None and out.latents is None
    diff = np.asarray(ref.eps_cond, np.float64) - np.asarray(ref.eps_uncond, np.float64)
    norms = np.linalg.norm(diff.reshape(STEPS, 2, -1), axis=-1)
    np.testing.assert_allclose(out.cfg_norms, norms, rtol=1e-5)
    np.testing.assert_allclose(out.signal, norms.mean(0), rtol=1e-5)
    late = guarded_ddim_sample(
        sd.eps, noise, cond, sd.uncond_embedding, signal="cfg_norm", norm_steps=(1, 3), **kwargs
    )
    np.testing.assert_allclose(late.signal, norms[1:3].mean(0), rtol=1e-5)
    np.testing.assert_array_equal(late.sample, ref.sample)


@pytest.mark.slow
def test_flipd_sample_is_ddim_and_signal_is_flipd_of_the_cfg_score(sd, setting):
    cond, noise, kwargs, ref = setting
    # one key per image (then an image's signal does not depend on its batch); the program
    # guarded_generate's FLIPD test runs too
    keys = jax.random.split(jax.random.key(11), 2)
    out = guarded_ddim_sample(
        sd.eps, noise, cond, sd.uncond_embedding, signal="flipd", signal_steps=K, key=keys, **kwargs
    )
    # the jvp's primal is the forward pass's eps: the same sample up to float rounding
    np.testing.assert_allclose(out.sample, ref.sample, rtol=1e-5, atol=1e-5)
    assert out.flipd.shape == (K, 2)
    # The truth: FLIPD (Eq. 6) of s^CFG at the clean point x_t / psi(t), which evaluates the
    # score at x_t (paper, Eqs. 14, 26), through mmh_jax.lid.flipd; the probe of FLIPD step j
    # is flipd's draw from the per-image keys fold_in(keys[i], j).
    score = cfg_score_fn(sd.eps, cond, sd.uncond_embedding, schedule=sd.schedule, guidance=G)
    T = sd.schedule.num_timesteps
    truth = []
    for j in range(K):
        i = STEPS - K + j
        t = jnp.full((2,), (int(ref.timesteps[i]) + 1) / T)
        x = ref.latents[i] / sd.schedule.psi(t)[:, None, None, None]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, j)
        truth.append(flipd(score, x, t0=t, schedule=sd.schedule, key=step_keys))
        if j == 0:  # the probe matters: another draw gives another number
            other = flipd(
                score, x, t0=t, schedule=sd.schedule, key=jax.random.split(jax.random.key(99), 2)
            )
    truth = np.asarray(truth)
    np.testing.assert_allclose(out.flipd, truth, rtol=2e-4)
    assert np.abs(np.asarray(other) - truth[0]).min() > 20 * np.abs(out.flipd[0] - truth[0]).max()
    np.testing.assert_allclose(out.signal, truth.mean(0), rtol=2e-4)
    # the CFG norms come for free on the jvp steps too
    diff = np.asarray(ref.eps_cond, np.float64) - np.asarray(ref.eps_uncond, np.float64)
    np.testing.assert_allclose(
        out.cfg_norms, np.linalg.norm(diff.reshape(STEPS, 2, -1), axis=-1), rtol=1e-4
    )


@pytest.mark.slow
def test_sampler_errors_name_the_argument(sd, setting):
    cond, noise, kwargs, _ = setting
    args = (sd.eps, noise, cond, sd.uncond_embedding)
    with pytest.raises(ValueError, match="signal must"):
        guarded_ddim_sample(*args, signal="lid", **kwargs)
    with pytest.raises(ValueError, match="key is required"):
        guarded_ddim_sample(*args, signal="flipd", signal_steps=K, **kwargs)
    with pytest.raises(ValueError, match="signal_steps"):
        guarded_ddim_sample(
            *args, signal="flipd", signal_steps=STEPS + 1, key=jax.random.key(0), **kwargs
        )
    with pytest.raises(ValueError, match="signal_steps"):
        guarded_ddim_sample(*args, signal="flipd", signal_steps=0, key=jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="norm_steps"):
        guarded_ddim_sample(*args, norm_steps=(3, 3), **kwargs)
    with pytest.raises(ValueError, match="norm_steps"):
        guarded_ddim_sample(*args, norm_steps=(0, STEPS + 1), **kwargs)
    with pytest.raises(ValueError, match="key must"):
        guarded_ddim_sample(
            *args,
            signal="flipd",
            signal_steps=K,
            key=jax.random.split(jax.random.key(0), 3),
            **kwargs,
        )
    # one key: FLIPD step j's probes are those flipd draws from key fold_in(key, j)
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        jax.random.key_data(step_probe_keys(key, 1, 2)),
        jax.random.key_data(per_sample_keys(jax.random.fold_in(key, 1), 2)),
    )
    with pytest.raises(ValueError, match="noise"):
        guarded_ddim_sample(sd.eps, noise[0, 0, 0], cond, sd.uncond_embedding, **kwargs)


def _random_prompt_ids(rng, n, vocab=66, max_words=8, length=77):
    """Token ids of random prompts from the tiny tokenizer's vocabulary (ids 2..65: letters,
    word-final letters, 'ca', 'cat', 'th', 'the'): start token, 1-8 tokens, end token, padding."""
    ids = np.ones((n, length), np.int32)  # <|endoftext|> pads
    ids[:, 0] = 0
    for row, k in zip(ids, rng.integers(1, max_words + 1, n)):
        row[1 : 1 + k] = rng.integers(2, vocab, k)
    return ids


@pytest.fixture(scope="module")
def calibration_run(sd):
    """Signals of 200 calibration + 200 held-out random (non-memorized) prompts, one image each
    (own noise), all in one sampler call: 2 DDIM steps, FLIPD at the last; the CFG-norm signal
    is the mean of the same run's cfg_norms (the cfg_norm sampler's, by the tests above)."""
    n = 400
    rng = np.random.default_rng(0)
    cond = sd.encode_prompt(_random_prompt_ids(rng, n))
    noise = jax.random.normal(jax.random.key(1), (n,) + sd.latent_shape)
    out = guarded_ddim_sample(
        sd.eps,
        noise,
        cond,
        sd.uncond_embedding,
        schedule=sd.schedule,
        num_steps=2,
        signal="flipd",
        signal_steps=1,
        key=jax.random.key(2),
        grid=sd.ddim_grid,
    )
    return {"flipd": np.asarray(out.signal), "cfg_norm": np.asarray(out.cfg_norms).mean(0)}


@pytest.mark.slow
@pytest.mark.parametrize("signal", ["cfg_norm", "flipd"])
def test_false_positive_rate_on_held_out_prompts_matches_the_target(calibration_run, signal):
    # the conformal threshold at target 0.1 flags about 10% of the held-out prompts
    n, target = 200, 0.1
    signals = calibration_run[signal]
    assert np.all(np.isfinite(signals)) and np.unique(signals).size == 2 * n
    higher = signal == "cfg_norm"
    threshold = calibrate_threshold(signals[:n], target_fpr=target, higher_is_memorized=higher)
    m = math.floor(target * (n + 1))
    assert flag(signals[:n], threshold=threshold, higher_is_memorized=higher).sum() == m - 1
    fpr = flag(signals[n:], threshold=threshold, higher_is_memorized=higher).mean()
    # held-out rate: Beta(m, n + 1 - m) given the calibration set, then binomial over n
    # held-out prompts: standard deviation about sqrt(p (1 - p) (1/n + 1/n)); a 3-sigma band
    sd_rate = math.sqrt(target * (1 - target) * 2 / n)
    assert abs(fpr - m / (n + 1)) < 3 * sd_rate, (fpr, threshold)


def test_calibrate_threshold_is_the_conformal_order_statistic():
    rng = np.random.default_rng(0)
    s = rng.standard_normal(57)
    m = math.floor(0.1 * 58)  # 5
    hi = calibrate_threshold(s, target_fpr=0.1, higher_is_memorized=True)
    lo = calibrate_threshold(s, target_fpr=0.1, higher_is_memorized=False)
    assert hi == np.sort(s)[57 - m] and lo == np.sort(s)[m - 1]
    assert flag(s, threshold=hi, higher_is_memorized=True).sum() == m - 1
    assert flag(s, threshold=lo, higher_is_memorized=False).sum() == m - 1
    np.testing.assert_array_equal(flag(s, threshold=hi, higher_is_memorized=True), s > hi)
    # the guarantee: over calibration and test draws the flagged rate is m / (n + 1) exactly
    n, trials = 19, 40_000  # target 0.1: m = 2, rate 2 / 20 = 0.1
    cal = rng.random((trials, n))
    test = rng.random(trials)
    thr = np.sort(cal, axis=1)[:, n - 2]
    assert abs(np.mean(test > thr) - 0.1) < 4 * math.sqrt(0.09 / trials)
    assert calibrate_threshold(cal[0], target_fpr=0.1, higher_is_memorized=True) == thr[0]
    # the smallest set for a target: 9 signals at 0.1 (m = floor(0.1 * 10) = 1)
    assert calibrate_threshold(s[:9], target_fpr=0.1, higher_is_memorized=True) == s[:9].max()


@pytest.mark.parametrize(
    "signals, target, match",
    [
        ([], 0.1, "non-empty"),
        ([1.0, np.nan, 2.0], 0.5, "non-finite"),
        ([[1.0, 2.0]], 0.5, "1-D"),
        ([1.0, 2.0], 0.0, "target_fpr"),
        ([1.0, 2.0], 1.0, "target_fpr"),
        ([1.0, 2.0], True, "target_fpr"),
        (list(range(8)), 0.1, "at least 9"),
    ],
)
def test_calibrate_threshold_errors(signals, target, match):
    with pytest.raises(ValueError, match=match):
        calibrate_threshold(signals, target_fpr=target, higher_is_memorized=True)


def test_flag_errors():
    with pytest.raises(ValueError, match="threshold"):
        flag([1.0], threshold=float("nan"), higher_is_memorized=True)
    with pytest.raises(ValueError, match="non-finite"):
        flag([1.0, np.inf], threshold=0.0, higher_is_memorized=False)


@pytest.mark.slow
def test_guarded_generate_resamples_flagged_prompts(sd):
    prompts = ["a cat", "the fox", "a b c", "the cat sat", "x y z"]
    key, kwargs = jax.random.key(4), dict(num_steps=STEPS, batch_size=2)
    first = guarded_generate(sd, prompts, key=key, threshold=1e9, **kwargs)
    assert not first.flagged.any() and first.outcomes[0].final_prompt == "a cat"
    signals = np.array([o.signal for o in first.outcomes])
    # the images of StableDiffusion.sample with this key
    for lo in (0, 2):
        plain = sd.sample(sd.encode_prompt(prompts[lo : lo + 2]), key=key, num_steps=STEPS)
        np.testing.assert_allclose(first.latents[lo : lo + 2], plain.sample, rtol=1e-6, atol=1e-6)
    order = np.sort(signals)
    threshold = float(order[1] + order[2]) / 2  # the three highest are flagged
    flagged = signals > threshold
    failing = prompts[int(np.argmax(signals))]

    def mitigate(prompt):
        if prompt == failing:
            raise RuntimeError("rephraser down")
        return prompt + " the"

    report = guarded_generate(
        sd, prompts, key=key, threshold=threshold, mitigate=mitigate, **kwargs
    )
    np.testing.assert_array_equal(report.flagged, flagged)
    np.testing.assert_allclose([o.signal for o in report.outcomes], signals, rtol=1e-6)
    np.testing.assert_allclose(report.initial_latents, first.latents, rtol=1e-6, atol=1e-6)
    assert report.signal == "cfg_norm" and report.higher_is_memorized
    resampled = [o for o in report.outcomes if o.resampled]
    assert len(resampled) == 2
    again = sd.sample(
        sd.encode_prompt([o.final_prompt for o in resampled]), key=key, num_steps=STEPS
    )
    for i, o in enumerate(report.outcomes):
        rows = slice(i, i + 1)
        if o.prompt == failing:
            assert o.flagged and not o.resampled and o.final_prompt == o.prompt
            assert "RuntimeError: rephraser down" in o.error
            assert o.final_signal == o.signal and o.final_flagged
        elif o.flagged:
            assert o.resampled and o.final_prompt == o.prompt + " the" and o.error is None
            j = resampled.index(o)
            np.testing.assert_allclose(
                report.latents[rows], again.sample[j : j + 1], rtol=1e-5, atol=1e-5
            )
            assert o.final_flagged == (o.final_signal > threshold)
        else:
            assert not o.resampled and o.error is None and o.final_prompt == o.prompt
        if not o.resampled:
            np.testing.assert_array_equal(report.latents[rows], report.initial_latents[rows])


@pytest.mark.slow
def test_guarded_generate_with_flipd_and_bad_input(sd):
    prompts = ["a cat", "the fox", "a b c"]
    kwargs = dict(
        signal="flipd",
        num_steps=STEPS,
        signal_steps=K,
        images_per_prompt=2,
        batch_size=1,
        mitigate=lambda p: 3,
    )
    report = guarded_generate(sd, prompts, key=jax.random.key(0), threshold=-1e9, **kwargs)
    assert not report.higher_is_memorized and not report.flagged.any()  # low = memorized
    assert report.latents.shape == (6,) + sd.latent_shape
    assert all(o.error is None and not o.resampled for o in report.outcomes)
    flagged = guarded_generate(sd, prompts, key=jax.random.key(0), threshold=1e9, **kwargs)
    assert flagged.flagged.all()
    assert all("not a string" in o.error and o.final_prompt == o.prompt for o in flagged.outcomes)
    for bad, match in [
        (dict(prompts=[]), "empty"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(signal="x"), "signal"),
        (dict(images_per_prompt=0), "images"),
        (dict(batch_size=0), "batch_size"),
    ]:
        kw = dict(prompts=prompts, key=jax.random.key(0), threshold=0.0, num_steps=4) | bad
        with pytest.raises(ValueError, match=match):
            guarded_generate(sd, **kw)
