"""Distributions on manifolds of known dimension with closed-form noisy scores.

:class:`SubspaceGaussianMixture` is a mixture of Gaussians, each supported on an
affine subspace of known dimension ``k_j`` in ``R^d`` (``k_j = 0`` is a point mass).
Noised by any schedule it stays a Gaussian mixture, so ``grad log p_t`` is exact:
the ground truth the LID estimators are checked against, and a ready toy for
experiments on OD-Mem/DD-Mem.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.tree_util import Partial
from jaxtyping import Array, Float, Int

from mmh_jax.schedules import Schedule

__all__ = ["SubspaceGaussianMixture"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SubspaceGaussianMixture:
    """Mixture of Gaussians ``N(mean_j, U_j diag(scale_j^2) U_j^T)`` on affine subspaces.

    Attributes:
        means: ``[m, d]`` component means.
        bases: ``[m, d, r]`` orthonormal columns spanning each component's subspace.
        scales: ``[m, r]`` standard deviations along those columns; a zero scale drops the
            direction, so component ``j`` has intrinsic dimension ``count(scales[j] > 0)``.
        weights: ``[m]`` mixture weights summing to one.
    """

    means: Float[Array, "m d"]
    bases: Float[Array, "m d r"]
    scales: Float[Array, "m r"]
    weights: Float[Array, " m"]

    @classmethod
    def random(
        cls,
        *,
        key: Array,
        ambient_dim: int,
        dims: Sequence[int],
        separation: float = 10.0,
        scale_range: tuple[float, float] = (0.5, 2.0),
        dtype=None,
    ) -> "SubspaceGaussianMixture":
        """Random well-separated mixture with one component per entry of ``dims``.

        Means are ``separation`` times random unit vectors (the first at the origin),
        subspaces are random, scales uniform in ``scale_range``.
        """
        dims = list(dims)
        if any(k < 0 or k > ambient_dim for k in dims):
            raise ValueError(f"dims must lie in [0, ambient_dim={ambient_dim}], got {dims}")
        dtype = dtype or jnp.result_type(float)
        r = max(max(dims), 1)
        m = len(dims)
        k_mean, k_basis, k_scale = jax.random.split(key, 3)
        directions = jax.random.normal(k_mean, (m, ambient_dim), dtype)
        directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
        means = separation * directions.at[0].set(0.0)
        gauss = jax.random.normal(k_basis, (m, ambient_dim, ambient_dim), dtype)
        bases = jnp.linalg.qr(gauss)[0][:, :, :r]
        scales = jax.random.uniform(k_scale, (m, r), dtype, *scale_range)
        scales = jnp.where(jnp.arange(r)[None, :] < jnp.asarray(dims)[:, None], scales, 0.0)
        return cls(means=means, bases=bases, scales=scales, weights=jnp.full((m,), 1.0 / m, dtype))

    @property
    def dims(self) -> Int[Array, " m"]:
        """Intrinsic dimension of each component."""
        return jnp.sum(self.scales > 0, axis=-1)

    def sample(self, n: int, *, key: Array) -> tuple[Float[Array, "n d"], Int[Array, " n"]]:
        """``n`` samples and the index of the component each came from."""
        k_comp, k_z = jax.random.split(key)
        comp = jax.random.choice(k_comp, self.weights.shape[0], (n,), p=self.weights)
        z = jax.random.normal(k_z, (n, self.scales.shape[1]), self.means.dtype) * self.scales[comp]
        x = self.means[comp] + jnp.einsum("ndr,nr->nd", self.bases[comp], z)
        return x, comp

    def log_prob_t(self, y: Float[Array, " d"], t: Array, *, schedule: Schedule) -> Array:
        """``log p_t(y)`` of the noised mixture, ``x_t = psi(t) x_0 + sigma(t) eps`` (Eq. 5)."""
        psi, sigma2 = schedule.psi(t), schedule.sigma(t) ** 2
        d = y.shape[0]
        lam = (psi * self.scales) ** 2  # [m, r] variances along the basis after scaling
        v = y[None, :] - psi * self.means  # [m, d]
        proj = jnp.einsum("mdr,md->mr", self.bases, v)
        quad = (jnp.sum(v**2, -1) - jnp.sum(lam / (lam + sigma2) * proj**2, -1)) / sigma2
        logdet = d * jnp.log(sigma2) + jnp.sum(jnp.log1p(lam / sigma2), -1)
        log_comp = -0.5 * (quad + logdet + d * jnp.log(2 * jnp.pi))
        return jax.nn.logsumexp(log_comp, b=self.weights)

    def score(self, *, schedule: Schedule) -> Partial:
        """Exact score ``score_fn(x_t [b, d], t [b]) -> grad log p_t(x_t)`` under ``schedule``:
        a :class:`~jax.tree_util.Partial` over the mixture and the schedule."""
        return Partial(_mixture_score, self, schedule=schedule)

    @property
    def ambient_dim(self) -> int:
        return self.means.shape[1]


def _mixture_score(
    mix: SubspaceGaussianMixture, x_t: Array, t: Array, *, schedule: Schedule
) -> Array:
    log_prob = functools.partial(mix.log_prob_t, schedule=schedule)
    return jax.vmap(jax.grad(log_prob))(x_t, t)
