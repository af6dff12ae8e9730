"""The paper's CIFAR-10 memorization analysis (Figure 5, Figure 8): ``python experiments/cifar10.py run --help``
and ``python experiments/cifar10.py report --help``.

Thin entry point; the code lives in :mod:`mmh_jax.experiments.cifar10` so that the installed
console commands ``mmh-jax cifar10 run`` / ``mmh-jax cifar10 report`` run exactly the same thing.
"""

import sys

from mmh_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["cifar10", *sys.argv[1:]]))
