"""Run the von Mises mixture demo (paper, Section 4, Figure 4): ``python experiments/von_mises.py --help``.

Thin entry point; the code lives in :mod:`mmh_jax.experiments.von_mises` so that the
installed console command ``mmh-jax demo`` runs exactly the same thing.
"""

import sys

from mmh_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "von-mises", *sys.argv[1:]]))
