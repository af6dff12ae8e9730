"""Benchmark: Jacobian-rank LID of StyleGAN2-ADA samples against its bare cost.

Run it through the runner: ``python -m benchmarks run gan_lid [--set gan_lid.channel_max=128]``.

The generator is the official CIFAR-10 configuration (``--cfg=cifar``: z_dim = w_dim = 512,
c_dim = 10, 32x32, 512 channels at every resolution, 2 mapping layers; 20.2M parameters) with
random weights (Flax ``init``, seeded); ``channel_max`` shrinks it, ``z_dim`` (also w_dim) and
``resolution`` only for smoke tests. Sides, interleaved round by round after one compiling call
each, so that load drift hits them alike:

* ``gan_lid``: :func:`mmh_jax.memorization.gan_lid` of ``batch`` samples (latent directions in
  chunks of ``chunk``, 0 for gan_lid's default, then the SVD of every ``[3 r^2, z_dim]``
  Jacobian);
* ``jvp_all``: the same ``z_dim`` one-hot tangents pushed through ``jax.jvp`` of the generator
  in one ``vmap`` batch, per sample (the bare cost of the Jacobian; ``batch`` calls);
* ``forward``: one forward pass of the ``batch`` samples.

Ratios: ``gan_lid / jvp_all`` (target: at most 1.2) and ``gan_lid / forward``. Notes: the
parameter count and gan_lid's samples per second (median round).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the gan_lid benchmark (defaults: RESULTS.md's record, the CIFAR-10 config)."""

    batch: int = 1
    chunk: int = 0
    channel_max: int = 512
    z_dim: int = 512
    resolution: int = 32


TINY = Config(channel_max=8, z_dim=16, resolution=8)


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure ``gan_lid`` against the bare Jacobian and the forward pass; one case."""
    import jax
    import jax.numpy as jnp

    from mmh_jax.memorization import gan_lid
    from mmh_jax.models import StyleGAN2Generator

    c = config
    kwargs = dict(
        z_dim=c.z_dim,
        c_dim=10,
        w_dim=c.z_dim,
        img_resolution=c.resolution,
        img_channels=3,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(
            channel_base=32768, channel_max=c.channel_max, num_fp16_res=4, conv_clamp=256
        ),
    )
    module = StyleGAN2Generator.from_init_kwargs(kwargs)
    z = jax.random.normal(jax.random.key(1), (c.batch, c.z_dim))
    labels = jnp.arange(c.batch) % 10
    params = jax.jit(module.init)(jax.random.key(0), z, labels)["params"]
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params))

    @jax.jit
    def forward(params, z, labels):
        return module.apply({"params": params}, z, labels)

    @jax.jit
    def jvp_all(params, z1, c1):
        basis = jnp.eye(c.z_dim, dtype=z1.dtype)[:, None, :]
        fn = lambda v: module.apply({"params": params}, v, c1)  # noqa: E731
        return jax.vmap(lambda t: jax.jvp(fn, (z1,), (t,))[1])(basis)

    def bare():
        return [jvp_all(params, z[i : i + 1], labels[i : i + 1]) for i in range(c.batch)]

    timings = interleaved(
        {
            "gan_lid": lambda: gan_lid(module, params, z, labels, chunk_size=c.chunk or None),
            "jvp_all": bare,
            "forward": lambda: forward(params, z, labels),
        },
        repeats,
        sync=jax.block_until_ready,
    )
    return [
        case_record(
            f"channel_max {c.channel_max}, {c.resolution}x{c.resolution}, z_dim {c.z_dim}, "
            f"batch {c.batch}",
            timings,
            ratios={
                f"gan_lid / (jvp x {c.z_dim})": ("gan_lid", "jvp_all"),
                "gan_lid / forward": ("gan_lid", "forward"),
            },
            notes={
                "parameters": n_params,
                "samples_per_s": c.batch / statistics.median(timings.times["gan_lid"]),
            },
        )
    ]
