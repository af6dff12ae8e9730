"""Run the 8x8 digits memorization demo: ``python experiments/digits.py --help``.

Thin entry point; the code lives in :mod:`mmh_jax.experiments.digits` so that the
installed console command ``mmh-jax demo digits`` runs exactly the same thing.
"""

import sys

from mmh_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "digits", *sys.argv[1:]]))
