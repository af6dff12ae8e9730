"""LID of GAN samples: the numerical rank of the generator's Jacobian (paper, Section 4,
Appendix B.3, Figure 5a-b).

For a sample ``x = G(z, c)`` of a StyleGAN2-ADA generator, ``LID_theta(x) = rank dG/dz`` at
``z``: the Jacobian is built from ``z_dim`` forward-mode tangents (chunked, batched over the
samples) by :func:`mmh_jax.lid.jacobian_rank`, and its singular values are thresholded. The
paper thresholds all spectra of the sample set at their pooled 10th percentile (Appendix C.1),
so the spectra are returned for :func:`mmh_jax.lid.percentile_threshold` and
:func:`mmh_jax.lid.lid_from_singular_values` (``space="tangent"``) over the whole set.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal, NamedTuple

import jax.numpy as jnp
from jax.tree_util import Partial
from jaxtyping import Array, ArrayLike, Float, PyTree

from mmh_jax.lid import JacobianRankResult, jacobian_rank

if TYPE_CHECKING:  # the Flax model code is not loaded by importing mmh_jax.memorization
    from mmh_jax.models.stylegan2 import NoiseMode, StyleGAN2Generator

__all__ = ["gan_lid", "stylegan2_fns", "StyleGAN2Fns"]


@functools.cache
def _generator_of(
    module: StyleGAN2Generator, wrt: str, truncation_cutoff: int | None, noise_mode: str
):
    """``fn(params, c, psi, key, latent) -> images`` for one module and static settings (one
    object per setting, so equal calls share their compiled programs)."""

    def from_z(params, c, psi, key, z):
        return module.apply(
            {"params": params},
            z,
            c,
            truncation_psi=psi,
            truncation_cutoff=truncation_cutoff,
            noise_mode=noise_mode,
            key=key,
        )

    def from_w(params, c, psi, key, w):
        ws = module.apply(
            {"params": params},
            w,
            truncation_psi=psi,
            truncation_cutoff=truncation_cutoff,
            method="broadcast_w",
        )
        return module.apply(
            {"params": params}, ws, noise_mode=noise_mode, key=key, method="synthesis"
        )

    return from_z if wrt == "z" else from_w


def gan_lid(
    generator: StyleGAN2Generator,
    params: PyTree,
    z: Float[ArrayLike, "b z_dim"],
    c: ArrayLike | None = None,
    *,
    wrt: Literal["z", "w"] = "z",
    truncation_psi: float = 1.0,
    truncation_cutoff: int | None = None,
    noise_mode: NoiseMode = "const",
    key: Array | None = None,
    threshold: float | Float[ArrayLike, " b"] | None = None,
    chunk_size: int | None = None,
) -> JacobianRankResult:
    """Jacobian-rank LID of the samples ``G(z, c)`` (paper, Appendix B.3).

    Args:
        generator: the Flax generator (:class:`~mmh_jax.models.StyleGAN2Generator`).
        params: its parameters.
        z: latents ``[b, z_dim]``.
        c: classes of a conditional generator: one-hot ``[b, c_dim]`` or integer labels ``[b]``
            (``None`` for an unconditional one).
        wrt: the Jacobian with respect to ``z`` (the paper) or to the intermediate latent ``w``
            (the mapping network's output for ``z`` and ``c``, ``w_dim`` directions, before the
            truncation and the broadcast to every layer).
        truncation_psi: truncation toward ``w_avg``.
        truncation_cutoff: truncate only the first ``cutoff`` layers' ``w`` (``None``: all).
        noise_mode: ``"const"`` (the stored noise, as the official ``generate.py``), ``"none"``
            or ``"random"`` (needs ``key``; the same noise for every direction).
        key: PRNG key of ``noise_mode="random"``.
        threshold: singular values above it count; ``None``: the rank up to rounding (see
            :func:`mmh_jax.lid.jacobian_rank`); for the paper's rule compute the spectra of the
            whole sample set and threshold them at their pooled 10th percentile.
        chunk_size: latent directions per batched ``jvp`` (the generator then runs on
            ``b * chunk_size`` tangents at once); default ``min(d_latent, 32)``.

    Returns:
        :class:`~mmh_jax.lid.JacobianRankResult`: ``lid`` ``[b]`` and the singular values
        ``[b, min(d, d_latent)]`` (``d = img_channels * R * R``), descending.

    Raises:
        ValueError: ``wrt`` or ``noise_mode`` not one of the options, a latent or class of the
            wrong shape, a label out of range, a conditional generator without ``c``, or
            ``noise_mode="random"`` without ``key``.
    """
    if wrt not in ("z", "w"):
        raise ValueError(f"wrt must be 'z' or 'w', got {wrt!r}")
    z = jnp.asarray(z)
    if z.ndim != 2:
        raise ValueError(f"z must have shape [b, {generator.z_dim}], got {z.shape}")
    c = generator.class_vectors(c, z.shape[0])
    psi = jnp.asarray(truncation_psi, jnp.float32)
    fn = _generator_of(generator, wrt, truncation_cutoff, noise_mode)
    latent = z
    if wrt == "w":
        latent = generator.apply({"params": params}, z, c, method="mapping")[:, 0]
    return jacobian_rank(
        Partial(fn, params, c, psi, key), latent, threshold=threshold, chunk_size=chunk_size
    )


class StyleGAN2Fns(NamedTuple):
    """A StyleGAN2 generator as functions of its latent, for :class:`mmh_jax.scoring.Model`
    (``Model.from_generator(fns.generate, (z_dim,), num_classes=c_dim, mapping=fns.mapping)``)."""

    generate: Partial
    """``generate(latent, labels=None) -> images [b, c, R, R]``: from ``z``, or from ``w``
    with ``wrt="w"``; integer class labels ``[b]`` for a conditional generator."""
    mapping: Partial | None
    """``mapping(z, labels) -> w [b, w_dim]`` with ``wrt="w"`` (``None`` with ``wrt="z"``)."""


@functools.cache
def _labelled_of(
    module: StyleGAN2Generator, wrt: str, truncation_cutoff: int | None, noise_mode: str
):
    """``(generate(params, psi, latent, labels), mapping(params, z, labels))`` for one module
    and static settings: :func:`gan_lid`'s generator, with integer labels."""
    fn = _generator_of(module, wrt, truncation_cutoff, noise_mode)

    def generate(params, psi, latent, labels=None):
        return fn(params, module.class_vectors(labels, latent.shape[0]), psi, None, latent)

    def mapping(params, z, labels):
        c = module.class_vectors(labels, z.shape[0])
        return module.apply({"params": params}, z, c, method="mapping")[:, 0]

    return generate, mapping


def stylegan2_fns(
    generator: StyleGAN2Generator,
    params: PyTree,
    *,
    wrt: Literal["z", "w"] = "z",
    truncation_psi: float = 1.0,
    truncation_cutoff: int | None = None,
    noise_mode: Literal["const", "none"] = "const",
) -> StyleGAN2Fns:
    """The generator of :func:`gan_lid` as ``Partial``\\ s over ``params``: its Jacobian with
    respect to the latent (``z``, or ``w = mapping(z, c)``) is the one :func:`gan_lid` takes.

    Raises:
        ValueError: ``wrt`` or ``noise_mode`` not one of the options.
    """
    if wrt not in ("z", "w"):
        raise ValueError(f"wrt must be 'z' or 'w', got {wrt!r}")
    if noise_mode not in ("const", "none"):
        raise ValueError(f"noise_mode must be 'const' or 'none', got {noise_mode!r}")
    generate, mapping = _labelled_of(generator, wrt, truncation_cutoff, noise_mode)
    psi = jnp.asarray(truncation_psi, jnp.float32)
    return StyleGAN2Fns(
        Partial(generate, params, psi), Partial(mapping, params) if wrt == "w" else None
    )
