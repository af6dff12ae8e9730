"""A guarded sampler: DDIM with classifier-free guidance that measures memorization while it
samples, flags a generation whose signal crosses a calibrated threshold and, if asked, samples
the flagged prompt again with a mitigated prompt.

The memorization detectors of :mod:`mmh_jax.memorization.conditional` (and the paper's,
Appendix D.2) run after the fact, on a finished trajectory or a finished image. Here the signal
comes out of the sampler's own network evaluations:

* ``"cfg_norm"`` (Wen et al. 2023; paper Eq. 15/24 up to the square and the constant
  ``lambda^-2``): per image the mean over DDIM steps of ``||eps(x_t, c) - eps(x_t, 0)||`` over
  the whole latent, in noise units, not scaled by the guidance. Both predictions are the ones the
  step computes anyway, so the signal is free. **High** = memorized.
* ``"flipd"`` (paper Eqs. 14, 26, 28): at the last ``signal_steps`` DDIM steps, FLIPD of the
  CFG-adjusted score at the current noisy latent. In DDIM's coordinates ``x~ = x_t / psi(t)``
  (Eqs. 11-13) ``sigma~^2 tr grad s~ = sigma^2 tr grad s`` and ``sigma~^2 ||s~||^2 =
  sigma^2 ||s||^2``, so with ``s^CFG = -eps^CFG / sigma(t)`` (Eq. 10)

      FLIPD~^CFG(x~_t; t, c) = d - sigma(t) tr(d eps^CFG / d x_t) + ||eps^CFG(x_t)||^2,

  the trace estimated with one Rademacher probe ``v`` (Hutchinson, ``<v, J v>``). The pair
  ``(eps^CFG, J v)`` is one ``jax.jvp`` of the guided noise through both CFG branches (both
  depend on ``x_t``), and its primal is the ``eps^CFG`` the DDIM update uses: such a step costs
  one ``jvp`` instead of one forward pass. **Low** = memorized.

The step loop is two ``lax.scan``s, the plain steps then the ``jvp`` steps, on the grid and with
the update of :func:`mmh_jax.sampling.ddim_sample`: the sample is that sampler's.

:func:`calibrate_threshold` picks the threshold from signals of prompts known not to be
memorized so that a chosen fraction of new non-memorized prompts is flagged (the conformal rule,
below); :func:`flag` applies it; :func:`guarded_generate` does all of it for a list of prompts
on a Stable Diffusion pipeline and reports per prompt. Nothing here times itself: the sampler's
cost against plain DDIM is measured by ``benchmarks/bench_guarded.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from mmh_jax._src.batching import spans
from mmh_jax._src.checks import check_option
from mmh_jax._src.ddim import ddim_alphas, ddim_update
from mmh_jax._src.noise import images_noise
from mmh_jax.guidance import eps_pair
from mmh_jax.lid.flipd import hutchinson_probe
from mmh_jax.memorization.signals import memorized_when_high
from mmh_jax.sampling import DDIMGrid
from mmh_jax.schedules import DDPM
from mmh_jax.types import CondEpsFn

if TYPE_CHECKING:  # only for annotations: guarded_generate duck-types the pipeline
    from mmh_jax.models.stable_diffusion import StableDiffusion

__all__ = [
    "Signal",
    "GuardedSample",
    "guarded_ddim_sample",
    "step_probe_keys",
    "calibrate_threshold",
    "flag",
    "PromptOutcome",
    "GuardReport",
    "guarded_generate",
]

Signal = Literal["cfg_norm", "flipd"]
"""The guarded sampler's memorization signal: the CFG norm of its own DDIM steps (``"cfg_norm"``,
high when memorized) or FLIPD of its last steps (``"flipd"``, low when memorized)."""


class GuardedSample(NamedTuple):
    """What :func:`guarded_ddim_sample` returns (``n`` DDIM steps, batch ``b``, ``k`` FLIPD
    steps)."""

    sample: Float[Array, "b *event"]
    """The final (clean) sample: :func:`~mmh_jax.sampling.ddim_sample`'s."""
    signal: Float[Array, " b"]
    """The memorization signal per image (float32): the mean CFG norm over the chosen steps
    (``"cfg_norm"``), or the mean FLIPD over the last ``k`` steps (``"flipd"``)."""
    timesteps: Int[Array, " n"]
    """The 0-based network timesteps visited."""
    cfg_norms: Float[Array, "n b"]
    """``||eps_c - eps_u||`` at every step (free whatever the signal)."""
    flipd: Float[Array, "k b"] | None = None
    """FLIPD at each of the last ``k`` steps (``"flipd"`` only), in step order."""
    latents: Float[Array, "n b *event"] | None = None
    """``x_t`` at each step, before the step's update (``return_trajectory``)."""
    eps_uncond: Float[Array, "n b *event"] | None = None
    """The unconditional noise prediction at each step (``return_trajectory``)."""
    eps_cond: Float[Array, "n b *event"] | None = None
    """The conditional noise prediction at each step (``return_trajectory``)."""


