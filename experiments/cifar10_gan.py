"""Jacobian-rank LID of StyleGAN2-ADA samples (Figure 5a-b): ``python experiments/cifar10_gan.py --help``.

Thin entry point; the code lives in :mod:`mmh_jax.experiments.cifar10_gan` so that the
installed console command ``mmh-jax gan lid`` runs exactly the same thing.
"""

import sys

from mmh_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["gan", "lid", *sys.argv[1:]]))
