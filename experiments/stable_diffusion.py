"""Stable Diffusion memorization detection: ``python experiments/stable_diffusion.py --help``.

Thin entry point; the code lives in :mod:`mmh_jax.experiments.stable_diffusion` so that the
installed console command ``mmh-jax sd detect`` runs exactly the same thing.
"""

import sys

from mmh_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["sd", "detect", *sys.argv[1:]]))