def _norms(x: Array) -> Array:
    """Per-sample L2 norm over the event, in float32."""
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)), axis=-1))


def _as_keys(key, b: int) -> Array:
    """A typed PRNG key, scalar or ``[b]``; else a ValueError naming ``key``."""
    if key is None:
        raise ValueError(
            "key is required for signal='flipd' (the Hutchinson probes): pass "
            "key=jax.random.key(seed)"
        )
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
            raise ValueError(f"key must be a JAX PRNG key (jax.random.key), got dtype {key.dtype}")
        key = jax.random.wrap_key_data(key)
    if key.shape not in ((), (b,)):
        raise ValueError(f"key must be one PRNG key or one per image ({b}), got shape {key.shape}")
    return key


def step_probe_keys(key: Array, j: int | Array, b: int) -> Array:
    """The key :func:`mmh_jax.lid.flipd` would be given to draw the probes of FLIPD step ``j``
    (0-based among the FLIPD steps): ``fold_in(key, j)`` for one key (``flipd`` splits it into
    ``b``), ``fold_in(key_i, j)`` per image for ``[b]`` keys. Returns ``[b]`` per-image keys,
    the probe of image ``i`` being ``rademacher(fold_in(keys[i], 0), event_shape)`` as in
    ``flipd``."""
    if key.shape == ():
        return jax.random.split(jax.random.fold_in(key, j), b)
    return jax.vmap(lambda k: jax.random.fold_in(k, j))(key)


