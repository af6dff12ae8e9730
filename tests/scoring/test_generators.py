"""The engine on items that a model generates from: class-conditional generators (the class from
the item's metadata, the Jacobian with respect to the latent only), StyleGAN2 on one and two
devices, and an unconditional diffusion model generating from sample numbers."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from mmh_jax.sampling import DDIMGrid
from mmh_jax.scoring import (
    ArrayFile,
    Flipd,
    Generation,
    JacobianRank,
    Model,
    Pixels,
    Seeds,
    data_mesh,
    merge,
    score,
)

PICKLE = Path(__file__).parents[1] / "models" / "fixtures" / "stylegan2" / "skip_cond.pkl"


def _vectors(out, name: str) -> np.ndarray:
    return np.stack(merge(out).scores[name].to_pylist())


def _conditional(weights, latent, labels):
    """``tanh(W_c latent)`` with one matrix ``W_c`` per class."""
    return jnp.tanh(jnp.einsum("bod,bd->bo", weights[labels], latent))


def _mapping(matrix, z, labels):
    return z @ matrix.T


def _planted(rng, ranks, out_dim: int, in_dim: int) -> np.ndarray:
    return np.stack(
        [rng.normal(size=(out_dim, r)) @ rng.normal(size=(r, in_dim)) for r in ranks]
    ).astype(np.float32)


@pytest.mark.parametrize("mapped", [False, True])
def test_class_conditional_jacobian_rank_is_the_class_rank(tmp_path, mapped):
    """Class c's generator is a rank-(c + 1) linear map then tanh: the Jacobian rank with
    respect to the latent (4 dimensions, or 3 after a full-rank mapping) is c + 1 for every
    item of class c, and each spectrum has one value per latent direction (none for the
    class)."""
    rng = np.random.default_rng(0)
    ranks = (1, 2, 3)
    latent_dim = 3 if mapped else 4
    weights = _planted(rng, ranks, 6, latent_dim)
    z = (0.2 * rng.normal(size=(14, 4))).astype(np.float32)  # tanh far from saturation
    classes = np.arange(14) % 3
    np.savez(tmp_path / "z.npz", z=z, label=classes)
    mapping = Partial(_mapping, jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
    model = Model.from_generator(
        Partial(_conditional, jnp.asarray(weights)),
        (4,),
        num_classes=3,
        mapping=mapping if mapped else None,
    )
    score(
        model,
        [JacobianRank(threshold=1e-4, spectrum=True)],
        ArrayFile(tmp_path / "z.npz", key="z", metadata=["label"]),
        str(tmp_path / "out"),
        batch_size=8,
        chunk_size=4,
        labels="label",
    )
    table = merge(tmp_path / "out").scores
    np.testing.assert_array_equal(table["label"].to_numpy(), classes)
    np.testing.assert_array_equal(table["jacobian_rank"].to_numpy(), classes + 1)
    assert _vectors(tmp_path / "out", "jacobian_singular_values").shape == (14, latent_dim)


def test_class_labels_are_checked(tmp_path):
    z = np.zeros((4, 2), np.float32)
    np.savez(tmp_path / "z.npz", z=z, label=np.array([0, 1, 2, 1]), name=np.array(list("abcd")))
    source = ArrayFile(tmp_path / "z.npz", key="z", metadata=["label", "name"])
    weights = jnp.ones((2, 3, 2))
    model = Model.from_generator(Partial(_conditional, weights), (2,), num_classes=2)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="labels="):
        score(model, [JacobianRank()], source, out, batch_size=8)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 2\)"):
        score(model, [JacobianRank()], source, out, batch_size=8, labels="label")
    with pytest.raises(ValueError, match="must be integers"):
        score(model, [JacobianRank()], source, out, batch_size=8, labels="name")
    with pytest.raises(ValueError, match="not a metadata field"):
        score(model, [JacobianRank()], source, out, batch_size=8, labels="other")
    plain = Model.from_generator(Partial(lambda z: z), (2,))
    with pytest.raises(ValueError, match="class-conditional"):
        score(plain, [JacobianRank()], source, out, batch_size=8, labels="label")
    with pytest.raises(ValueError, match="sample numbers alone an unconditional"):
        score(plain, [JacobianRank()], Seeds(3), out, batch_size=8)


@pytest.mark.slow
def test_stylegan2_columns_are_the_same_on_one_and_two_devices(tmp_path):
    """The conditional StyleGAN2 fixture with w.r.t. w: spectra and images equal on a 1- and a
    2-device mesh, the spectra equal gan_lid's on the same latents and classes, the images the
    generator's rounded output."""
    from mmh_jax.experiments.cifar10_gan import write_latents
    from mmh_jax.memorization import gan_lid, stylegan2_fns
    from mmh_jax.models import load_stylegan2

    gan = load_stylegan2(PICKLE)
    module = gan.module
    path = write_latents(
        tmp_path / "z.npz", num_samples=5, seed=3, z_dim=module.z_dim, c_dim=module.c_dim
    )
    fns = stylegan2_fns(module, gan.params, wrt="w")
    model = Model.from_generator(
        fns.generate, (module.z_dim,), num_classes=module.c_dim, mapping=fns.mapping
    )
    columns = [JacobianRank(spectrum=True, chunk_size=8), Pixels()]
    source = ArrayFile(path, key="z", ids_key=None, metadata=("class", "seed"))
    for devices in (1, 2):
        score(
            model,
            columns,
            source,
            str(tmp_path / f"on{devices}"),
            batch_size=4,
            chunk_size=3,
            labels="class",
            mesh=data_mesh(jax.devices()[:devices]),
        )
    for name in ("jacobian_singular_values", "pixels"):
        np.testing.assert_array_equal(
            _vectors(tmp_path / "on1", name), _vectors(tmp_path / "on2", name)
        )
    with np.load(path) as data:
        z, classes = data["z"], data["class"]
    direct = gan_lid(module, gan.params, z, classes, wrt="w")
    spectra = _vectors(tmp_path / "on2", "jacobian_singular_values")
    np.testing.assert_allclose(
        spectra, direct.singular_values, rtol=1e-4, atol=1e-5 * spectra.max()
    )
    images = np.asarray(gan.generate(jnp.asarray(z), jnp.asarray(classes)))
    expected = np.clip(np.round((images.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255)
    pixels = _vectors(tmp_path / "on2", "pixels").reshape(expected.shape)
    assert np.abs(pixels.astype(int) - expected).max() <= 1  # rounding of float noise only


def _ddpm_score(variance, schedule, x, t):
    shape = (-1,) + (1,) * (x.ndim - 1)
    psi, sigma = schedule.psi(t).reshape(shape), schedule.sigma(t).reshape(shape)
    return -x / (psi**2 * variance + sigma**2)


def _eps(score_fn, schedule, x, t, context):
    return -schedule.sigma(t).reshape(-1, 1, 1, 1) * score_fn(x, t)


@pytest.mark.slow
def test_unconditional_samples_from_seeds(tmp_path):
    """Sample numbers alone with an unconditional pixel model: sample i is DDIM from the noise
    of index i under the run's seed (the one item-noise rule), rounded to uint8, the same on 1
    and 2 devices; FLIPD is computed at the rounded image."""
    from mmh_jax._src.noise import images_noise
    from mmh_jax.lid import flipd
    from mmh_jax.models import ddpm_from_scheduler_config
    from mmh_jax.sampling import ddim_sample

    schedule = ddpm_from_scheduler_config({"num_train_timesteps": 100})
    shape = (1, 2, 3)
    variance = np.zeros(shape, np.float32)
    variance.reshape(-1)[:2] = 0.5
    score_fn = Partial(_ddpm_score, jnp.asarray(variance), schedule)
    grid = DDIMGrid(steps_offset=0, set_alpha_to_one=True)
    model = Model(
        shape=shape, image_shape=shape, score_fn=score_fn, schedule=schedule, ddim_grid=grid
    )
    for devices in (1, 2):
        summary = score(
            model,
            [Pixels(), Flipd(t0=0.1)],
            Seeds(5),
            str(tmp_path / f"on{devices}"),
            seed=7,
            batch_size=4,
            chunk_size=2,
            generation=Generation(num_steps=3),
            mesh=data_mesh(jax.devices()[:devices]),
        )
        assert summary.plan.mode == "samples"
    np.testing.assert_array_equal(
        _vectors(tmp_path / "on1", "pixels"), _vectors(tmp_path / "on2", "pixels")
    )

    none = jnp.zeros((1, 1))
    x = ddim_sample(
        Partial(_eps, score_fn, schedule),
        images_noise(jax.random.key(7), 5, shape),
        none,
        none,
        schedule=schedule,
        guidance=0.0,
        num_steps=3,
        grid=grid,
    ).sample
    expected = np.clip(np.round((np.asarray(x).transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255)
    pixels = _vectors(tmp_path / "on1", "pixels").reshape(expected.shape)
    assert np.abs(pixels.astype(int) - expected).max() <= 1
    assert len(np.unique(pixels.reshape(5, -1), axis=0)) == 5  # every sample its own noise
    rounded = np.moveaxis(pixels.astype(np.float32) / 127.5 - 1, -1, 1)
    table = merge(tmp_path / "on1").scores
    keys = jax.random.split(jax.random.key(0), 5)  # FLIPD's one probe is exact here
    np.testing.assert_allclose(
        table["flipd_0.1"].to_numpy(),
        flipd(score_fn, rounded, t0=0.1, schedule=schedule, key=keys),
        rtol=1e-4,
        atol=1e-4,
    )
