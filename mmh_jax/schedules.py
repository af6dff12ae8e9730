"""Forward-SDE noise schedules.

Every schedule describes a forward process whose transition kernel is

    p_{t|0}(x_t | x_0) = N(x_t; psi(t) x_0, sigma(t)^2 I),    t in (0, 1]

(paper, Eq. 5). Schedules are small immutable pytrees: they can be passed
through ``jax.jit``, ``vmap`` and ``shard_map`` as ordinary arguments.

Besides ``psi`` and ``sigma``, every schedule exposes the drift coefficient
``f(t) = d log psi / dt`` and the squared diffusion ``g2(t) = d sigma^2/dt -
2 f(t) sigma^2(t)`` of the SDE ``dx = f(t) x dt + g(t) dW`` that has this
kernel, which is all a reverse-SDE or probability-flow sampler needs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jaxtyping import Array, ArrayLike, Float

from mmh_jax._src.partial import as_pytree_fn
from mmh_jax.types import EpsFn, ScoreFn

__all__ = [
    "Schedule",
    "VP",
    "DDPM",
    "VE",
    "EDM",
    "score_from_eps",
    "eps_from_score",
    "broadcast_to_event",
]


def broadcast_to_event(values: Float[Array, " b"], like: Array) -> Array:
    """Reshape per-sample ``values`` of shape ``[b]`` to broadcast against ``like`` ``[b, ...]``."""
    return jnp.reshape(values, values.shape + (1,) * (like.ndim - values.ndim))


class Schedule:
    """Base class: subclasses define ``log_psi(t)`` and ``sigma(t)`` elementwise."""

    def log_psi(self, t: ArrayLike) -> Array:
        raise NotImplementedError

    def sigma(self, t: ArrayLike) -> Array:
        raise NotImplementedError

    def psi(self, t: ArrayLike) -> Array:
        """Mean scale of the transition kernel, ``psi(t)``."""
        return jnp.exp(self.log_psi(t))

    def f(self, t: ArrayLike) -> Array:
        """Drift coefficient ``d log psi(t) / dt`` of the forward SDE."""
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        return jax.jvp(self.log_psi, (t,), (jnp.ones_like(t),))[1]

    def g2(self, t: ArrayLike) -> Array:
        """Squared diffusion coefficient ``g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2(t)``."""
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        sigma, dsigma = jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))
        return 2.0 * sigma * dsigma - 2.0 * self.f(t) * sigma**2


def _pytree_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree_dataclass
class VP(Schedule):
    """Linear variance-preserving SDE of Song et al. (2021).

    ``beta(t) = beta_min + t (beta_max - beta_min)``, ``psi(t) = exp(-1/2 int_0^t beta)``,
    ``sigma(t)^2 = 1 - psi(t)^2``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def log_psi(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma(self, t: ArrayLike) -> Array:
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_psi(t)))