def guarded_ddim_sample(
    eps_fn: CondEpsFn,
    noise: Float[ArrayLike, "b *event"],
    cond: Array,
    uncond: Array,
    *,
    schedule: DDPM,
    guidance: float | ArrayLike = 7.5,
    num_steps: int = 50,
    grid: DDIMGrid = DDIMGrid(),
    signal: Signal = "cfg_norm",
    signal_steps: int = 5,
    norm_steps: tuple[int, int] | None = None,
    key: Array | None = None,
    return_trajectory: bool = False,
) -> GuardedSample:
    """DDIM (eta = 0) with classifier-free guidance that computes a memorization signal on the
    fly from its own network evaluations.

    The grid, the guided noise ``eps_u + guidance (eps_c - eps_u)`` (paper, Eq. 2) and the update
    are :func:`~mmh_jax.sampling.ddim_sample`'s (Appendix D.1); so is the sample.

    * ``"cfg_norm"``: per image the mean over the steps ``norm_steps`` of
      ``||eps_c - eps_u||`` over the whole latent (Wen et al.; paper Eq. 15/24 up to the square
      and ``lambda^-2``); no extra network work. High = memorized.
    * ``"flipd"``: per image the mean over the last ``signal_steps`` steps of
      ``FLIPD~^CFG(x~_t; t, c) = d - sigma(t) <v, J v> + ||eps^CFG||^2`` (paper, Eqs. 14, 26 and
      28 with ``s = -eps / sigma``, Eq. 10; ``J`` the Jacobian of ``eps^CFG`` in ``x_t``, both
      branches, ``v`` one Rademacher probe), which is :func:`mmh_jax.lid.flipd` of
      :func:`~mmh_jax.guidance.cfg_score_fn` at the clean point ``x_t / psi(t)``, time
      ``t = (timestep + 1) / T``. Those steps run one ``jax.jvp`` of the guided noise instead of
      one forward pass; its primal drives the update. Low = memorized. The probe of FLIPD step
      ``j`` (0-based among the ``signal_steps``) is the one ``flipd(..., key=fold_in(key, j))``
      draws (:func:`step_probe_keys`).

    Args:
        eps_fn: ``eps_fn(x_t, t, context)``, continuous ``t = (timestep + 1) / T`` (best a
            :class:`~jax.tree_util.Partial` over the network's parameters).
        noise: the starting latents ``x_T`` (standard normal), ``[b, *event]``.
        cond: prompt embeddings, batch 1 or ``b``.
        uncond: unconditional embeddings, batch 1 or ``b``.
        schedule: the model's DDPM schedule.
        guidance: the guidance scale (traced: a new value does not recompile).
        num_steps: number of DDIM steps.
        grid: the model's DDIM timestep grid (:class:`~mmh_jax.sampling.DDIMGrid`).
        signal: ``"cfg_norm"`` or ``"flipd"``.
        signal_steps: ``"flipd"``: how many of the last steps carry FLIPD (1..``num_steps``);
            ignored for ``"cfg_norm"``.
        norm_steps: ``"cfg_norm"``: the half-open range ``(start, stop)`` of step indices
            (0 = the first, noisiest step) the norms are averaged over, as Wen et al. average
            over a chosen range of steps; all steps by default. (``cfg_norms`` holds every step.)
        key: PRNG key of the Hutchinson probes (``"flipd"``; one key, or one per image so that
            an image's signal does not depend on its batch).
        return_trajectory: also return the latents and both noise predictions of every step.

    Returns:
        :class:`GuardedSample`.
    """
    noise = jnp.asarray(noise)
    if noise.ndim < 2 or noise.shape[0] == 0 or not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(
            f"noise must be a floating array [b, *event] with b >= 1, got "
            f"{noise.dtype} {noise.shape}"
        )
    check_option(signal, "signal", get_args(Signal))
    steps = grid.timesteps(schedule.num_timesteps, num_steps)
    b = noise.shape[0]
    if signal == "flipd":
        if (
            isinstance(signal_steps, bool)
            or not isinstance(signal_steps, (int, np.integer))
            or not 1 <= signal_steps <= num_steps
        ):
            raise ValueError(
                f"signal_steps must be an int in 1..num_steps={num_steps}, got {signal_steps!r}"
            )
        num_flipd, keys = int(signal_steps), _as_keys(key, b)
        window = (num_steps - num_flipd, num_steps)
    else:
        num_flipd, keys = 0, None
        window = _check_range(norm_steps, num_steps)
    return _guarded(
        eps_fn,
        noise,
        jnp.asarray(cond),
        jnp.asarray(uncond),
        jnp.asarray(guidance, noise.dtype),
        jnp.asarray(steps),
        schedule,
        keys,
        jnp.asarray(window),
        num_steps=num_steps,
        num_flipd=num_flipd,
        set_alpha_to_one=grid.set_alpha_to_one,
        return_trajectory=return_trajectory,
    )


