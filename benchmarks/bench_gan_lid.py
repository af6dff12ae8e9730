"""Benchmark: Jacobian-rank LID of StyleGAN2-ADA samples against its bare cost.

The generator is the official CIFAR-10 configuration (``--cfg=cifar``: z_dim = w_dim = 512,
c_dim = 10, 32x32, 512 channels at every resolution, 2 mapping layers; 20.2M parameters) with
random weights (Flax ``init``, seeded); ``--channel-max`` shrinks it for quick runs. Sides, each
timed in interleaved rounds (after one compiling call each) so that load drift hits them alike:

* ``gan_lid``: :func:`mmh_jax.memorization.gan_lid` of ``--batch`` samples (latent directions in
  chunks of ``--chunk``, then the SVD of every ``[3072, 512]`` Jacobian);
* ``jvp x 512``: the same 512 one-hot tangents pushed through ``jax.jvp`` of the generator in
  one ``vmap`` batch, per sample (the bare cost of the Jacobian; ``--batch`` calls);
* ``forward``: one forward pass of the ``--batch`` samples.

Reported: the median (min-max) of the round-by-round ratios gan_lid / (jvp x 512) (target:
at most 1.2) and gan_lid / forward, and samples per second of gan_lid.

Example: python -m benchmarks.bench_gan_lid --rounds 3 --channel-max 128
"""

from __future__ import annotations

import argparse
import os
import statistics

from benchmarks._common import cpu_model, interleaved, ratio_summary


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=1, help="samples per gan_lid call")
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="latent directions per batched jvp (default: gan_lid's)",
    )
    p.add_argument("--channel-max", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from mmh_jax.memorization import gan_lid
    from mmh_jax.models import StyleGAN2Generator

    kwargs = dict(
        z_dim=512,
        c_dim=10,
        w_dim=512,
        img_resolution=32,
        img_channels=3,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(
            channel_base=32768, channel_max=args.channel_max, num_fp16_res=4, conv_clamp=256
        ),
    )
    module = StyleGAN2Generator.from_init_kwargs(kwargs)
    z = jax.random.normal(jax.random.key(1), (args.batch, 512))
    c = jnp.arange(args.batch) % 10
    params = jax.jit(module.init)(jax.random.key(0), z, c)["params"]
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    dev = jax.devices()[0]
    print(
        f"machine: nproc={os.cpu_count()} cpu='{cpu_model()}' jax={jax.__version__} "
        f"device={dev.platform}:{dev.device_kind}"
    )
    print(
        f"generator: CIFAR-10 config, channel_max={args.channel_max}, {n_params:,} params "
        f"(w_avg and noise_const included), batch={args.batch}, chunk={args.chunk}"
    )

    @jax.jit
    def forward(params, z, c):
        return module.apply({"params": params}, z, c)

    @jax.jit
    def jvp_all(params, z1, c1):
        basis = jnp.eye(512, dtype=z1.dtype)[:, None, :]
        fn = lambda v: module.apply({"params": params}, v, c1)  # noqa: E731
        return jax.vmap(lambda t: jax.jvp(fn, (z1,), (t,))[1])(basis)

    def bare():
        return [jvp_all(params, z[i : i + 1], c[i : i + 1]) for i in range(args.batch)]

    fns = {
        "gan_lid": lambda: gan_lid(module, params, z, c, chunk_size=args.chunk),
        "jvp x 512": bare,
        "forward": lambda: forward(params, z, c),
    }
    times = interleaved(fns, args.rounds, sync=jax.block_until_ready).times
    for name, series in times.items():
        print(
            f"{name:>10}: median {statistics.median(series):.3f} s "
            f"(min {min(series):.3f}, max {max(series):.3f}) over {args.rounds} rounds"
        )
    print(f"gan_lid / jvp x 512: {ratio_summary(times['gan_lid'], times['jvp x 512'])}")
    print(f"gan_lid / forward:   {ratio_summary(times['gan_lid'], times['forward'])}")
    print(f"gan_lid samples/s:   {args.batch / statistics.median(times['gan_lid']):.3f}")


if __name__ == "__main__":
    main()