@_pytree_dataclass
class DDPM(Schedule):
    """Discrete-time DDPM schedule given by its cumulative products ``alphas_cumprod``.

    With ``T = len(alphas_cumprod)``, continuous time ``t = i / T`` corresponds to
    Ho et al.'s step ``i`` in ``1..T``: ``psi(i/T)^2 = abar_i`` and
    ``sigma(i/T)^2 = 1 - abar_i`` (paper, Appendix D.1, Eq. 9). ``alphas_cumprod[i - 1]``
    holds ``abar_i`` as in diffusers, so the network's integer timestep for ``t`` is
    ``timestep(t) = t T - 1``. Between grid points ``log abar`` is interpolated
    linearly (with ``abar_0 = 1`` at ``t = 0``), which makes ``psi`` and ``sigma``
    continuous and differentiable in ``t``.

    ``log_alphas_cumprod`` is kept beside ``alphas_cumprod`` (computed in float64 when not
    given): near ``t = 0``, ``sigma^2 = -expm1(log abar)`` from a float32 ``log abar`` keeps full
    relative precision, whereas ``1 - abar`` from a float32 ``abar`` does not (``1 - abar`` is
    about 1e-5 at the first step of a 4000-step cosine schedule).
    """

    alphas_cumprod: Float[Array, " T"]
    log_alphas_cumprod: Float[Array, " T"] | None = None

    def __post_init__(self):
        a = self.alphas_cumprod
        if isinstance(a, (np.ndarray, list, tuple)) or (
            isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
        ):
            a = np.asarray(a, dtype=np.float64)
            if a.ndim != 1 or a.size < 2:
                raise ValueError(
                    f"alphas_cumprod must be a 1-D array of length >= 2, got shape {a.shape}"
                )
            if not (np.all(a > 0) and np.all(a <= 1) and np.all(np.diff(a) <= 0)):
                raise ValueError("alphas_cumprod must be non-increasing and lie in (0, 1]")
            if self.log_alphas_cumprod is None:
                dtype = jnp.asarray(self.alphas_cumprod).dtype
                object.__setattr__(self, "log_alphas_cumprod", jnp.asarray(np.log(a), dtype))

    @property
    def num_timesteps(self) -> int:
        """Number of discrete steps ``T``."""
        return self.alphas_cumprod.shape[0]

    @classmethod
    def from_betas(cls, betas: ArrayLike) -> "DDPM":
        """Schedule from per-step ``betas`` (``abar_i = prod_{j <= i} (1 - beta_j)``)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        log_abar = np.cumsum(np.log1p(-betas))
        dtype = jnp.result_type(float)
        return cls(jnp.asarray(np.exp(log_abar), dtype), jnp.asarray(log_abar, dtype))

    @classmethod
    def linear(cls, *, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DDPM":
        """Ho et al.'s linear betas (diffusers' ``"linear"``)."""
        return cls.from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))

    @classmethod
    def scaled_linear(
        cls, *, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> "DDPM":
        """Stable Diffusion's betas, linear in ``sqrt(beta)`` (diffusers' ``"scaled_linear"``)."""
        return cls.from_betas(np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2)

    @classmethod
    def cosine(cls, *, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "DDPM":
        """Nichol & Dhariwal's cosine schedule (diffusers' ``"squaredcos_cap_v2"``)."""

        def abar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
        return cls.from_betas(betas)

    def _log_abar(self, t: ArrayLike) -> Array:
        a = self.alphas_cumprod
        log_a = jnp.log(a) if self.log_alphas_cumprod is None else self.log_alphas_cumprod
        knots = jnp.concatenate([jnp.zeros((1,), a.dtype), log_a.astype(a.dtype)])
        grid = jnp.arange(knots.shape[0], dtype=a.dtype)
        return jnp.interp(jnp.asarray(t, a.dtype) * self.num_timesteps, grid, knots)

    def log_psi(self, t: ArrayLike) -> Array:
        return 0.5 * self._log_abar(t)

    def sigma(self, t: ArrayLike) -> Array:
        return jnp.sqrt(-jnp.expm1(self._log_abar(t)))

    def timestep(self, t: ArrayLike) -> Array:
        """The (0-based, diffusers) network timestep for continuous ``t``: ``t T - 1``."""
        return jnp.asarray(t) * self.num_timesteps - 1.0

    def time(self, timestep: ArrayLike) -> Array:
        """Continuous ``t`` of a 0-based network timestep: ``(timestep + 1) / T``."""
        return (jnp.asarray(timestep) + 1.0) / self.num_timesteps


@_pytree_dataclass
class VE(Schedule):
    """Variance-exploding SDE: ``psi = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    This is the geometric noise level used by NCSN++/score_sde; note ``sigma(0) =
    sigma_min``, not 0, so FLIPD at ``t0`` sees at least ``sigma_min`` of noise.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def log_psi(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def sigma(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t


@_pytree_dataclass
class EDM(Schedule):
    """Karras et al. (2022) EDM: ``psi = 1`` and the noise level ``sigma`` is the time.

    EDM's own time is ``sigma in [sigma_min, sigma_max]``. We map ``t in [0, 1]`` onto it
    with the rho-warping of EDM's sampler,
    ``sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``,
    so a uniform grid in ``t`` is EDM's sampling grid, ``t = 1`` is ``sigma_max`` and
    ``t = 0`` is ``sigma_min``. An EDM denoiser ``D(x; sigma)`` gives the score
    ``(D(x; sigma(t)) - x) / sigma(t)^2``; :meth:`time` inverts the mapping.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def log_psi(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def sigma(self, t: ArrayLike) -> Array:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + jnp.asarray(t) * (hi - lo)) ** self.rho

    def time(self, sigma: ArrayLike) -> Array:
        """Inverse of :meth:`sigma`: the ``t`` at which the noise level is ``sigma``."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (jnp.asarray(sigma) ** (1 / self.rho) - lo) / (hi - lo)


def _score_of_eps(eps_fn: EpsFn, x_t: Array, t: Array, *, schedule: Schedule) -> Array:
    return -eps_fn(x_t, t) / broadcast_to_event(schedule.sigma(t), x_t)


def _eps_of_score(score_fn: ScoreFn, x_t: Array, t: Array, *, schedule: Schedule) -> Array:
    return -broadcast_to_event(schedule.sigma(t), x_t) * score_fn(x_t, t)


def score_from_eps(eps_fn: EpsFn, *, schedule: Schedule) -> Partial:
    """Wrap a noise-prediction network as a score function.

    ``score(x_t, t) = -eps(x_t, t) / sigma(t)`` (paper, Eq. 10). ``eps_fn(x_t, t)`` takes
    continuous ``t`` of shape ``[b]``; for a discrete-time network compose it with
    ``schedule.timestep`` first, e.g. ``lambda x, t: unet(x, schedule.timestep(t))``.

    Args:
        eps_fn: the noise predictor (best a :class:`~jax.tree_util.Partial` over its
            parameters).
        schedule: its noise schedule.

    Returns:
        ``score_fn(x_t, t)``, a :class:`~jax.tree_util.Partial` over ``(eps_fn, schedule)``.
    """
    return Partial(_score_of_eps, as_pytree_fn(eps_fn), schedule=schedule)


def eps_from_score(score_fn: ScoreFn, *, schedule: Schedule) -> Partial:
    """Inverse of :func:`score_from_eps`: ``eps(x_t, t) = -sigma(t) score(x_t, t)`` (paper, Eq. 10).

    Args:
        score_fn: the score function.
        schedule: its noise schedule.

    Returns:
        ``eps_fn(x_t, t)``, a :class:`~jax.tree_util.Partial` over ``(score_fn, schedule)``.
    """
    return Partial(_eps_of_score, as_pytree_fn(score_fn), schedule=schedule)