def _check_range(norm_steps, num_steps: int) -> tuple[int, int]:
    if norm_steps is None:
        return (0, num_steps)
    try:
        start, stop = (int(i) for i in norm_steps)
    except (TypeError, ValueError):
        raise ValueError(
            f"norm_steps must be a pair (start, stop) of step indices, got {norm_steps!r}"
        ) from None
    if not 0 <= start < stop <= num_steps:
        raise ValueError(
            f"norm_steps must satisfy 0 <= start < stop <= num_steps={num_steps}, "
            f"got {norm_steps!r}"
        )
    return (start, stop)


@functools.partial(
    jax.jit, static_argnames=("num_steps", "num_flipd", "set_alpha_to_one", "return_trajectory")
)
def _guarded(
    eps_fn,
    noise,
    cond,
    uncond,
    guidance,
    steps,
    schedule,
    keys,
    window,
    *,
    num_steps,
    num_flipd,
    set_alpha_to_one,
    return_trajectory,
):
    """The sampler; ``window = [start, stop)`` of the CFG-norm average (traced: a new range does
    not recompile)."""
    T = schedule.num_timesteps
    b, event = noise.shape[0], noise.shape[1:]
    d = math.prod(event)
    a_now, a_next = ddim_alphas(schedule, steps, num_steps, set_alpha_to_one, noise.dtype)

    def times(step):
        return jnp.full((b,), (step + 1) / T, noise.dtype)

    def plain(x, inputs):  # ddim_sample's step, plus the (free) CFG norm
        step, a, a_n = inputs
        eps_u, eps_c = eps_pair(eps_fn, x, times(step), cond, uncond)
        eps = eps_u + guidance * (eps_c - eps_u)
        out = (_norms(eps_c - eps_u),) + ((x, eps_u, eps_c) if return_trajectory else ())
        return ddim_update(x, eps, a, a_n), out

    def with_flipd(x, inputs):  # the same step through one jvp, plus FLIPD at x_t
        step, a, a_n, probe_keys = inputs
        t = times(step)
        v = hutchinson_probe(probe_keys, 0, event_shape=event, dtype=x.dtype)
        (eps_u, eps_c), (jv_u, jv_c) = jax.jvp(
            lambda y: eps_pair(eps_fn, y, t, cond, uncond), (x,), (v,)
        )
        eps = eps_u + guidance * (eps_c - eps_u)
        jv = jv_u + guidance * (jv_c - jv_u)
        vjv = jnp.sum((v * jv).reshape(b, -1), axis=-1)
        lid = d - schedule.sigma(t) * vjv + jnp.sum(jnp.square(eps.reshape(b, -1)), axis=-1)
        out = (_norms(eps_c - eps_u), lid.astype(jnp.float32))
        out += (x, eps_u, eps_c) if return_trajectory else ()
        return ddim_update(x, eps, a, a_n), out

    n_plain = num_steps - num_flipd
    x = noise
    outs = []
    if n_plain:
        x, out = jax.lax.scan(plain, x, (steps[:n_plain], a_now[:n_plain], a_next[:n_plain]))
        outs.append(out)
    flipd = None
    if num_flipd:
        probe_keys = jax.vmap(lambda j: step_probe_keys(keys, j, b))(jnp.arange(num_flipd))
        x, out = jax.lax.scan(
            with_flipd, x, (steps[n_plain:], a_now[n_plain:], a_next[n_plain:], probe_keys)
        )
        flipd, out = out[1], (out[0],) + out[2:]
        outs.append(out)
    cfg_norms, *trajectory = (jnp.concatenate(parts) for parts in zip(*outs))
    if num_flipd:
        signal = jnp.mean(flipd, axis=0)
    else:
        inside = (jnp.arange(num_steps) >= window[0]) & (jnp.arange(num_steps) < window[1])
        total = jnp.sum(jnp.where(inside[:, None], cfg_norms, 0), axis=0)
        signal = total / (window[1] - window[0])
    return GuardedSample(x, signal, steps, cfg_norms, flipd, *trajectory)


# --- thresholds --------------------------------------------------------------------------------


