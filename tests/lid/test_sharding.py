"""The estimators inside jit, pmap and shard_map give the plain call's answer.

A point's estimate must not depend on how its batch is laid out over devices: with one
PRNG key (and one threshold) per sample, running a shard of the batch per device gives
the whole batch's answer. Float64 throughout (``jax.enable_x64``), so the comparisons
are tight; the data are a closed-form mixture whose exact-trace FLIPD and normal bundle
are known. All estimators run in one function per context (one compile each: the PRNG
inside FLIPD-Hutchinson and the normal bundle is most of the compile time on CPU).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmh_jax.distributions import SubspaceGaussianMixture
from mmh_jax.lid import flipd, jacobian_rank, normal_bundle
from mmh_jax.schedules import VP

N_DEV = 8
BATCH = 16  # two samples per device
D = 6
T0 = 1e-3
TOL = dict(rtol=1e-10, atol=1e-10)  # values are O(1) at most (FLIPD <= 6, singular values <= ~1)


def _mixture(rng):
    """Components of dimension 0, 2 and 4 in R^6 (random subspaces, scales in [0.5, 2],
    means 10 apart), built in numpy: no PRNG program to compile."""
    dims = np.array([0, 2, 4])
    bases = np.linalg.qr(rng.standard_normal((3, D, D)))[0][:, :, :4]
    scales = np.where(np.arange(4) < dims[:, None], rng.uniform(0.5, 2.0, (3, 4)), 0.0)
    means = 10 * rng.standard_normal((3, D))
    means = means / np.linalg.norm(means, axis=1, keepdims=True) * np.array([[0.0], [1], [1]])
    mix = SubspaceGaussianMixture(
        means=jnp.asarray(means),
        bases=jnp.asarray(bases),
        scales=jnp.asarray(scales),
        weights=jnp.full(3, 1 / 3),
    )
    np.testing.assert_array_equal(mix.dims, dims)
    return mix


@functools.cache
def problem():
    """Float64 data (call under ``jax.enable_x64(True)``): the mixture, its exact score, 16
    points from it (every component), a rank-2 generator ``z in R^3 -> tanh(W z)``, one key
    and one threshold per sample."""
    rng = np.random.default_rng(0)
    schedule = VP()
    mix = _mixture(rng)
    comp = rng.permutation(np.arange(BATCH) % 3)
    coords = rng.standard_normal((BATCH, 4)) * np.asarray(mix.scales)[comp]
    x = np.asarray(mix.means)[comp] + np.einsum("ndr,nr->nd", np.asarray(mix.bases)[comp], coords)
    w = jnp.asarray(rng.standard_normal((D, 2)) @ rng.standard_normal((2, 3)))
    odd = np.arange(BATCH) % 2 == 1
    return dict(
        schedule=schedule,
        mix=mix,
        comp=comp,
        odd=odd,
        score=mix.score(
            schedule=schedule
        ),  # one score function for the whole file: the estimators' caches hit
        gen=lambda z: jnp.tanh(0.3 * z @ w.T),
        args=dict(
            x=jnp.asarray(x),
            keys=jax.random.split(jax.random.key(2), BATCH),
            z=jnp.asarray(rng.standard_normal((BATCH, 3))),
            # Every other sample gets a threshold above all its singular values, so a threshold
            # that lands on another sample changes that sample's LID (normal bundle 6, generator 0).
            nb_threshold=jnp.asarray(np.where(odd, 10.0, 0.1)),
            jac_threshold=jnp.asarray(np.where(odd, 1e3, 1e-8)),
        ),
    )


def estimate(args):
    """All three estimators on a batch (or a shard of it); every array in ``args`` is per sample."""
    p = problem()
    score, schedule, x, keys = p["score"], p["schedule"], args["x"], args["keys"]
    return dict(
        flipd_exact=flipd(score, x, t0=T0, schedule=schedule, trace="exact"),
        flipd_hutchinson=flipd(score, x, t0=T0, schedule=schedule, key=keys, num_probes=3),
        normal_bundle_gap=normal_bundle(score, x, t0=T0, schedule=schedule, key=keys),
        normal_bundle_threshold=normal_bundle(
            score, x, t0=T0, schedule=schedule, key=keys, threshold=args["nb_threshold"]
        ).lid,
        jacobian_rank=jacobian_rank(p["gen"], args["z"], threshold=args["jac_threshold"]),
    )


@functools.cache
def plain():
    """The estimators called directly on the whole batch (float64)."""
    return estimate(problem()["args"])


@pytest.mark.slow
def test_plain_calls_give_the_known_truth_and_depend_on_the_keys(x64):
    p = problem()
    dims, odd = np.asarray(p["mix"].dims)[p["comp"]], p["odd"]
    out = plain()
    # Exact-trace FLIPD at small t0 and the normal bundle read the component's dimension.
    np.testing.assert_allclose(out["flipd_exact"], dims, atol=0.05)
    np.testing.assert_array_equal(out["normal_bundle_gap"].lid, dims)
    np.testing.assert_array_equal(out["normal_bundle_threshold"], np.where(odd, D, dims))
    np.testing.assert_array_equal(out["jacobian_rank"].lid, np.where(odd, 0, 2))  # W has rank 2
    assert 0 < float(jnp.max(jnp.abs(out["flipd_hutchinson"] - out["flipd_exact"]))) < 3.0
    # The comparisons below would see keys handed out differently: e.g. one key per device,
    # split there into its samples' keys, gives other Hutchinson and normal-bundle values.
    shard_split = jax.vmap(lambda k: jax.random.split(k, BATCH // N_DEV))(
        jax.random.split(jax.random.key(2), N_DEV)
    ).reshape(BATCH)
    other = estimate({**p["args"], "keys": shard_split})
    # Every sample changes, but for FLIPD on the point mass: there sigma^2 J = -I and any
    # Rademacher probe gives the exact trace.
    changed = ~np.isclose(other["flipd_hutchinson"], out["flipd_hutchinson"], **TOL)
    np.testing.assert_array_equal(changed, dims > 0)
    changed = ~np.isclose(
        other["normal_bundle_gap"].singular_values, out["normal_bundle_gap"].singular_values, **TOL
    )
    assert np.all(np.any(changed, axis=1))


def _replicas_agree(out):
    """``reduce_fn`` of the pmap variant: every device's replica equals the first one's."""
    out = jax.tree.map(np.asarray, out)  # indexing on host: no compiles for the slices
    first = jax.tree.map(lambda a: a[0], out)
    for i in range(1, N_DEV):
        chex.assert_trees_all_equal(jax.tree.map(lambda a, i=i: a[i], out), first)
    return first


class VariantsTest(chex.TestCase):
    """jit, no jit, and pmap with the whole batch replicated to all 8 devices (chex's default
    ``broadcast_args_to_devices=True``; the score function and generator are closed over, as
    the broadcast turns every argument leaf into an array)."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_equals_plain_call(self):
        assert jax.device_count() == N_DEV
        with jax.enable_x64(True):
            out = self.variant(estimate, reduce_fn=_replicas_agree)(problem()["args"])
            assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, plain())
            chex.assert_trees_all_close(out, plain(), **TOL)


def test_data_parallel_pmap_equals_whole_batch(x64):
    # Two samples per device, each with its own key and threshold.
    assert jax.device_count() == N_DEV
    per_device = jax.tree.map(
        lambda a: a.reshape((N_DEV, BATCH // N_DEV) + a.shape[1:]), problem()["args"]
    )
    out = jax.pmap(estimate)(per_device)
    assert all(len(leaf.sharding.device_set) == N_DEV for leaf in jax.tree.leaves(out))
    out = jax.tree.map(lambda a: np.asarray(a).reshape((BATCH,) + a.shape[2:]), out)
    chex.assert_trees_all_close(out, plain(), **TOL)


@pytest.mark.slow
def test_shard_map_equals_whole_batch(x64):
    mesh = jax.make_mesh((N_DEV,), ("data",))
    args = jax.device_put(problem()["args"], NamedSharding(mesh, P("data")))
    run = jax.jit(jax.shard_map(estimate, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    out = run(args)
    assert all(len(leaf.sharding.device_set) == N_DEV for leaf in jax.tree.leaves(out))
    chex.assert_trees_all_close(out, plain(), **TOL)
