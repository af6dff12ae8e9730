"""The demos behind ``mmh-jax demo``: the paper's von Mises mixture (Section 4,
Figure 4) and an image-scale memorization demo on scikit-learn's 8x8 digits.

Each demo module has ``add_arguments(parser)``, ``config_from_args(args)`` and
``run(config, *, console)``; the scripts in the repository's ``experiments/``
folder and the console command only parse flags and call these.
"""

__all__ = ["von_mises", "digits"]