def _signals(signals: ArrayLike, name: str = "signals") -> np.ndarray:
    s = np.asarray(signals, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"{name} holds {int(np.sum(~np.isfinite(s)))} non-finite value(s) (NaN or inf)"
        )
    return s


def calibrate_threshold(
    signals: Float[ArrayLike, " n"], *, target_fpr: float, higher_is_memorized: bool
) -> float:
    """The threshold that flags a fraction ``target_fpr`` of non-memorized prompts.

    ``signals`` are the signals of ``n`` calibration prompts known not to be memorized. The rule
    is the split-conformal one: with ``m = floor(target_fpr (n + 1))`` and ``s_(1) <= ... <=
    s_(n)`` the sorted signals, the threshold is ``s_(n + 1 - m)`` when high is memorized (flag
    ``s > threshold``), ``s_(m)`` otherwise (flag ``s < threshold``). For a new non-memorized
    prompt exchangeable with the calibration ones (and no ties), the probability of being
    flagged, over the calibration draw too, is exactly ``m / (n + 1)``: at most ``target_fpr``
    and more than ``target_fpr - 1 / (n + 1)``. Given one calibration set the held-out rate is
    ``Beta(m, n + 1 - m)``-distributed, with standard deviation about
    ``sqrt(target_fpr (1 - target_fpr) / n)``. (On the calibration set itself ``m - 1`` of the
    ``n`` are flagged.)

    Args:
        signals: ``[n]`` finite signals of non-memorized prompts (one per prompt: average a
            prompt's images first).
        target_fpr: the false-positive rate, in ``(0, 1)``.
        higher_is_memorized: ``True`` for the CFG norm, ``False`` for FLIPD
            (:func:`~mmh_jax.memorization.memorized_when_high`).

    Returns:
        The threshold, a float (one of the calibration signals).

    Raises:
        ValueError: empty or non-finite signals, ``target_fpr`` outside ``(0, 1)``, or fewer
            than ``ceil(1 / target_fpr) - 1`` signals (then ``m = 0``: no threshold flags any
            held-out prompt at that rate).
    """
    s = _signals(signals)
    if (
        not isinstance(target_fpr, (float, int, np.floating))
        or isinstance(target_fpr, bool)
        or not 0 < target_fpr < 1
    ):
        raise ValueError(f"target_fpr must be a number in (0, 1), got {target_fpr!r}")
    n = s.size
    m = math.floor(target_fpr * (n + 1) + 1e-9)  # guard 0.1 * 200 -> 20.099999
    if m < 1:
        need = math.ceil(1 / target_fpr - 1e-9) - 1
        raise ValueError(
            f"signals holds {n} calibration value(s); target_fpr={target_fpr} needs "
            f"at least {need} (conformal rule: floor(target_fpr (n + 1)) >= 1)"
        )
    ordered = np.sort(s)
    return float(ordered[n - m] if higher_is_memorized else ordered[m - 1])


def flag(
    signals: Float[ArrayLike, " n"], *, threshold: float, higher_is_memorized: bool
) -> Bool[np.ndarray, " n"]:
    """``signals > threshold`` (``higher_is_memorized``) or ``signals < threshold``.

    Args:
        signals: ``[n]`` finite signals.
        threshold: from :func:`calibrate_threshold`.
        higher_is_memorized: the signal's direction
            (:func:`~mmh_jax.memorization.memorized_when_high`).

    Returns:
        Boolean ``[n]``: ``True`` = flagged as memorized.
    """
    s = _signals(signals)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return s > threshold if higher_is_memorized else s < threshold


# --- experiment level --------------------------------------------------------------------------


class PromptOutcome(NamedTuple):
    """What :func:`guarded_generate` did with one prompt."""

    prompt: str
    """The prompt as given."""
    signal: float
    """Its signal (mean over its images)."""
    flagged: bool
    """Whether the signal crossed the threshold."""
    final_prompt: str
    """The prompt of the returned images: the mitigated one if it was resampled."""
    resampled: bool
    """Whether the images were drawn again with ``mitigate(prompt)``."""
    final_signal: float
    """The signal of the returned images."""
    final_flagged: bool
    """Whether the returned images are still flagged."""
    error: str | None
    """Why the mitigation failed (the prompt and its images were kept), else ``None``."""


class GuardReport(NamedTuple):
    """What :func:`guarded_generate` returns."""

    outcomes: list[PromptOutcome]
    """One per prompt, in order."""
    latents: Float[np.ndarray, "b c h w"]
    """The returned latents ``[p * images_per_prompt, c, h, w]``, prompt-major (flagged prompts
    that were resampled: the new images)."""
    initial_latents: Float[np.ndarray, "b c h w"]
    """The first pass's latents (before any resampling)."""
    signal: str
    """The signal's name."""
    threshold: float
    """The threshold used."""
    higher_is_memorized: bool
    """The signal's direction."""

    @property
    def flagged(self) -> np.ndarray:
        """``[p]`` booleans: flagged on the first pass."""
        return np.array([o.flagged for o in self.outcomes], bool)


def guarded_generate(
    sd: StableDiffusion,
    prompts: Sequence[str],
    *,
    key: Array,
    threshold: float,
    signal: Signal = "cfg_norm",
    mitigate: Callable[[str], str] | None = None,
    images_per_prompt: int = 1,
    guidance: float = 7.5,
    num_steps: int = 50,
    signal_steps: int = 5,
    norm_steps: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> GuardReport:
    """Sample every prompt with :func:`guarded_ddim_sample`, flag it, and resample the flagged
    ones with ``mitigate(prompt)``.

    Image ``j`` of every prompt starts from ``normal(fold_in(key, j))`` as in
    ``StableDiffusion.sample`` (so a prompt's images and those of its mitigated version share
    their noise, and an image does not depend on its batch); FLIPD's probes of image ``j`` come
    from ``fold_in(split(key)[1], j)``, per image, the same for every prompt and its mitigation.
    A prompt's signal is the mean over its images (as Wen et al. average over generations).

    A ``mitigate`` that raises, or returns something other than a string, leaves the prompt and
    its images as they were; the error is reported in :attr:`PromptOutcome.error` and the run
    goes on. Mitigation runs once: a resampled prompt that is still flagged is reported as such
    (``final_flagged``).

    Args:
        sd: a Stable Diffusion pipeline (:class:`~mmh_jax.models.StableDiffusion`); only
            ``eps``, ``encode_prompt``, ``uncond_embedding``, ``schedule``, ``ddim_grid`` and
            ``latent_shape`` are used.
        prompts: the prompts (non-empty).
        key: PRNG key of the starting noise and the probes.
        threshold: from :func:`calibrate_threshold` on the same signal and settings.
        signal: ``"cfg_norm"`` or ``"flipd"``; its direction is
            :func:`~mmh_jax.memorization.memorized_when_high`.
        mitigate: ``prompt -> new prompt`` for flagged prompts (e.g. a rephraser); ``None``:
            flag only.
        images_per_prompt: images per prompt.
        guidance, num_steps, signal_steps, norm_steps: as for :func:`guarded_ddim_sample`.
        batch_size: prompts per sampler call (default: all at once); the last batch is padded,
            so one compiled program serves every call.

    Returns:
        :class:`GuardReport`.
    """
    prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    check_option(signal, "signal", get_args(Signal))
    if not isinstance(threshold, (int, float, np.floating)) or not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if mitigate is not None and not callable(mitigate):
        raise TypeError(
            f"mitigate must be callable (prompt -> prompt), got {type(mitigate).__name__}"
        )
    p, m = len(prompts), images_per_prompt
    batch = p if batch_size is None else int(batch_size)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch = min(batch, p)
    higher = memorized_when_high(signal)

    noise_m = images_noise(key, m, sd.latent_shape)
    probe_root = jax.random.split(key)[1]
    probes_m = jax.vmap(lambda j: jax.random.fold_in(probe_root, j))(jnp.arange(m))
    noise = jnp.tile(noise_m, (batch, 1, 1, 1))
    probes = jnp.tile(probes_m, (batch,))
    uncond = jnp.asarray(sd.uncond_embedding)
    grid = sd.ddim_grid
    steps = grid.timesteps(sd.schedule.num_timesteps, num_steps)
    if signal == "flipd":
        if not 1 <= signal_steps <= num_steps:
            raise ValueError(
                f"signal_steps must lie in 1..num_steps={num_steps}, got {signal_steps}"
            )
        statics = dict(num_flipd=int(signal_steps))
        window = (num_steps - signal_steps, num_steps)
    else:
        statics = dict(num_flipd=0)
        window = _check_range(norm_steps, num_steps)
        probes = None
    window = jnp.asarray(window)
    statics.update(
        num_steps=num_steps, set_alpha_to_one=grid.set_alpha_to_one, return_trajectory=False
    )
    g = jnp.asarray(guidance, noise.dtype)
    steps = jnp.asarray(steps)

    def embed(texts: list[str]) -> Array:
        cond = jnp.asarray(sd.encode_prompt(texts))
        pad = batch - cond.shape[0]
        if pad:
            cond = jnp.concatenate([cond, jnp.repeat(cond[-1:], pad, axis=0)])
        return jnp.repeat(cond, m, axis=0)

    def run(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Latents ``[len(texts) * m, ...]`` and per-prompt signals."""
        latents, signals = [], []
        for lo, hi in spans(len(texts), batch):
            out = _guarded(
                sd.eps,
                noise,
                embed(texts[lo:hi]),
                uncond,
                g,
                steps,
                sd.schedule,
                probes,
                window,
                **statics,
            )
            k = (hi - lo) * m
            latents.append(np.asarray(out.sample[:k]))
            signals.append(np.asarray(out.signal[:k]).reshape(hi - lo, m).mean(axis=1))
        return np.concatenate(latents), np.concatenate(signals)

    latents, signals = run(prompts)
    if not np.all(np.isfinite(signals)):
        bad = [prompts[i] for i in np.flatnonzero(~np.isfinite(signals))[:3]]
        raise FloatingPointError(f"the sampler gave non-finite signals (e.g. for {bad})")
    flagged = flag(signals, threshold=threshold, higher_is_memorized=higher)

    final_prompts, errors = list(prompts), [None] * p
    redo = []
    if mitigate is not None:
        for i in np.flatnonzero(flagged):
            try:
                new = mitigate(prompts[i])
                if not isinstance(new, str):
                    raise TypeError(f"mitigate returned {type(new).__name__}, not a string")
            except Exception as err:  # a failing rephraser must not stop the run
                errors[i] = f"{type(err).__name__}: {err}"
                continue
            final_prompts[i] = new
            redo.append(int(i))
    final_latents, final_signals = latents.copy(), signals.copy()
    if redo:
        new_latents, new_signals = run([final_prompts[i] for i in redo])
        for j, i in enumerate(redo):
            final_latents[i * m : (i + 1) * m] = new_latents[j * m : (j + 1) * m]
            final_signals[i] = new_signals[j]
    final_flagged = flag(final_signals, threshold=threshold, higher_is_memorized=higher)
    outcomes = [
        PromptOutcome(
            prompts[i],
            float(signals[i]),
            bool(flagged[i]),
            final_prompts[i],
            i in redo,
            float(final_signals[i]),
            bool(final_flagged[i]),
            errors[i],
        )
        for i in range(p)
    ]
    return GuardReport(outcomes, final_latents, latents, signal, float(threshold), higher)
